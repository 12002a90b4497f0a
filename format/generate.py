"""Generates the tensormap conformance suite from spec/FORMAT.md, with a writer of its own
(independent of the C++ library).

    python3 format/generate.py            # rewrite format/valid and format/invalid
    python3 format/generate.py --check    # regenerate into a scratch folder, compare

valid/NAME.tmap   a valid file; valid/NAME.json is its description, exactly as
                  `tensormap inspect --json` and the Python reader's describe() give it.
invalid/NAME.tmap breaks one rule; invalid/expected.json maps each file to the rule, the
                  error kind, and the stage that must catch it ("open" or "verify").
"""
import filecmp
import json
import os
import struct
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "python"))
from tensormap_reader import MAGIC, TensormapFile, xxh3_64  # noqa: E402

CODES = {"BOOL": 1, "U8": 2, "I8": 3, "I16": 4, "U16": 5, "I32": 6, "U32": 7, "I64": 8, "U64": 9,
         "F16": 10, "BF16": 11, "F32": 12, "F64": 13, "C64": 14, "C128": 15, "F8_E4M3": 16,
         "F8_E5M2": 17}
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
         "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "C64": 8, "C128": 16, "F8_E4M3": 1, "F8_E5M2": 1}


def pad8(n):
    return (n + 7) // 8 * 8


def round_up(x, a):
    return (x + a - 1) // a * a


def pattern(index, n, dtype):
    data = bytes((index * 31 + j * 7) & 0xFF for j in range(n))
    if dtype == "BOOL":
        data = bytes(b & 1 for b in data)
    return data


def build(tensors, metadata=(), alignment=64, minor=0, aliases=None):
    """tensors: (name, dtype, shape[, data]) tuples; aliases: {name: earlier name} makes
    those records aliases (format 2.0, section 3.1). Returns the file's bytes."""
    aliases = aliases or {}
    full, index = [], {}
    for i, t in enumerate(tensors):
        name, dtype, shape = t[:3]
        count = 1
        for d in shape:
            count *= d
        data = t[3] if len(t) > 3 else pattern(i, count * SIZES[dtype], dtype)
        index[name] = i
        target = index[aliases[name]] if name in aliases else None
        while target is not None and full[target][4] is not None:  # an alias of an alias
            target = full[target][4]
        full.append((name.encode(), dtype, shape, data, target))
    meta = [(k.encode(), v.encode()) for k, v in metadata]
    h = 48 + sum(32 + 8 * len(s) + pad8(len(n)) for n, _, s, _, _ in full)
    h += sum(8 + pad8(len(k) + len(v)) for k, v in meta) + 8
    cursor, offsets = round_up(h, alignment), []
    for _, _, _, data, target in full:
        if target is not None:  # no bytes of its own
            offsets.append(offsets[target])
            continue
        offsets.append(cursor)
        cursor = round_up(cursor + len(data), alignment)
    out = bytearray(cursor)
    major, features = (2, 1) if aliases else (1, 0)
    out[:48] = MAGIC + struct.pack("<HHIQQQQ", major, minor, alignment, h, len(full), len(meta), features)
    pos = 48
    for (name, dtype, shape, data, target), offset in zip(full, offsets):
        if target is not None:
            data = full[target][3]
        out[pos:pos + 32] = struct.pack("<IBBHQQQ", len(name), CODES[dtype], len(shape),
                                        0 if target is None else 1, offset, len(data), xxh3_64(data))
        for d, dim in enumerate(shape):
            out[pos + 32 + 8 * d:pos + 40 + 8 * d] = struct.pack("<Q", dim)
        at = pos + 32 + 8 * len(shape)
        out[at:at + len(name)] = name
        pos = at + pad8(len(name))
        if target is None:
            out[offset:offset + len(data)] = data
    for k, v in meta:
        out[pos:pos + 8] = struct.pack("<II", len(k), len(v))
        out[pos + 8:pos + 8 + len(k) + len(v)] = k + v
        pos += 8 + pad8(len(k) + len(v))
    reseal(out)
    return bytes(out)


def reseal(out):
    h = struct.unpack_from("<Q", out, 16)[0]
    out[h - 8:h] = struct.pack("<Q", xxh3_64(bytes(out[:h - 8])))


def patched(data, changes, seal=True):
    """data with struct-packed changes: (offset, format, value) triples."""
    out = bytearray(data)
    for offset, fmt, value in changes:
        struct.pack_into(fmt, out, offset, value)
    if seal:
        reseal(out)
    return bytes(out)


def assemble(records, t_count, m_count, data=b"", alignment=64):
    """A file from raw header records (bytes, laid end to end from offset 48), sealed, with
    `data` at round_up(H, A): for headers that build() cannot make."""
    h = 48 + len(records) + 8
    first = round_up(h, alignment)
    out = bytearray(round_up(first + len(data), alignment) if data else first)
    out[:48] = MAGIC + struct.pack("<HHIQQQQ", 1, 0, alignment, h, t_count, m_count, 0)
    out[48:48 + len(records)] = records
    out[first:first + len(data)] = data
    reseal(out)
    return bytes(out)


def tensor_record(name, dtype, shape, offset, byte_length, checksum=0):
    raw = name.encode() if isinstance(name, str) else name
    head = struct.pack("<IBBHQQQ", len(raw), CODES[dtype], len(shape), 0, offset, byte_length, checksum)
    return head + b"".join(struct.pack("<Q", d) for d in shape) + raw + bytes(pad8(len(raw)) - len(raw))


# --- the suite --------------------------------------------------------------------------

def valid_files():
    yield "all_dtypes", build([(f"t_{d.lower()}", d, [2, 3]) for d in CODES])
    yield "rank0", build([("scalar", "F64", [], struct.pack("<d", 3.25))])
    yield "empty_tensors", build([("empty_a", "F32", [0]), ("empty_b", "I64", [4, 0, 3]),
                                  ("last", "U8", [5]), ("empty_tail", "F16", [0, 0])])
    yield "no_tensors", build([], [("note", "metadata only")])
    yield "unicode_names", build([("ñame", "F32", [2]), ("重み.weight", "BF16", [3]),
                                  ("emoji_😀", "U8", [1])], [("ключ", "значение")])
    yield "metadata", build([("w", "F32", [2])],
                            [("format", "pt"), ("empty", ""), ("unicode", "値 ✓"), ("k" * 40, "v" * 100)])
    yield "rank8", build([("deep", "I16", [1, 2, 1, 2, 1, 2, 1, 2])])
    for a in (64, 256, 4096, 65536, 1048576):
        yield f"align_{a}", build([("a", "U8", [3]), ("b", "F64", [5])], alignment=a)
    yield "spec_example", build([("w", "F32", [2], struct.pack("<ff", 1.0, 2.0))], [("k", "v")])
    newer = build([("w", "F32", [2])], minor=3)
    yield "newer_minor_reserved", patched(newer, [(40, "<Q", 7), (48 + 6, "<H", 1)])
    # Rule 15: a zero dimension empties a tensor whose other dimensions are large but fit.
    yield "zero_dimension_beside_large_ones", build([("z", "F32", [1 << 40, 0, 1 << 20]), ("after", "U8", [2])])
    # Rule 19 compares bytes: "é" precomposed (C3 A9) and decomposed (65 CC 81) are two names.
    yield "names_compared_as_bytes", build([("\u00e9", "U8", [1]), ("e\u0301", "U8", [1])])
    # Metadata values may hold NUL (names and keys may not).
    yield "metadata_value_with_nul", build([], [("k", "a\u0000b")])
    # Format 2.0 (section 3.1): "head" and "again" are aliases of "emb", stored once; the
    # cursor does not move for them, so "b" follows "emb" directly.
    yield "aliases", build([("emb", "F32", [4, 3]), ("head", "F32", [4, 3]), ("b", "U8", [5]),
                            ("again", "F32", [4, 3])], [("k", "v")], aliases={"head": "emb", "again": "head"})
    # Major 2 with no feature is read as major 1 is.
    yield "major2_no_features", patched(build([("w", "F32", [2])]), [(8, "<H", 2)])
    # Section 10: in a newer minor, bits 1 to 15 of an alias record's flags are reserved
    # and read as 0; bit 0 still makes it an alias (the feature says so in every minor).
    yield "newer_minor_alias_with_reserved_flag_bits", patched(
        build([("a", "F32", [2]), ("t", "F32", [2]), ("b", "U8", [3])], minor=3, aliases={"t": "a"}),
        [(96 + 6, "<H", 0x8003)])


def invalid_files():
    # Base: a (F32 [2]) at record 48, b (U8 [3]) at record 96, metadata k=v at 144,
    # H = 168, a at 192, b at 256, file size 320 (as in the C++ tests).
    base = build([("a", "F32", [2]), ("b", "U8", [3])], [("k", "v")])
    rec_a, rec_b, meta = 48, 96, 144
    assert len(base) == 320 and struct.unpack_from("<Q", base, 16)[0] == 168
    names = build([("abcd", "U8", [1])], [("wxyz", "1234")])
    yield "rule01_empty_file", 1, "FileTooSmall", "open", b""
    yield "rule01_55_bytes", 1, "FileTooSmall", "open", base[:55]
    yield "rule02_bad_magic", 2, "BadMagic", "open", b"\x89TMAX" + base[5:]
    yield "rule02_png_file", 2, "BadMagic", "open", b"\x89PNG\r\n\x1a\n" + bytes(56)
    yield "rule03_major_3", 3, "UnsupportedVersion", "open", patched(base, [(8, "<H", 3)])
    yield "rule04_alignment_0", 4, "BadAlignment", "open", patched(base, [(12, "<I", 0)])
    yield "rule04_alignment_96", 4, "BadAlignment", "open", patched(base, [(12, "<I", 96)])
    yield "rule04_alignment_2mib", 4, "BadAlignment", "open", patched(base, [(12, "<I", 2 << 20)])
    yield "rule05_header_size_odd", 5, "BadHeaderSize", "open", patched(base, [(16, "<Q", 170)], False)
    yield "rule05_header_size_huge", 5, "BadHeaderSize", "open", patched(base, [(16, "<Q", 1 << 62)], False)
    yield "rule06_header_truncated", 6, "Truncated", "open", base[:100]
    yield "rule07_header_bit_flip", 7, "HeaderChecksumMismatch", "open", patched(base, [(rec_a + 40, "<B", ord("z"))], False)
    yield "rule08_tensor_count", 8, "TooManyEntries", "open", patched(base, [(24, "<Q", 3)])
    yield "rule08_metadata_count_huge", 8, "TooManyEntries", "open", patched(base, [(32, "<Q", 1 << 40)])
    yield "rule09_reserved_preamble", 9, "NonZeroReserved", "open", patched(base, [(40, "<Q", 1)])
    yield "rule10_record_past_header", 10, "MalformedHeader", "open", patched(base, [(rec_b, "<I", 100)])
    yield "rule11_reserved_record", 11, "NonZeroReserved", "open", patched(base, [(rec_a + 6, "<H", 1)])
    yield "rule11_name_padding", 11, "NonZeroReserved", "open", patched(base, [(rec_a + 41, "<B", 1)])
    yield "rule12_dtype_0", 12, "UnknownDtype", "open", patched(base, [(rec_a + 4, "<B", 0)])
    yield "rule12_dtype_18", 12, "UnknownDtype", "open", patched(base, [(rec_a + 4, "<B", 18)])
    rank8 = build([("abcdefgh", "U8", [1] * 8)])
    yield "rule13_rank_9", 13, "BadRank", "open", patched(rank8, [(48 + 5, "<B", 9), (48, "<I", 0)])
    yield "rule14_name_not_utf8", 14, "BadName", "open", patched(names, [(88, "<B", 0xFF)])
    yield "rule14_name_overlong", 14, "BadName", "open", patched(names, [(88, "<H", 0x80C0)])
    yield "rule14_name_surrogate", 14, "BadName", "open", patched(names, [(88, "<I", 0x6480A0ED)])
    yield "rule14_name_nul", 14, "BadName", "open", patched(names, [(89, "<B", 0)])
    yield "rule14_metadata_value", 14, "BadName", "open", patched(names, [(108, "<B", 0xC0)])
    yield "rule15_shape_overflow", 15, "ShapeOverflow", "open", patched(base, [(rec_a + 32, "<Q", 1 << 62)])
    yield "rule16_length_mismatch", 16, "LengthMismatch", "open", patched(base, [(rec_a + 16, "<Q", 9)])
    yield "rule17_hole", 17, "BadOffset", "open", patched(base, [(rec_b + 8, "<Q", 320)])
    yield "rule17_overlap", 17, "BadOffset", "open", patched(base, [(rec_b + 8, "<Q", 192)])
    yield "rule18_unused_header_bytes", 18, "MalformedHeader", "open", patched(base, [(32, "<Q", 0)])
    yield "rule19_duplicate_tensor", 19, "DuplicateName", "open", patched(base, [(rec_b + 40, "<B", ord("a"))])
    two_keys = build([], [("k1", "x"), ("k2", "y")])
    yield "rule19_duplicate_key", 19, "DuplicateName", "open", patched(two_keys, [(64 + 9, "<B", ord("1"))])
    yield "rule20_truncated_in_tensor", 20, "Truncated", "open", base[:196]
    yield "rule20_truncated_in_padding", 20, "Truncated", "open", base[:319]
    yield "rule20_trailing_bytes", 20, "TrailingBytes", "open", base + b"\0"
    yield "rule20_zip_appended", 20, "TrailingBytes", "open", base + b"PK\x05\x06" + b"\0" * 18
    yield "rule21_tensor_padding", 21, "NonZeroPadding", "verify", patched(base, [(200, "<B", 1)], False)
    yield "rule21_header_padding", 21, "NonZeroPadding", "verify", patched(base, [(171, "<B", 1)], False)
    yield "rule22_data_bit_flip", 22, "ChecksumMismatch", "verify", patched(base, [(257, "<B", 0x11)], False)

    # Where an independent reader had to guess (spec section 9, "Order and edge cases").
    # Rule 10 checks a record's fixed part before it reads any length from it: here the
    # metadata record's 8 fixed bytes would lie at H - 8, in the checksum.
    yield "rule10_fixed_part_past_header", 10, "MalformedHeader", "open", assemble(
        tensor_record("abcdefghijklmnop", "U8", [1, 1], 128, 1), 1, 1, data=b"\x01")
    # A rank or name length out of bounds that also runs the record past H - 8: rule 10
    # comes first (MalformedHeader), not rule 13 (BadRank) or 14 (BadName).
    yield "rule10_rank_200_past_header", 10, "MalformedHeader", "open", patched(base, [(rec_a + 5, "<B", 200)])
    yield "rule10_name_length_5000_past_header", 10, "MalformedHeader", "open", patched(base, [(rec_a, "<I", 5000)])
    # Inside the header, the same length is rule 14's.
    long_name = build([("n" * 4097, "U8", [1])])
    yield "rule14_name_4097_bytes", 14, "BadName", "open", long_name
    # Records lie end to end from offset 48: 8 bytes between two records are read as the
    # start of the next record (name_length 0, dtype 0).
    gapped = assemble(base[48:rec_b] + bytes(8) + base[rec_b:160], 2, 1)  # H = 176: a's offset still fits
    yield "rule12_gap_between_records", 12, "UnknownDtype", "open", gapped
    # Padding is no reserved field: it is checked whatever the minor version.
    yield "rule11_padding_in_newer_minor", 11, "NonZeroReserved", "open", patched(
        build([("a", "F32", [2])], minor=3), [(48 + 41, "<B", 1)])
    # Rule 15 is the exact product, with no wrap-around: 2^62 * 4 * 1 bytes is 2^64,
    # which wraps to 0 in 64 bits (the record says 0 bytes, so a wrapping reader accepts).
    yield "rule15_product_wraps_to_zero", 15, "ShapeOverflow", "open", assemble(
        tensor_record("w", "U8", [1 << 62, 4, 1], 128, 0), 1, 0)
    # A zero dimension does not excuse the others: the product of the non-zero ones times
    # the dtype size must be below 2^63, in any order (a left-to-right product stops at 0).
    yield "rule15_zero_first_then_overflow", 15, "ShapeOverflow", "open", assemble(
        tensor_record("w", "U8", [0, 1 << 62, 4], 128, 0), 1, 0)
    yield "rule15_overflow_then_zero", 15, "ShapeOverflow", "open", assemble(
        tensor_record("w", "U8", [1 << 62, 4, 0], 128, 0), 1, 0)
    # Each dimension must be below 2^63 even where another is 0.
    yield "rule15_dimension_2pow63_beside_zero", 15, "ShapeOverflow", "open", assemble(
        tensor_record("w", "U8", [1 << 63, 0], 128, 0), 1, 0)
    # Rule 17: a padded end at or past 2^63 is Truncated in that record, before any later
    # record is read (the second record's offset is wrong: a reader that waits gives BadOffset).
    first = round_up(48 + 2 * 48 + 8, 64)  # 192
    n = (1 << 63) - first - 1
    yield "rule17_padded_end_past_2pow63", 17, "Truncated", "open", assemble(
        tensor_record("a", "U8", [n], first, n) + tensor_record("b", "U8", [1], first, 1), 2, 0)
    # Format 2.0 (section 3.1). Base: a (F32 [2]), t an alias of a, b (U8 [3]); records at
    # 48, 96, 144; H = 200; a (and t) at 256, b at 320.
    tied = build([("a", "F32", [2]), ("t", "F32", [2]), ("b", "U8", [3])], aliases={"t": "a"})
    t_rec = 96
    assert struct.unpack_from("<Q", tied, t_rec + 8)[0] == 256
    yield "rule09_unknown_feature", 9, "UnsupportedVersion", "open", patched(tied, [(40, "<Q", 3)])
    yield "rule09_unknown_feature_newer_minor", 9, "UnsupportedVersion", "open", patched(
        tied, [(40, "<Q", 1 << 40), (10, "<H", 7)])
    yield "rule11_alias_flag_without_feature", 11, "NonZeroReserved", "open", patched(tied, [(40, "<Q", 0)])
    yield "rule11_alias_flag_in_major_1", 11, "NonZeroReserved", "open", patched(tied, [(8, "<H", 1), (40, "<Q", 0)])
    yield "rule11_unknown_flag_bit", 11, "NonZeroReserved", "open", patched(tied, [(t_rec + 6, "<H", 3)])
    yield "rule17_alias_of_no_tensor", 17, "BadAlias", "open", patched(tied, [(t_rec + 8, "<Q", 260)])
    yield "rule17_alias_of_a_later_tensor", 17, "BadAlias", "open", patched(
        build([("a", "U8", [3]), ("t", "U8", [3]), ("b", "U8", [3])], aliases={"t": "a"}), [(t_rec + 8, "<Q", 320)])
    yield "rule17_alias_checksum_differs", 17, "BadAlias", "open", patched(tied, [(t_rec + 24, "<Q", 1)])
    yield "rule17_alias_dtype_and_shape_differ", 17, "BadAlias", "open", patched(
        tied, [(t_rec + 4, "<B", CODES["I16"]), (t_rec + 32, "<Q", 4)])
    yield "rule17_alias_empty", 17, "BadAlias", "open", patched(tied, [(t_rec + 32, "<Q", 0), (t_rec + 16, "<Q", 0)])

    # Section 10: a minor never adds a dtype code (no reader could skip such a tensor and
    # still read the file correctly), so an unknown code is UnknownDtype in every minor.
    yield "rule12_dtype_18_newer_minor", 12, "UnknownDtype", "open", patched(
        build([("a", "F32", [2])], minor=3), [(48 + 4, "<B", 18)])
    # Rule 19 is checked once every record is read and rule 18 passed, not record by
    # record: a duplicate name before unused header bytes is rule 18's MalformedHeader,
    # and before a bad metadata value, rule 14's BadName.
    yield "rule18_before_duplicate_name", 18, "MalformedHeader", "open", patched(
        base, [(rec_b + 40, "<B", ord("a")), (32, "<Q", 0)])
    yield "rule14_metadata_before_duplicate_name", 14, "BadName", "open", patched(
        base, [(rec_b + 40, "<B", ord("a")), (meta + 9, "<B", 0xC0)])
    # A metadata record's key_length + value_length is summed without wrapping: 2^32 - 1
    # plus 1 is 2^32, a record far past the header (in 32 bits it would wrap to 0).
    yield "rule10_metadata_lengths_wrap_in_32_bits", 10, "MalformedHeader", "open", patched(
        base, [(meta, "<I", 0xFFFFFFFF), (meta + 4, "<I", 1)])
    # Rules 21 and 22 are checked together, region by region in file order (the header's
    # padding, then each tensor's bytes and its padding): the first bad region decides.
    yield "rule22_before_later_padding", 22, "ChecksumMismatch", "verify", patched(
        base, [(192, "<B", 0x55), (300, "<B", 1)], False)
    yield "rule21_before_later_checksum", 21, "NonZeroPadding", "verify", patched(
        base, [(200, "<B", 1), (257, "<B", 0x11)], False)

    # Rule 14 for metadata: the strict UTF-8 of names, without the NUL ban.
    yield "rule14_metadata_value_surrogate", 14, "BadName", "open", patched(names, [(108, "<I", 0x3480A0ED)])
    yield "rule14_metadata_key_nul", 14, "BadName", "open", patched(names, [(105, "<B", 0)])


def write_suite(root):
    os.makedirs(os.path.join(root, "valid"), exist_ok=True)
    os.makedirs(os.path.join(root, "invalid"), exist_ok=True)
    for name, data in valid_files():
        path = os.path.join(root, "valid", name + ".tmap")
        with open(path, "wb") as f:
            f.write(data)
        described = TensormapFile(path).describe()
        with open(os.path.join(root, "valid", name + ".json"), "w", encoding="utf-8") as f:
            json.dump(described, f, indent=2, ensure_ascii=False)
            f.write("\n")
    expected = {}
    for name, rule, kind, stage, data in invalid_files():
        with open(os.path.join(root, "invalid", name + ".tmap"), "wb") as f:
            f.write(data)
        expected[name + ".tmap"] = {"rule": rule, "kind": kind, "stage": stage}
    with open(os.path.join(root, "invalid", "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    if "--check" not in argv:
        write_suite(here)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        write_suite(scratch)
        bad = []
        for sub in ("valid", "invalid"):
            fresh = sorted(os.listdir(os.path.join(scratch, sub)))
            committed = sorted(f for f in os.listdir(os.path.join(here, sub)) if not f.startswith("."))
            if fresh != committed:
                bad.append(f"{sub}/: files differ: {sorted(set(fresh) ^ set(committed))}")
            for name in set(fresh) & set(committed):
                if not filecmp.cmp(os.path.join(scratch, sub, name), os.path.join(here, sub, name), shallow=False):
                    bad.append(f"{sub}/{name} differs from what generate.py makes")
        for line in bad:
            print(line)
        print(f"conformance files: {'stale' if bad else 'match generate.py'}")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
