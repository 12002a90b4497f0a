"""Checks tensormap's torch.save reader against Python's torch.load (Debian's python3-torch).

For every fixture in tests/fixtures/torch_save, `tensormap convert` writes a tensormap and
a safetensors file; the tensormap file is read back with the numpy reference reader and
every tensor's bytes must equal what torch.load gives. Files that are not dicts of tensors
must be refused with exit 1. Usage: check_torch_save.py PATH/TO/tensormap
"""
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "format", "python"))
from tensormap_reader import TensormapFile  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "torch_save")


def flatten(value, prefix=""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    else:
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else k)


def raw(t):
    t = t.contiguous().reshape(-1)  # flat, so that a scalar can be viewed as bytes too
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def main(cli):
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        passed, failed = passed + ok, failed + (not ok)
        print(("ok   " if ok else "FAIL ") + what)

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("state_dict.pt", "all_dtypes.pt", "nested.pt", "shared_views.pt"):
            src = os.path.join(FIXTURES, name)
            expected = dict(flatten(torch.load(src)))
            out = os.path.join(tmp, name + ".tmap")
            run = subprocess.run([cli, "convert", src, out], capture_output=True, text=True)
            check(run.returncode == 0, f"convert {name} -> tensormap ({run.stderr.strip()})")
            if run.returncode:
                continue
            f = TensormapFile(out)
            f.verify()
            got = {t.name: t for t in f.tensors}
            check(list(got) == list(expected), f"{name}: same names in the same order")
            for key, tensor in expected.items():
                t = got.get(key)
                same = (t is not None and list(t.shape) == list(tensor.shape)
                        and bytes(f.bytes[t.offset:t.offset + t.byte_length]) == raw(tensor))
                check(same, f"{name}: '{key}' equals torch.load's, bit for bit")
            st = os.path.join(tmp, name + ".safetensors")
            back = os.path.join(tmp, name + ".back.tmap")
            ok = (subprocess.run([cli, "convert", src, st], capture_output=True).returncode == 0
                  and subprocess.run([cli, "convert", st, back], capture_output=True).returncode == 0
                  and subprocess.run([cli, "diff", out, back], capture_output=True).returncode == 0)
            check(ok, f"{name}: through safetensors and back, no differences")
            written = os.path.join(tmp, name + ".written.pt")
            run = subprocess.run([cli, "convert", out, written], capture_output=True, text=True)
            loaded = dict(flatten(torch.load(written))) if run.returncode == 0 else {}
            check(list(loaded) == list(expected) and all(
                loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and raw(loaded[k]) == raw(v)
                for k, v in expected.items()), f"{name}: the torch.save tensormap writes, torch.load reads back equal")
        for name in ("not_a_tensor.pt", "foreign_class.pt"):
            run = subprocess.run([cli, "inspect", os.path.join(FIXTURES, name)], capture_output=True, text=True)
            check(run.returncode == 1 and "UnsupportedArchive" in run.stderr and len(run.stderr.strip().splitlines()) == 1,
                  f"{name} is refused with one line: {run.stderr.strip()}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
