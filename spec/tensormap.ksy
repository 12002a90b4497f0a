meta:
  id: tensormap
  title: tensormap tensor checkpoint, format versions 1 and 2
  file-extension: tmap
  license: CC0-1.0
  endian: le
doc: |
  A flat file of named tensors made to be memory-mapped: a binary header
  (preamble, tensor records, metadata records, XXH3-64 checksum) followed by
  tensor bytes, each at an offset that is a multiple of the file's alignment.
  spec/FORMAT.md is normative; this description covers the layout. The rules
  that need arithmetic over several fields (canonical offsets, checksums,
  UTF-8, uniqueness) are listed in FORMAT.md section 9 and are not expressed here.
doc-ref: spec/FORMAT.md
seq:
  - id: magic
    contents: [0x89, 0x54, 0x4d, 0x41, 0x50, 0x0d, 0x0a, 0x1a]
  - id: major
    type: u2
    valid:
      any-of: [1, 2]
  - id: minor
    type: u2
  - id: alignment
    type: u4
    valid:
      min: 64
      max: 1048576
    doc: A power of two; every tensor starts on a multiple of it.
  - id: header_size
    type: u8
    doc: Bytes from the start of the file to the end of the header checksum.
  - id: tensor_count
    type: u8
  - id: metadata_count
    type: u8
  - id: features
    type: u8
    doc: Major 2 only (reserved, zero, in major 1); bit 0 means aliases.
  - id: tensors
    type: tensor_record
    repeat: expr
    repeat-expr: tensor_count
  - id: metadata
    type: metadata_record
    repeat: expr
    repeat-expr: metadata_count
  - id: header_checksum
    size: 8
    doc: XXH3-64 (seed 0) of bytes [0, header_size - 8), little-endian.
types:
  tensor_record:
    seq:
      - id: name_length
        type: u4
      - id: dtype
        type: u1
        enum: dtype
      - id: rank
        type: u1
        valid:
          max: 8
      - id: flags
        type: u2
        doc: |
          Major 2 with the aliases feature: bit 0 marks an alias, a second name for
          the bytes of the earlier record at the same offset (FORMAT.md section 3.1).
          Reserved, zero, otherwise.
      - id: offset
        type: u8
        doc: Absolute offset of the tensor's first byte in the file.
      - id: byte_length
        type: u8
      - id: checksum
        size: 8
        doc: XXH3-64 (seed 0) of the tensor's bytes, little-endian.
      - id: shape
        type: u8
        repeat: expr
        repeat-expr: rank
      - id: name
        type: str
        size: name_length
        encoding: UTF-8
      - id: padding
        size: (8 - name_length % 8) % 8
    instances:
      is_alias:
        value: _root.major == 2 and (_root.features & 1) != 0 and (flags & 1) != 0
      data:
        io: _root._io
        pos: offset
        size: byte_length
        doc: The tensor's bytes, row-major and little-endian.
  metadata_record:
    seq:
      - id: key_length
        type: u4
      - id: value_length
        type: u4
      - id: key
        type: str
        size: key_length
        encoding: UTF-8
      - id: value
        type: str
        size: value_length
        encoding: UTF-8
      - id: padding
        size: (8 - (key_length + value_length) % 8) % 8
enums:
  dtype:
    1: bool
    2: u8
    3: i8
    4: i16
    5: u16
    6: i32
    7: u32
    8: i64
    9: u64
    10: f16
    11: bf16
    12: f32
    13: f64
    14: c64
    15: c128
    16: f8_e4m3
    17: f8_e5m2
