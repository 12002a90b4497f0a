"""Checks tensormap's torch.save reader against Python's torch.load (the system's torch:
1.13 on Debian 12, 2.6 on Debian 13).

For every fixture in tests/fixtures/torch_save, and for archives this script writes with
the running torch (every dtype it has, float8 and uint16 included on torch 2.x, and a
training checkpoint), `tensormap convert` writes a tensormap and a safetensors file; the
tensormap file is read back with the numpy reference reader and every tensor's bytes must
equal what torch.load gives. Values that are not tensors are skipped and listed, and no
class in a file is ever called. Usage: check_torch_save.py PATH/TO/tensormap
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "format", "python"))
from tensormap_reader import TensormapFile  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "torch_save")
TORCH2 = int(torch.__version__.split(".")[0]) >= 2
MMAP = TORCH2 and "mmap" in torch.load.__code__.co_varnames
# torch 2.6 loads only weights by default; the reference load here reads a test's own files.
LOAD_ARGS = {"weights_only": False} if TORCH2 else {}
DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
               torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
               torch.float64: "F64", torch.complex64: "C64", torch.complex128: "C128"}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_NAMES[getattr(torch, _name)] = _code


def flatten(value, prefix=""):
    """Every tensor in nested dicts, lists and tuples, named as tensormap names them."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}.{i}" if prefix else str(i))


class Explodes:
    """Unpickling this would run a shell command: a reader that executes it fails the check."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def every_dtype():
    """One tensor of every dtype this torch has and tensormap stores."""
    base = torch.arange(-6, 6, dtype=torch.float64).reshape(3, 4) * 1.5
    names = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32",
             "float64", "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn",
             "float8_e5m2"]
    out = collections.OrderedDict()
    for name in names:
        dt = getattr(torch, name, None)
        if dt is None:
            continue  # torch 1.13 has no uint16..64 or float8
        if name.startswith("uint") and name != "uint8":
            out[name] = torch.arange(12, dtype=torch.int64).reshape(3, 4).to(dt)
        else:
            out[name] = base.to(dt)
    return out


def training_checkpoint():
    """What a training loop saves: model, optimizer state, plain values, an object."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "best_loss": 0.25, "args": argparse.Namespace(lr=1e-3, name="run-7")}


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
        written_here = os.path.join(tmp, "every_dtype.pt")
        torch.save(every_dtype(), written_here)
        checkpoint = os.path.join(tmp, "training_checkpoint.pt")
        torch.save(training_checkpoint(), checkpoint)
        sources = [os.path.join(FIXTURES, n) for n in
                   ("state_dict.pt", "all_dtypes.pt", "nested.pt", "shared_views.pt", "not_a_tensor.pt",
                    "foreign_class.pt")] + [written_here, checkpoint]
        for src in sources:
            name = os.path.basename(src)
            expected = dict(flatten(torch.load(src, **LOAD_ARGS)))
            out = os.path.join(tmp, name + ".tmap")
            run = subprocess.run([cli, "convert", src, out], capture_output=True, text=True)
            check(run.returncode == 0, f"convert {name} -> tensormap ({run.stderr.strip()})")
            if run.returncode:
                continue
            f = TensormapFile(out)
            f.verify()
            got = {t.name: t for t in f.tensors}
            check(list(got) == list(expected), f"{name}: same names in the same order ({len(expected)} tensors)")
            for key, tensor in expected.items():
                t = got.get(key)
                same = (t is not None and list(t.shape) == list(tensor.shape)
                        and t.dtype == DTYPE_NAMES[tensor.dtype]
                        and bytes(f.bytes[t.offset:t.offset + t.byte_length]) == raw(tensor))
                check(same, f"{name}: '{key}' ({tensor.dtype}) equals torch.load's, bit for bit")
            st = os.path.join(tmp, name + ".safetensors")
            back = os.path.join(tmp, name + ".back.tmap")
            ok = (subprocess.run([cli, "convert", src, st], capture_output=True).returncode == 0
                  and subprocess.run([cli, "convert", st, back], capture_output=True).returncode == 0
                  and subprocess.run([cli, "diff", out, back], capture_output=True).returncode == 0)
            check(ok, f"{name}: through safetensors and back, no differences")
            written = os.path.join(tmp, name + ".written.pt")
            run = subprocess.run([cli, "convert", out, written], capture_output=True, text=True)
            loaded = dict(flatten(torch.load(written, **LOAD_ARGS))) if run.returncode == 0 else {}
            check(list(loaded) == list(expected) and all(
                loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and raw(loaded[k]) == raw(v)
                for k, v in expected.items()), f"{name}: the torch.save tensormap writes, torch.load reads back equal")
            if MMAP:  # torch 2.x: the archive tensormap writes maps with torch's own loader too
                mapped = dict(flatten(torch.load(written, mmap=True, weights_only=True)))
                check(list(mapped) == list(expected) and all(raw(mapped[k]) == raw(v) for k, v in expected.items()),
                      f"{name}: torch.load(mmap=True, weights_only=True) reads tensormap's archive, bit for bit")

        # What is not a tensor is skipped and listed, by name.
        run = subprocess.run([cli, "inspect", "--json", checkpoint], capture_output=True, text=True)
        skipped = {s["name"]: s["value"] for s in json.loads(run.stdout).get("skipped", [])} if run.returncode == 0 else {}
        check(skipped.get("epoch") == "the int 3" and skipped.get("best_loss") == "a float"
              and "'argparse.Namespace' (not executed)" in skipped.get("args", "")
              and "optimizer.param_groups.0.lr" in skipped,
              f"training checkpoint: plain values and objects are listed as skipped ({sorted(skipped)[:6]}...)")

        # A class whose unpickling would run a command is never called.
        marker = os.path.join(tmp, "it-ran")
        hostile = os.path.join(tmp, "hostile.pt")
        torch.save({"w": torch.ones(3), "payload": Explodes(marker)}, hostile)
        run = subprocess.run([cli, "inspect", "--json", hostile], capture_output=True, text=True)
        listed = json.loads(run.stdout) if run.returncode == 0 else {}
        check(run.returncode == 0 and not os.path.exists(marker)
              and [t["name"] for t in listed["tensors"]] == ["w"]
              and "system' (not executed)" in listed["skipped"][0]["value"],
              f"a pickle that would run a command: its tensor is read, the command never runs ({run.stderr.strip()})")

        # A tensor of a dtype tensormap does not store is skipped and listed, never misread.
        odd = {"w": torch.ones(2)}
        path = os.path.join(tmp, "odd_dtypes.pt")
        for name in ("complex32", "float8_e4m3fnuz", "float8_e5m2fnuz"):
            try:  # whichever this torch can save (torch 1.13 saves none of them)
                torch.save({name: torch.zeros(2, dtype=getattr(torch, name))}, path)
                odd[name] = torch.zeros(2, dtype=getattr(torch, name))
            except (AttributeError, KeyError, RuntimeError):
                pass
        torch.save(odd, path)
        run = subprocess.run([cli, "inspect", "--json", path], capture_output=True, text=True)
        listed = json.loads(run.stdout) if run.returncode == 0 else {"tensors": [], "skipped": []}
        skipped = {s["name"]: s["value"] for s in listed.get("skipped", [])}
        check([t["name"] for t in listed["tensors"]] == ["w"] and set(skipped) == set(odd) - {"w"}
              and all("a dtype tensormap does not store" in v for v in skipped.values()),
              f"tensors of dtypes tensormap does not store are skipped and listed: {skipped} {run.stderr.strip()}")

        # Tied weights, as a language model ties its embedding and output head: torch.save
        # stores one storage for both names; tensormap stores the bytes once (format 2.0,
        # an alias) and writes them back as one storage, which torch.load sees tied.
        torch.manual_seed(0)
        lm = torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 512, bias=False))
        lm[1].weight = lm[0].weight
        tied_pt = os.path.join(tmp, "tied.pt")
        torch.save(lm.state_dict(), tied_pt)
        tied_tmap = os.path.join(tmp, "tied.tmap")
        run = subprocess.run([cli, "convert", tied_pt, tied_tmap], capture_output=True, text=True)
        f = TensormapFile(tied_tmap) if run.returncode == 0 else None
        weight_bytes = 512 * 64 * 4
        check(f is not None and f.major == 2 and f.info("1.weight").alias_of == "0.weight"
              and os.path.getsize(tied_tmap) < 2 * weight_bytes
              and bytes(f.array("1.weight").tobytes()) == raw(lm[0].weight.detach()),
              f"tied weights: stored once in the tensormap file ({os.path.getsize(tied_tmap) if f else 0} bytes "
              f"for two names of {weight_bytes}) {run.stderr.strip()}")
        back_pt = os.path.join(tmp, "tied.back.pt")
        run = subprocess.run([cli, "convert", tied_tmap, back_pt], capture_output=True, text=True)
        loaded = torch.load(back_pt, **LOAD_ARGS) if run.returncode == 0 else {}
        check(run.returncode == 0 and loaded["0.weight"].data_ptr() == loaded["1.weight"].data_ptr()
              and torch.equal(loaded["1.weight"], lm[0].weight.detach()),
              f"tied weights: written back as one storage, torch.load ties them ({run.stderr.strip()})")

        # A TorchScript archive (torch.jit.save; LibTorch's torch::save writes the same kind):
        # read by the names named_parameters/named_buffers give, its code never read.
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        scripted = os.path.join(tmp, "scripted.pt")
        torch.jit.save(torch.jit.script(net), scripted)
        run = subprocess.run([cli, "inspect", "--json", scripted], capture_output=True, text=True)
        names = [t["name"] for t in json.loads(run.stdout)["tensors"]] if run.returncode == 0 else []
        expected = [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
        check(sorted(names) == sorted(expected),
              f"a torch.jit.save archive reads by parameter and buffer names: {names} {run.stderr.strip()}")

        # Nothing but values that are not tensors: refused with one line.
        for value in (3, {"epoch": 3, "lr": 0.1}):
            path = os.path.join(tmp, "no_tensor.pt")
            torch.save(value, path)
            run = subprocess.run([cli, "inspect", path], capture_output=True, text=True)
            check(run.returncode == 1 and "UnsupportedArchive" in run.stderr and "no tensor" in run.stderr
                  and len(run.stderr.strip().splitlines()) == 1, f"{value!r} is refused with one line: {run.stderr.strip()}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
