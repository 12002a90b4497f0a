"""Checks the pure-Python XXH3-64 of tensormap_reader against libxxhash, the reference
implementation, over every length path (0, 1-3, 4-8, 9-16, 17-128, 129-240, long)."""
import ctypes
import ctypes.util
import random
import sys

from tensormap_reader import xxh3_64


def main():
    name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
    lib = ctypes.CDLL(name)
    lib.XXH3_64bits.restype = ctypes.c_uint64
    lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    rng = random.Random(1)
    lengths = list(range(0, 300)) + [1023, 1024, 1025, 2047, 2048, 4096, 10000, 65536 + 13]
    failures = 0
    for n in lengths:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        want, got = lib.XXH3_64bits(data, n), xxh3_64(data)
        if want != got:
            failures += 1
            print(f"length {n}: libxxhash {want:016x}, python {got:016x}")
    assert xxh3_64(b"") == 0x2D06800538D394C2 and xxh3_64(b"abc") == 0x78AF5F94892F3950
    print(f"{len(lengths) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
