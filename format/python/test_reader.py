"""What a user of the Python reader relies on beyond conformance: a missing name is a
TensormapError of kind NotFound (and a KeyError), and every dtype, BF16 and FP8 included,
comes back as a view in the tensor's shape holding the file's bytes."""
import os
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from generate import build  # noqa: E402
from tensormap_reader import TensormapError, TensormapFile  # noqa: E402

FAILURES = []


def check(ok, what):
    if not ok:
        FAILURES.append(what)
        print(f"FAIL {what}")


def main():
    # BF16 1.0, -2.0, 0.5, 3.0, 1.5, -0.25: the high halves of the F32 bit patterns.
    bf16_values = [1.0, -2.0, 0.5, 3.0, 1.5, -0.25]
    bf16 = b"".join(struct.pack("<f", v)[2:] for v in bf16_values)
    f8 = bytes(range(24))
    data = build([("emb.weight", "BF16", [2, 3], bf16), ("scale", "F8_E4M3", [2, 3, 4], f8),
                  ("bias", "F32", [3], struct.pack("<3f", 1, 2, 3)), ("empty", "BF16", [0, 5])])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.tmap")
        with open(path, "wb") as out:
            out.write(data)
        f = TensormapFile(path)
        f.verify()
        check(f.names() == ["emb.weight", "scale", "bias", "empty"], "names() in file order")
        check("bias" in f and "nope" not in f, "membership")

        for missing in ("nope", "", "emb.weight "):
            try:
                f.array(missing)
                check(False, f"array({missing!r}) returned")
            except TensormapError as e:
                check(e.kind == "NotFound" and isinstance(e, KeyError), f"{missing!r}: kind {e.kind}")
                check(repr(missing) in str(e) and path in str(e), f"message names file and tensor: {e}")
            except Exception as e:  # noqa: BLE001 - any other type is the failure tested
                check(False, f"array({missing!r}) raised {type(e).__name__}, not TensormapError")

        w = f.array("emb.weight")
        check(w.shape == (2, 3), f"BF16 shape {w.shape}")
        check(not w.flags.writeable, "views are read-only")
        bits = w.view(np.uint16) if w.dtype != np.uint16 else w
        widened = (bits.astype(np.uint32) << 16).view(np.float32)
        check(widened.ravel().tolist() == bf16_values, f"BF16 values {widened.ravel().tolist()}")
        try:
            import ml_dtypes
            check(w.dtype == ml_dtypes.bfloat16, f"BF16 dtype with ml_dtypes: {w.dtype}")
            check(w.astype(np.float32).ravel().tolist() == bf16_values, "ml_dtypes BF16 values")
        except ImportError:
            check(w.dtype == np.uint16, f"BF16 dtype without ml_dtypes: {w.dtype}")

        s = f.array("scale")
        check(s.shape == (2, 3, 4) and s.itemsize == 1, f"F8 shape {s.shape}")
        check(bytes(s.view(np.uint8).ravel()) == f8, "F8 bytes")
        b = f.array("bias")
        check(b.dtype == np.float32 and b.tolist() == [1, 2, 3], f"F32 {b}")
        check(f.array("empty").shape == (0, 5), "an empty BF16 tensor keeps its shape")
        del f, w, s, b
    print(f"{'FAILED' if FAILURES else 'ok'}: {len(FAILURES)} failures")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
