"""Checks tensormap against the real safetensors library (Debian 13's python3-safetensors).

Both directions, bit for bit, every dtype the library writes with the running torch:
  - files written by safetensors.torch.save_file, with metadata, are verified, inspected
    and converted by tensormap; the tensormap file's bytes equal the library's tensors;
  - safetensors files written by tensormap (from a tensormap file, and from a torch.save
    archive) open with safe_open and load_file, with the same tensors and metadata;
  - get_slice on a tensormap-written file gives what slicing the tensor gives.
Exits 77 (CTest's "skipped") where the library is not installed: Debian 12 has no
package for it; scripts/test runs this inside the Debian 13 root.
Usage: check_safetensors_library.py PATH/TO/tensormap
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

try:
    import safetensors
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
except ImportError:
    print("skipped: the safetensors library is not installed (python3-safetensors, Debian 13)")
    sys.exit(77)

try:  # the package's version (Debian's 0.5.2 reports 0.4.5 in safetensors.__version__)
    from importlib.metadata import version as _version
    LIBRARY = _version("safetensors")
except Exception:
    LIBRARY = safetensors.__version__

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "format", "python"))
from tensormap_reader import TensormapFile  # noqa: E402

DTYPES = [("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"),
          ("I32", "int32"), ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"), ("F16", "float16"),
          ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"), ("C64", "complex64"),
          ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")]


def raw(t):
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sample(dtype, shape):
    values = torch.arange(-50, -50 + int(torch.tensor(shape).prod()), dtype=torch.float64) * 0.37
    if dtype == torch.bool:
        return (values.reshape(shape) > 0)
    if not dtype.is_floating_point and not dtype.is_complex:
        values = values.abs().round()
        return values.to(torch.int64).reshape(shape).to(dtype)
    return values.reshape(shape).to(dtype)


def cli_run(cli, *args):
    return subprocess.run([cli, *args], capture_output=True, text=True)


def main(cli):
    passed = failed = 0
    notes = []

    def check(ok, what):
        nonlocal passed, failed
        passed, failed = passed + ok, failed + (not ok)
        print(("ok   " if ok else "FAIL ") + what)

    with tempfile.TemporaryDirectory() as tmp:
        # Which dtypes this safetensors and this torch write.
        tensors, codes = {}, {}
        for code, name in DTYPES:
            dt = getattr(torch, name, None)
            if dt is None:
                notes.append(f"{code}: torch {torch.__version__} has no torch.{name}")
                continue
            t = sample(dt, (3, 5))
            try:
                save_file({"probe": t}, os.path.join(tmp, "probe.safetensors"))
            except Exception as e:  # the library refuses a dtype it does not know
                notes.append(f"{code}: safetensors {LIBRARY} does not write it ({e})")
                continue
            tensors[f"t_{code.lower()}"] = t
            codes[f"t_{code.lower()}"] = code
        tensors["scalar"] = torch.tensor(2.5)
        codes["scalar"] = "F32"
        tensors["empty"] = torch.zeros(0, 4)
        codes["empty"] = "F32"
        tensors["big"] = torch.randn(257, 129)
        codes["big"] = "F32"
        metadata = {"format": "pt", "author": "tensormap interop", "unicode": "µ-∑"}
        theirs = os.path.join(tmp, "theirs.safetensors")
        save_file(tensors, theirs, metadata=metadata)
        check(len(codes) >= 14, f"safetensors {LIBRARY} with torch {torch.__version__} writes "
                                f"{len(codes) - 3} dtypes: {sorted(set(codes.values()))}")

        # 1. Theirs, read by tensormap.
        run = cli_run(cli, "verify", theirs)
        check(run.returncode == 0, f"tensormap verify accepts the library's file ({run.stderr.strip()})")
        run = cli_run(cli, "inspect", "--json", theirs)
        desc = json.loads(run.stdout) if run.returncode == 0 else {"tensors": [], "metadata": {}}
        described = {t["name"]: t for t in desc["tensors"]}
        check(desc.get("metadata") == metadata, f"inspect shows the library's metadata: {desc.get('metadata')}")
        check(all(described.get(k, {}).get("dtype") == codes[k] and described[k]["shape"] == list(t.shape)
                  for k, t in tensors.items()), "inspect: every tensor's dtype and shape as the library wrote them")
        ours = os.path.join(tmp, "ours.tmap")
        run = cli_run(cli, "convert", theirs, ours)
        check(run.returncode == 0, f"convert the library's file to tensormap ({run.stderr.strip()})")
        if run.returncode == 0:
            f = TensormapFile(ours)
            f.verify()
            got = {t.name: t for t in f.tensors}
            for k, t in tensors.items():
                e = got.get(k)
                check(e is not None and e.dtype == codes[k] and list(e.shape) == list(t.shape)
                      and bytes(f.bytes[e.offset:e.offset + e.byte_length]) == raw(t),
                      f"{k} ({codes[k]}): tensormap's copy equals the library's tensor, bit for bit")
            check(dict(f.metadata) == metadata, "the tensormap file keeps the metadata")

        # 2. Ours, read by the library: from a tensormap file and from a torch.save archive.
        back = os.path.join(tmp, "back.safetensors")
        run = cli_run(cli, "convert", ours, back)
        check(run.returncode == 0, f"tensormap writes safetensors ({run.stderr.strip()})")
        archive = os.path.join(tmp, "model.pt")
        torch.save({k: v for k, v in tensors.items()}, archive)
        from_archive = os.path.join(tmp, "from_archive.safetensors")
        run = cli_run(cli, "convert", archive, from_archive)
        check(run.returncode == 0, f"tensormap converts a torch {torch.__version__} archive to safetensors "
                                   f"({run.stderr.strip()})")
        for path, want_meta in ((back, metadata), (from_archive, None)):
            label = os.path.basename(path)
            try:
                with safe_open(path, framework="pt") as sf:
                    keys = list(sf.keys())
                    meta = sf.metadata()
                    opened = {k: sf.get_tensor(k) for k in keys}
                    sliced = sf.get_slice("big")[10:20]
                loaded = load_file(path)
            except Exception as e:
                check(False, f"{label}: the library opens it ({e})")
                continue
            check(sorted(keys) == sorted(tensors), f"{label}: safe_open sees every tensor ({len(keys)})")
            if want_meta is not None:
                check(meta == want_meta, f"{label}: metadata kept: {meta}")
            for k, t in tensors.items():
                check(k in opened and opened[k].dtype == t.dtype and opened[k].shape == t.shape
                      and raw(opened[k]) == raw(t) and raw(loaded[k]) == raw(t),
                      f"{label}: {k} ({codes[k]}) through safe_open and load_file, bit for bit")
            check(torch.equal(sliced, tensors["big"][10:20]), f"{label}: get_slice gives the rows asked for")

    for n in notes:
        print("note:", n)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
