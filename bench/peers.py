#!/usr/bin/python3
"""The real peers, in Python, one loading strategy per process: bench/run_suite.py runs it.

    bench/peers.py make --dir D --mib N              the seed 002 store (dbm) beside the .pt
    bench/peers.py run --dir D --mib N --strategy S  prints one JSON object, as the harness

The model is the C++ harness's (bench/harness.cpp): N/64 blocks of Linear(2048, 4096),
Linear(4096, 2048) and LayerNorm(2048), with the same names, so every strategy loads the
same files the C++ strategies load. Every strategy ends with the same first use as the
harness: a sum of every weight (one full read), whose value must agree across strategies.

Strategies (torch 2.x needed where marked; on torch 1.13 they report why they cannot run):
  py-torch-load               build the model, torch.load, load_state_dict (the default)
  py-torch-mmap-assign        meta model, torch.load(mmap=True, weights_only=True),
                              load_state_dict(assign=True): PyTorch's low-memory recipe (2.1+)
  py-safetensors-load         build the model, safetensors load_file, load_state_dict
  py-safetensors-meta-assign  meta model, load_file, load_state_dict(assign=True) (2.1+)
  py-seed000                  seed 000 as written: build, to("meta"), torch.load, then one
                              new Parameter per key through its submodule
  py-seed002                  seed 002 as written: build, then load_state_dict from a dbm
                              store holding one pickle per key

    bench/peers.py forward --dir D --mib N --strategy S [--passes 5]
build, load, one forward pass at batch 1 (the first output) and more (the steady state), for
py-torch-load, py-torch-mmap-assign and py-safetensors-meta-assign: the harness's `forward`;
and for tensormap's own Python package (`import tensormap`, from TENSORMAP_PYTHON) on the
same files: py-tensormap-map, -meta-map, -background, -copy, -safetensors-map, -torchsave-map.
"""
import argparse
import dbm
import json
import os
import pickle
import sys
import time
from collections.abc import MutableMapping

import torch
from torch import nn

D, H = 2048, 4096
STRATEGIES = ["py-torch-load", "py-torch-mmap-assign", "py-safetensors-load", "py-safetensors-meta-assign",
              "py-seed000", "py-seed002"]
TORCH2 = int(torch.__version__.split(".")[0]) >= 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)
        self.norm = nn.LayerNorm(D)


def make_model(mib):
    return nn.ModuleList([Block() for _ in range(max(1, mib // 64))])


def memory():
    """VmHWM, RssAnon, RssFile (from status) and Pss (smaps_rollup), in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    out["Pss"] = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    return out


def record(row, prefix, m):
    row[f"{prefix}_hwm_mib"] = m["VmHWM"]
    row[f"{prefix}_anon_mib"] = m["RssAnon"]
    row[f"{prefix}_file_mib"] = m["RssFile"]
    row[f"{prefix}_pss_mib"] = m["Pss"]


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --- seed 002: the DBM store, as the seed writes it -------------------------------------------
class DBMStateDict(MutableMapping):
    def __init__(self, path):
        self.path = path
        self.db = dbm.open(path, "c")

    def __len__(self):
        return len(self.db.keys())

    def __getitem__(self, key):
        return pickle.loads(self.db[key])

    def __setitem__(self, key, value):
        self.db[key] = pickle.dumps(value)

    def __delitem__(self, key):
        return self.db.pop(key)

    def keys(self):
        return [k.decode() for k in self.db.keys()]

    def __iter__(self):
        return iter(self.keys())

    def __del__(self):
        self.db.close()


# --- seed 000: rebinding through submodules, as the seed writes it -----------------------------
def get_keys_to_submodule(model):
    keys_to_submodule = {}
    for submodule_name, submodule in model.named_modules():
        for param_name, _ in submodule.named_parameters():
            if len(param_name.split(".")) == 1:
                keys_to_submodule[f"{submodule_name}.{param_name}" if submodule_name else param_name] = submodule
    return keys_to_submodule


def load_state_dict_with_low_memory(model, state_dict):
    model.to(torch.device("meta"))
    for key, submodule in get_keys_to_submodule(model).items():
        val = state_dict[key]
        param_name = key.split(".")[-1]
        val = val.to(getattr(submodule, param_name).dtype)
        setattr(submodule, param_name, torch.nn.Parameter(val))


class Unavailable(Exception):
    """The strategy needs what this torch or this machine does not have."""


def meta_model(mib):
    if not TORCH2 or not hasattr(torch.device("meta"), "__enter__"):
        raise Unavailable(f"torch {torch.__version__} has no `with torch.device('meta')` (2.0+)")
    with torch.device("meta"):
        return make_model(mib)


def assign(model, state_dict):
    try:
        model.load_state_dict(state_dict, assign=True)
    except TypeError as e:
        raise Unavailable(f"torch {torch.__version__} has no load_state_dict(assign=True) (2.1+)") from e


def file_of(args, ext):
    return os.path.join(args.dir, f"model-{args.mib}.{ext}")


def run(args):
    s = args.strategy
    row = {"strategy": s, "mib": args.mib, "cache": "cold" if args.cold else "warm",
           "tensors": 6 * max(1, args.mib // 64), "touch_ms": 0.0, "torch": torch.__version__}
    reset_peak()
    record(row, "base", memory())
    model = None
    t0 = time.perf_counter()
    try:
        if s in ("py-torch-load", "py-safetensors-load", "py-seed000", "py-seed002"):
            model = make_model(args.mib)
        elif s in ("py-torch-mmap-assign", "py-safetensors-meta-assign"):
            model = meta_model(args.mib)
        else:
            raise SystemExit(f"unknown strategy {s}")
        row["build_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        if s == "py-torch-load":
            sd = torch.load(file_of(args, "pt"), **({"weights_only": True} if TORCH2 else {}))
            model.load_state_dict(sd)
            del sd
        elif s == "py-torch-mmap-assign":
            if "mmap" not in torch.load.__code__.co_varnames:
                raise Unavailable(f"torch {torch.__version__} has no torch.load(mmap=True) (2.1+)")
            assign(model, torch.load(file_of(args, "pt"), mmap=True, weights_only=True))
        elif s in ("py-safetensors-load", "py-safetensors-meta-assign"):
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise Unavailable("the safetensors library is not installed (python3-safetensors, Debian 13)") from e
            sd = load_file(file_of(args, "safetensors"))
            if s == "py-safetensors-load":
                model.load_state_dict(sd)
            else:
                assign(model, sd)
            del sd
        elif s == "py-seed000":
            load_state_dict_with_low_memory(model, torch.load(file_of(args, "pt")))
        elif s == "py-seed002":
            store = DBMStateDict(file_of(args, "dbm"))
            model.load_state_dict(store)
            row["note"] = f"dbm backend {dbm.whichdb(file_of(args, 'dbm'))}"
            del store
        row["load_ms"] = (time.perf_counter() - t0) * 1e3
    except Unavailable as e:  # this torch or this machine lacks what the strategy needs
        row.setdefault("build_ms", 0.0)
        row.setdefault("load_ms", 0.0)
        record(row, "loaded", memory())
        row["unavailable"] = str(e)
        print(json.dumps(row))
        return
    m = memory()
    record(row, "loaded", m)
    record(row, "touched", m)
    with torch.no_grad():
        t0 = time.perf_counter()
        total = 0.0
        for t in model.state_dict().values():
            total += float(t.sum())
        row["use_ms"] = (time.perf_counter() - t0) * 1e3
    record(row, "used", memory())
    row["check"] = total
    print(json.dumps(row))


def pmd_share(path):
    """The share of `path`'s bytes this process maps with 2 MiB entries (FilePmdMapped)."""
    real, kib, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0] if line.strip() else ""
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                inside = line.rstrip().endswith(real)
            elif inside and line.startswith("FilePmdMapped:"):
                kib += int(line.split()[1])
    return kib * 1024 / os.path.getsize(path)


# tensormap's Python package (import tensormap) on the same files as the peers: built under
# tensormap.skeleton() or on the meta device, map- or copy-loaded, with the background prefault.
TENSORMAP_FORWARD = {"py-tensormap-map": "tmap", "py-tensormap-meta-map": "tmap", "py-tensormap-background": "tmap",
                     "py-tensormap-copy": "tmap", "py-tensormap-safetensors-map": "safetensors",
                     "py-tensormap-torchsave-map": "pt"}


def import_tensormap():
    """The package of the build named by TENSORMAP_PYTHON (bench/run_suite.py sets it)."""
    if os.environ.get("TENSORMAP_PYTHON"):
        sys.path.insert(0, os.environ["TENSORMAP_PYTHON"])
    try:
        import tensormap
    except ImportError as e:
        raise Unavailable(f"the tensormap Python package is not built ({e})") from e
    return tensormap


def forward(args):
    """Build, load, one forward pass (the first output), then --passes more (steady state):
    the harness's `forward` command, for the Python peers and tensormap's Python package."""
    s = args.strategy
    row = {"strategy": s, "mib": args.mib, "cache": "cold" if args.cold else "warm", "torch": torch.__version__}
    files = {"py-torch-load": "pt", "py-torch-mmap-assign": "pt", "py-safetensors-meta-assign": "safetensors",
             **TENSORMAP_FORWARD}
    if s not in files:
        raise SystemExit(f"unknown strategy {s}")
    path = file_of(args, files[s])
    x = torch.ones(1, D)
    background = None
    with torch.no_grad():
        try:
            tm = import_tensormap() if s in TENSORMAP_FORWARD else None
            reset_peak()
            record(row, "base", memory())
            t0 = time.perf_counter()
            if s in ("py-tensormap-map", "py-tensormap-background", "py-tensormap-copy",
                     "py-tensormap-safetensors-map", "py-tensormap-torchsave-map"):
                with tm.skeleton():
                    model = make_model(args.mib)
            else:
                model = make_model(args.mib) if s == "py-torch-load" else meta_model(args.mib)
            row["build_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            if tm is not None:
                tm.load(model, path, mode="copy" if s == "py-tensormap-copy" else "map")
                if s == "py-tensormap-background":
                    background = tm.prefault_in_background(model)
            elif s == "py-torch-load":
                model.load_state_dict(torch.load(path, **({"weights_only": True} if TORCH2 else {})))
            elif s == "py-torch-mmap-assign":
                if "mmap" not in torch.load.__code__.co_varnames:
                    raise Unavailable(f"torch {torch.__version__} has no torch.load(mmap=True) (2.1+)")
                assign(model, torch.load(path, mmap=True, weights_only=True))
            else:
                try:
                    from safetensors.torch import load_file
                except ImportError as e:
                    raise Unavailable("the safetensors library is not installed (python3-safetensors, Debian 13)") from e
                assign(model, load_file(path))
            row["load_ms"] = (time.perf_counter() - t0) * 1e3
        except Unavailable as e:
            row["unavailable"] = str(e)
            print(json.dumps(row))
            return

        def once():
            y = x
            for block in model:
                y = block.norm(block.down(block.up(y)))
            return float(y.sum())

        t0 = time.perf_counter()
        first = once()
        row["first_forward_ms"] = (time.perf_counter() - t0) * 1e3
        if background is not None:
            background.wait()
        times = []
        for _ in range(args.passes):
            t0 = time.perf_counter()
            if once() != first:
                raise SystemExit("the forward pass is not deterministic")
            times.append((time.perf_counter() - t0) * 1e3)
    row["steady_forward_ms"] = sorted(times)[len(times) // 2] if times else 0.0
    row["file_pmd_share"] = pmd_share(path)
    record(row, "used", memory())
    row["check"] = first
    print(json.dumps(row))


def make(args):
    """The seed 002 store: one pickle per key, written from the torch.save file."""
    path = file_of(args, "dbm")
    if any(f.startswith(os.path.basename(path)) for f in os.listdir(args.dir)):
        return
    sd = torch.load(file_of(args, "pt"))
    tmp = path + ".partial"
    store = DBMStateDict(tmp)
    for k, v in sd.items():
        store[k] = v
    del store
    for f in os.listdir(args.dir):
        if f.startswith(os.path.basename(tmp)):
            os.rename(os.path.join(args.dir, f), os.path.join(args.dir, f.replace(".partial", "")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["make", "run", "forward"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--strategy")
    ap.add_argument("--cold", action="store_true", help="the suite evicted the files first")
    ap.add_argument("--passes", type=int, default=5, help="forward: steady-state passes after the first")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    {"make": make, "run": run, "forward": forward}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
