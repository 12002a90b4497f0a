"""A reference reader of the tensormap file format, versions 1 and 2 (aliases), written
from spec/FORMAT.md alone. Needs only numpy.

    f = TensormapFile("model.tmap")      # maps the file and checks rules 1 to 20
    w = f.array("fc.weight")             # a numpy view into the mapping, no copy
    f.verify()                           # rules 21 and 22: padding and checksums

Every failure raises TensormapError whose .kind is the spec's error kind (section 9),
"Io" when the file cannot be read, or "NotFound" for a name the file does not hold
(that error is also a KeyError). Run as a script, it prints the file's description as
JSON (the same as `tensormap inspect --json`), or "error: KIND: message" and exits 1.

numpy has no BF16 or FP8 dtypes. Where the ml_dtypes package is installed, array()
returns those tensors as ml_dtypes.bfloat16, float8_e4m3fn and float8_e5m2 views;
otherwise as views of their raw bits (uint16 for BF16, uint8 for FP8), in the tensor's
shape either way.
"""
import json
import os
import sys

import numpy as np

MAGIC = b"\x89TMAP\r\n\x1a"
PREAMBLE, CHECKSUM = 48, 8
MIN_HEADER, MAX_HEADER = 56, 1 << 30
MAX_TENSORS, MAX_METADATA, MAX_NAME, MAX_RANK = 1 << 24, 1 << 20, 4096, 8
MAX_OFFSET = (1 << 63) - 1
FEATURE_ALIASES, FLAG_ALIAS = 1, 1  # format 2: the preamble's features, a record's flags
M64 = (1 << 64) - 1

# code: (name, element size, numpy dtype of a view, or None where numpy has none)
DTYPES = {
    1: ("BOOL", 1, np.bool_), 2: ("U8", 1, np.uint8), 3: ("I8", 1, np.int8),
    4: ("I16", 2, np.int16), 5: ("U16", 2, np.uint16), 6: ("I32", 4, np.int32),
    7: ("U32", 4, np.uint32), 8: ("I64", 8, np.int64), 9: ("U64", 8, np.uint64),
    10: ("F16", 2, np.float16), 11: ("BF16", 2, None), 12: ("F32", 4, np.float32),
    13: ("F64", 8, np.float64), 14: ("C64", 8, np.complex64), 15: ("C128", 16, np.complex128),
    16: ("F8_E4M3", 1, None), 17: ("F8_E5M2", 1, None),
}


def _numpy_dtypes():
    """The numpy dtype of a view for each dtype name: ml_dtypes' types where the package
    is installed, else the unsigned integer holding the raw bits."""
    found = {name: dtype for name, _, dtype in DTYPES.values()}
    found.update(BF16=np.uint16, F8_E4M3=np.uint8, F8_E5M2=np.uint8)
    try:
        import ml_dtypes
    except ImportError:
        return found
    found.update(BF16=ml_dtypes.bfloat16, F8_E4M3=ml_dtypes.float8_e4m3fn,
                 F8_E5M2=ml_dtypes.float8_e5m2)
    return found


VIEW_DTYPES = _numpy_dtypes()


class TensormapError(Exception):
    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind

    def __str__(self):  # KeyError's own __str__ would quote the message
        return self.args[0]


class TensorNotFound(TensormapError, KeyError):
    """A name the file does not hold: a TensormapError of kind NotFound, and a KeyError so
    that dict-style code keeps working."""


# --- XXH3-64 (seed 0, default secret), spec section 12 ---------------------------------

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
_P32_1, _P32_2, _P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_P64_1, _P64_2, _P64_3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P64_4, _P64_5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5


def _u64(b, at):
    return int.from_bytes(b[at:at + 8], "little")


def _u32(b, at):
    return int.from_bytes(b[at:at + 4], "little")


def _fold(a, b):
    p = a * b
    return (p ^ (p >> 64)) & M64


def _avalanche(h):
    h ^= h >> 37
    h = (h * 0x165667919E3779F9) & M64
    return h ^ (h >> 32)


def _mix16(data, at, s):
    return _fold(_u64(data, at) ^ _u64(_SECRET, s), _u64(data, at + 8) ^ _u64(_SECRET, s + 8))


def _xxh64_avalanche(h):
    h ^= h >> 33
    h = (h * _P64_2) & M64
    h ^= h >> 29
    h = (h * _P64_3) & M64
    return h ^ (h >> 32)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _long(data):
    acc = np.array([_P32_3, _P64_1, _P64_2, _P64_3, _P64_4, _P32_2, _P64_5, _P32_1], dtype=np.uint64)
    n = len(data)
    keys = np.frombuffer(_SECRET, dtype="<u8")
    # For stripe k of a block, the key is the secret at 8*k: 16 stripes per 1 KiB block.
    stripe_keys = np.stack([np.frombuffer(_SECRET[8 * k:8 * k + 64], dtype="<u8") for k in range(16)])
    scramble_key = keys[16:24]
    swap = np.array([1, 0, 3, 2, 5, 4, 7, 6])

    def accumulate(stripes, key_rows):
        values = stripes
        keyed = values ^ key_rows
        products = (keyed & np.uint64(0xFFFFFFFF)) * (keyed >> np.uint64(32))
        return values.sum(axis=0, dtype=np.uint64)[swap] + products.sum(axis=0, dtype=np.uint64)

    blocks = (n - 1) // 1024
    with np.errstate(over="ignore"):
        if blocks:
            all_blocks = np.frombuffer(data[:blocks * 1024], dtype="<u8").reshape(blocks, 16, 8)
            for b in range(blocks):
                acc += accumulate(all_blocks[b], stripe_keys)
                acc ^= acc >> np.uint64(47)
                acc ^= scramble_key
                acc *= np.uint64(_P32_1)
        tail = ((n - 1) - blocks * 1024) // 64
        if tail:
            stripes = np.frombuffer(data[blocks * 1024:blocks * 1024 + tail * 64], dtype="<u8").reshape(tail, 8)
            acc += accumulate(stripes, stripe_keys[:tail])
        last = np.frombuffer(data[n - 64:n], dtype="<u8").reshape(1, 8)
        acc += accumulate(last, np.frombuffer(_SECRET[192 - 64 - 7:192 - 7], dtype="<u8").reshape(1, 8))
    acc = [int(x) for x in acc]
    result = (n * _P64_1) & M64
    for i in range(4):
        result += _fold(acc[2 * i] ^ _u64(_SECRET, 11 + 16 * i), acc[2 * i + 1] ^ _u64(_SECRET, 11 + 16 * i + 8))
    return _avalanche(result & M64)


def xxh3_64(data):
    """XXH3-64 with seed 0 of a bytes-like object."""
    data = bytes(data)
    n = len(data)
    if n == 0:
        return _xxh64_avalanche(_u64(_SECRET, 56) ^ _u64(_SECRET, 64))
    if n <= 3:
        combined = (data[0] << 16) | (data[n >> 1] << 24) | data[n - 1] | (n << 8)
        return _xxh64_avalanche(combined ^ (_u32(_SECRET, 0) ^ _u32(_SECRET, 4)))
    if n <= 8:
        keyed = (_u32(data, n - 4) + (_u32(data, 0) << 32)) ^ (_u64(_SECRET, 8) ^ _u64(_SECRET, 16))
        h = keyed ^ _rotl(keyed, 49) ^ _rotl(keyed, 24)
        h = (h * 0x9FB21C651E98DF25) & M64
        h ^= (h >> 35) + n
        h = (h * 0x9FB21C651E98DF25) & M64
        return h ^ (h >> 28)
    if n <= 16:
        lo = _u64(data, 0) ^ (_u64(_SECRET, 24) ^ _u64(_SECRET, 32))
        hi = _u64(data, n - 8) ^ (_u64(_SECRET, 40) ^ _u64(_SECRET, 48))
        swapped = int.from_bytes(lo.to_bytes(8, "little"), "big")
        return _avalanche((n + swapped + hi + _fold(lo, hi)) & M64)
    if n <= 128:
        acc = n * _P64_1
        if n > 32:
            if n > 64:
                if n > 96:
                    acc += _mix16(data, 48, 96) + _mix16(data, n - 64, 112)
                acc += _mix16(data, 32, 64) + _mix16(data, n - 48, 80)
            acc += _mix16(data, 16, 32) + _mix16(data, n - 32, 48)
        acc += _mix16(data, 0, 0) + _mix16(data, n - 16, 16)
        return _avalanche(acc & M64)
    if n <= 240:
        acc = n * _P64_1
        for i in range(8):
            acc += _mix16(data, 16 * i, 16 * i)
        acc = _avalanche(acc & M64)
        for i in range(8, n // 16):
            acc += _mix16(data, 16 * i, 16 * (i - 8) + 3)
        acc += _mix16(data, n - 16, 136 - 17)
        return _avalanche(acc & M64)
    return _long(data)


# --- the reader ------------------------------------------------------------------------

def _round_up(x, a):
    return (x + a - 1) // a * a


def _name_problem(raw):
    if not 1 <= len(raw) <= MAX_NAME:
        return f"has length {len(raw)}, not between 1 and {MAX_NAME}"
    if b"\0" in raw:
        return "contains a NUL byte"
    try:
        raw.decode("utf-8", errors="strict")  # Python rejects overlongs and surrogates
    except UnicodeDecodeError:
        return "is not valid UTF-8"
    return None


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "offset", "byte_length", "checksum", "alias_of")

    def __init__(self, name, dtype, shape, offset, byte_length, checksum, alias_of=None):
        self.name, self.dtype, self.shape = name, dtype, shape
        self.offset, self.byte_length, self.checksum = offset, byte_length, checksum
        self.alias_of = alias_of  # format 2 with aliases: the name whose bytes these are


class TensormapFile:
    def __init__(self, path):
        self.path = path
        if os.path.isdir(path):
            raise TensormapError("Io", f"{path}: is a directory")
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise TensormapError("Io", f"{path}: {e.strerror}") from None
        self.file_size = size
        self.bytes = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._validate()

    def _fail(self, kind, what):
        raise TensormapError(kind, f"{self.path}: {what}")

    def _validate(self):
        b, size = self.bytes, self.file_size
        if size < MIN_HEADER:                                                   # rule 1
            self._fail("FileTooSmall", f"file is {size} bytes, fewer than {MIN_HEADER}")
        pre = bytes(b[:PREAMBLE])
        if pre[:8] != MAGIC:                                                    # rule 2
            self._fail("BadMagic", "not a tensormap file")
        self.major, self.minor = int.from_bytes(pre[8:10], "little"), int.from_bytes(pre[10:12], "little")
        if self.major not in (1, 2):                                            # rule 3
            self._fail("UnsupportedVersion", f"version {self.major}.{self.minor}")
        a = _u32(pre, 12)
        if not (64 <= a <= 1 << 20 and a & (a - 1) == 0):                       # rule 4
            self._fail("BadAlignment", f"alignment {a}")
        h = _u64(pre, 16)
        if not (MIN_HEADER <= h <= MAX_HEADER and h % 8 == 0):                 # rule 5
            self._fail("BadHeaderSize", f"header size {h}")
        if h > size:                                                            # rule 6
            self._fail("Truncated", f"header is {h} bytes, the file {size}")
        head = bytes(b[:h])
        if _u64(head, h - 8) != xxh3_64(head[:h - 8]):                          # rule 7
            self._fail("HeaderChecksumMismatch", "header checksum does not match")
        t_count, m_count = _u64(pre, 24), _u64(pre, 32)
        if t_count > MAX_TENSORS or m_count > MAX_METADATA or 40 * t_count + 16 * m_count > h - 56:
            self._fail("TooManyEntries", f"{t_count} tensors, {m_count} metadata")  # rule 8
        check_reserved = self.minor <= 0
        field = _u64(pre, 40)
        if self.major == 1 and check_reserved and field != 0:                   # rule 9
            self._fail("NonZeroReserved", "preamble reserved field")
        if self.major == 2 and field & ~FEATURE_ALIASES:
            self._fail("UnsupportedVersion", f"unknown features {field & ~FEATURE_ALIASES:#x}")
        aliases = self.major == 2 and bool(field & FEATURE_ALIASES)
        by_offset = {}  # where each record's own bytes start -> that record
        self.alignment, self.header_size = a, h
        end, pos, cursor = h - 8, PREAMBLE, _round_up(h, a)
        self.tensors, first_past_end = [], None
        for i in range(t_count):
            if end - pos < 32:                                                  # rule 10
                self._fail("MalformedHeader", f"tensor record {i} runs past the header")
            n, code, rank = _u32(head, pos), head[pos + 4], head[pos + 5]
            rec = 32 + 8 * rank + _round_up(n, 8)
            if rec > end - pos:
                self._fail("MalformedHeader", f"tensor record {i} runs past the header")
            name_at = pos + 32 + 8 * rank
            raw = head[name_at:name_at + n]
            flags = int.from_bytes(head[pos + 6:pos + 8], "little")
            alias = aliases and bool(flags & FLAG_ALIAS)
            reserved = flags & ~FLAG_ALIAS if aliases else flags
            if (check_reserved and reserved) or any(head[name_at + n:pos + rec]):
                self._fail("NonZeroReserved", f"tensor record {i}")             # rule 11
            if code not in DTYPES:                                              # rule 12
                self._fail("UnknownDtype", f"tensor record {i}: dtype code {code}")
            if rank > MAX_RANK:                                                 # rule 13
                self._fail("BadRank", f"tensor record {i}: rank {rank}")
            problem = _name_problem(raw)
            if problem:                                                         # rule 14
                self._fail("BadName", f"tensor record {i}: name {problem}")
            name = raw.decode("utf-8")
            shape = [_u64(head, pos + 32 + 8 * d) for d in range(rank)]
            nonzero = DTYPES[code][1]
            for d in shape:
                nonzero *= d or 1
            if any(d > MAX_OFFSET for d in shape) or nonzero > MAX_OFFSET:      # rule 15
                self._fail("ShapeOverflow", f"tensor {name!r}")
            expected = 0 if 0 in shape else nonzero
            offset, length, checksum = _u64(head, pos + 8), _u64(head, pos + 16), _u64(head, pos + 24)
            if length != expected:                                              # rule 16
                self._fail("LengthMismatch", f"tensor {name!r}: {length} != {expected}")
            if alias:                                                           # rule 17, alias
                target = by_offset.get(offset) if length > 0 else None
                if target is None or (target.dtype, target.shape, target.checksum) != \
                        (DTYPES[code][0], shape, checksum):
                    self._fail("BadAlias", f"tensor {name!r} is no alias of an earlier tensor")
                self.tensors.append(TensorInfo(name, target.dtype, shape, offset, length, checksum,
                                               target.name))
                pos += rec
                continue
            if offset != cursor:                                                # rule 17
                self._fail("BadOffset", f"tensor {name!r} at {offset}, expected {cursor}")
            if _round_up(offset + length, a) > MAX_OFFSET:
                self._fail("Truncated", f"tensor {name!r} ends past 2^63")
            if first_past_end is None and offset + length > size:
                first_past_end = name
            cursor = _round_up(offset + length, a)
            self.tensors.append(TensorInfo(name, DTYPES[code][0], shape, offset, length, checksum))
            if length > 0:
                by_offset[offset] = self.tensors[-1]
            pos += rec
        self.metadata = {}
        pairs = []
        for j in range(m_count):
            if end - pos < 8:                                                   # rule 10
                self._fail("MalformedHeader", f"metadata record {j} runs past the header")
            k, v = _u32(head, pos), _u32(head, pos + 4)
            rec = 8 + _round_up(k + v, 8)
            if rec > end - pos:
                self._fail("MalformedHeader", f"metadata record {j} runs past the header")
            if any(head[pos + 8 + k + v:pos + rec]):                            # rule 11
                self._fail("NonZeroReserved", f"metadata record {j}")
            key, value = head[pos + 8:pos + 8 + k], head[pos + 8 + k:pos + 8 + k + v]
            problem = _name_problem(key)
            if problem:                                                         # rule 14
                self._fail("BadName", f"metadata key {problem}")
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                self._fail("BadName", "metadata value is not valid UTF-8")
            pairs.append((key.decode("utf-8"), value))
            pos += rec
        if pos != end:                                                          # rule 18
            self._fail("MalformedHeader", f"{end - pos} unused header bytes")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names) or len({k for k, _ in pairs}) != len(pairs):
            self._fail("DuplicateName", "a name or key appears twice")          # rule 19
        if first_past_end is not None:                                          # rule 20
            self._fail("Truncated", f"tensor {first_past_end!r} ends past the end of the file")
        if size < cursor:
            self._fail("Truncated", f"file is {size} bytes, its layout needs {cursor}")
        if size > cursor:
            self._fail("TrailingBytes", f"{size - cursor} bytes after the last tensor")
        self.metadata = dict(pairs)
        self._by_name = {t.name: t for t in self.tensors}

    def names(self):
        """The tensor names, in file order."""
        return [t.name for t in self.tensors]

    def __contains__(self, name):
        return name in self._by_name

    def info(self, name):
        """The TensorInfo of a name; TensorNotFound (kind NotFound) if the file lacks it."""
        t = self._by_name.get(name)
        if t is None:
            raise TensorNotFound("NotFound", f"{self.path}: no tensor named {name!r} "
                                 f"(the file holds {len(self.tensors)})")
        return t

    def array(self, name):
        """The tensor as a read-only numpy view into the mapping, in its shape. BF16 and
        FP8 come back as ml_dtypes views where ml_dtypes is installed, else as their raw
        bits (uint16, uint8)."""
        t = self.info(name)
        raw = self.bytes[t.offset:t.offset + t.byte_length]
        return raw.view(VIEW_DTYPES[t.dtype]).reshape(t.shape)

    def verify(self):
        """Rules 21 and 22: every padding byte is zero and every checksum matches, region
        by region in file order (the header's padding, then each tensor and its padding)."""
        a = self.alignment

        def check_padding(begin, end, after):
            if np.any(self.bytes[begin:end]):                                   # rule 21
                self._fail("NonZeroPadding", f"padding after {after}")

        check_padding(self.header_size, _round_up(self.header_size, a), "the header")
        for t in self.tensors:
            if t.alias_of is not None:  # its bytes and padding are its target's
                continue
            if xxh3_64(self.bytes[t.offset:t.offset + t.byte_length]) != t.checksum:     # rule 22
                self._fail("ChecksumMismatch", f"tensor {t.name!r} is corrupted")
            check_padding(t.offset + t.byte_length, _round_up(t.offset + t.byte_length, a), repr(t.name))

    def describe(self):
        """The file as `tensormap inspect --json` describes it."""
        return {
            "format": "tensormap",
            "version": f"{self.major}.{self.minor}",
            "alignment": self.alignment,
            "header_size": self.header_size,
            "file_size": self.file_size,
            "metadata": self.metadata,
            "tensors": [self._describe(t) for t in self.tensors],
        }

    @staticmethod
    def _describe(t):
        out = {"name": t.name, "dtype": t.dtype, "shape": t.shape, "offset": t.offset,
               "byte_length": t.byte_length, "checksum": f"{t.checksum:016x}"}
        if t.alias_of is not None:
            out["alias_of"] = t.alias_of
        return out


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print("usage: tensormap_reader.py FILE [--verify]")
        return 2
    try:
        f = TensormapFile(argv[1])
        if "--verify" in argv[2:]:
            f.verify()
    except TensormapError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(f.describe(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
