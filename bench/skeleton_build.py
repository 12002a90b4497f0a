"""How long building a model takes, and what it makes resident: a normal build (full random
initialisation), `tensormap.skeleton()`, and torch's meta device (`with torch.device("meta")`,
torch 2.x only), on torchvision models whose initialisation does arithmetic on weights
(trunc_normal_: swin, convnext) and ones whose does not (resnet50, vit_b_16).

Each build runs in a fresh child forked from a parent that imported torch and computed
nothing; the strategies alternate round by round (these VMs are noisy: compare within a run).

    bench/skeleton_build.py [--rounds 5] [--models swin_t,convnext_tiny,...] [--out FILE.md]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torchvision
from torchvision import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("TENSORMAP_PYTHON", os.path.join(ROOT, "build", "python")))
import tensormap  # noqa: E402

MIB = 1 << 20


def rss_anon():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def build(name, strategy):
    ctor = getattr(models, name)
    before = rss_anon()
    started = time.perf_counter()
    if strategy == "normal":
        model = ctor()
    elif strategy == "tensormap.skeleton()":
        with tensormap.skeleton():
            model = ctor()
    else:
        with torch.device("meta"):
            model = ctor()
    ms = (time.perf_counter() - started) * 1e3
    return {"ms": ms, "growth_mib": (rss_anon() - before) / MIB,
            "weights_mib": sum(t.numel() * t.element_size() for t in model.state_dict(keep_vars=True).values()) / MIB}


def in_child(name, strategy):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.write(write_end, json.dumps(build(name, strategy)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = os.read(read_end, 1 << 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    if not data:
        raise SystemExit(f"{name} {strategy}: the child failed")
    return json.loads(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="swin_t,convnext_tiny,inception_v3,resnet50,vit_b_16")
    ap.add_argument("--out", default="", help="also write the table to this Markdown file")
    args = ap.parse_args()
    strategies = ["normal", "tensormap.skeleton()"]
    if hasattr(torch, "device") and hasattr(torch.device, "__enter__"):
        strategies.append('torch.device("meta")')
    names = args.models.split(",")
    rows = {(n, s): [] for n in names for s in strategies}
    for _ in range(args.rounds):
        for n in names:
            for s in strategies:
                rows[(n, s)].append(in_child(n, s))
    head = (f"## Building a model: normal, skeleton, meta (torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, {platform.machine()}, medians of {args.rounds} interleaved rounds, "
            f"a fresh process each)\n\n"
            "| model | weights MiB | strategy | build ms | x meta | RssAnon growth MiB |\n|---|---:|---|---:|---:|---:|")
    lines = [head]
    for n in names:
        meta = rows.get((n, 'torch.device("meta")'))
        meta_ms = statistics.median(r["ms"] for r in meta) if meta else None
        for s in strategies:
            rs = rows[(n, s)]
            ms = statistics.median(r["ms"] for r in rs)
            ratio = f"{ms / meta_ms:.2f}" if meta_ms else "n/a"
            lines.append(f"| {n} | {rs[0]['weights_mib']:.0f} | {s} | {ms:.1f} | {ratio} | "
                         f"{statistics.median(r['growth_mib'] for r in rs):.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
