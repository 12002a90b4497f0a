"""Round trips through every pair of formats, for every dtype each pair can hold.

Formats: tensormap, safetensors, sharded tensormap, sharded safetensors, torch.save.
Every one of the 17 dtypes goes between the first four; torch.save (LibTorch 1.13) holds
the 12 that have a LibTorch dtype, so pairs with it use those. For every pair A -> B the
origin is converted to A, then A to B, and B must equal the origin bit for bit
(`tensormap diff` exits 0). Usage: check_round_trips.py PATH/TO/tensormap
"""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = os.path.join(ROOT, "format", "valid", "all_dtypes.tmap")
TORCH_DTYPES = os.path.join(ROOT, "tests", "fixtures", "torch_save", "all_dtypes.pt")

FORMATS = {  # name -> (file name, extra convert arguments)
    "tensormap": ("m.tmap", []),
    "safetensors": ("m.safetensors", []),
    "sharded tensormap": ("m.tmap.index.json", ["--shard-size", "200"]),
    "sharded safetensors": ("m.safetensors.index.json", ["--shard-size", "200"]),
    "torch.save": ("m.pt", []),
}


def main(cli):
    passed = failed = 0

    def run(*args):
        return subprocess.run([cli, *args], capture_output=True, text=True)

    for a in FORMATS:
        for b in FORMATS:
            origin = TORCH_DTYPES if "torch.save" in (a, b) else ALL
            with tempfile.TemporaryDirectory() as tmp:
                da, db = os.path.join(tmp, "a"), os.path.join(tmp, "b")
                os.mkdir(da)
                os.mkdir(db)
                pa = os.path.join(da, FORMATS[a][0])
                pb = os.path.join(db, FORMATS[b][0])
                steps = [run("convert", origin, pa, *FORMATS[a][1]), run("convert", pa, pb, *FORMATS[b][1]),
                         run("diff", origin, pb)]
                ok = all(s.returncode == 0 for s in steps)
                passed, failed = passed + ok, failed + (not ok)
                detail = "" if ok else " | ".join((s.stdout + s.stderr).strip()[:300] for s in steps if s.returncode)
                print(("ok   " if ok else "FAIL ") + f"{a} -> {b}" + (f": {detail}" if detail else ""))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
