#!/usr/bin/python3
"""The training-checkpoint section of the suite: what a checkpoint costs a training job
that keeps computing while it saves, in one run, every strategy in a fresh process.

    bench/training.py [--mib 1024] [--rounds 3] [--out bench/results]
    bench/run_suite.py --training             # the same, from the suite

Strategies, interleaved round by round:
  tensormap-sync        tensormap.save: the job waits for the whole write;
  tensormap-background  tensormap.save(background=True): a fork takes the snapshot, a
                        child process writes it while training goes on;
  staging-copy          the approach of DCP's async_save, in plain torch: the state is
                        copied into a CPU staging buffer (the job waits for that), then
                        written by tensormap on a thread while training goes on;
  dcp-save, dcp-async   torch.distributed.checkpoint's save and async_save (world size 1,
                        gloo), where torch has them (2.3 and later: the Debian 13 run). On
                        CPU tensors, async_save stages nothing (its staging copies GPU
                        tensors to the CPU), so its checkpoint holds values written after
                        the call: the last column shows it.
"Training" is a step that writes every page of every parameter (p.add_), run in a loop
until the save has ended: the worst case for a copy-on-write snapshot. Reported: the time
the call blocks, the save's whole time, the steps that ran meanwhile, and the extra
memory the save held at its peak (for the fork: the child's private pages, which are the
pages training wrote meanwhile; for a staging copy: the buffer).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, os, sys, threading, time
import torch
import tensormap
from process_pages import private_kib, rss_anon_kib  # bench/, on the workers' path

strategy, folder, mib, writes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
per = 16 << 20  # bytes per parameter
model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per // 4)) for _ in range(mib * (1 << 20) // per)])
for p in model:
    p.requires_grad_(False)


activations = torch.randn(512, 512)


# Training steps until done(): with "continuous" writes, every parameter written again and
# again (the worst case for copy-on-write); with "step", 0.2 s of forward and backward (a
# matmul loop) and then one write of every parameter, as an optimizer's update.
def train_until(done, sample=None):
    steps, peak = 0, 0
    while not done():
        if writes == "step":
            until = time.perf_counter() + 0.2
            while time.perf_counter() < until and not done():
                activations.copy_(torch.tanh(activations @ activations) * 0.1)
                if sample:
                    peak = max(peak, sample())
        for i, p in enumerate(model):
            p.add_(1e-3)
            if sample and i % 4 == 3:  # the child's pages, sampled as the update goes
                peak = max(peak, sample())
        steps += 1
    return steps, peak


# What each parameter held at the call, to check the checkpoint against: sums in float64.
def sums(tensors):
    return [float(t.double().sum()) for t in tensors]


path = os.path.join(folder, "model")
at_call = sums(model)
base_kib = rss_anon_kib()
out = {}
if strategy == "tensormap-sync":
    t0 = time.perf_counter()
    tensormap.save(dict(model.named_parameters()), path + ".tmap")
    out["blocked"] = out["total"] = time.perf_counter() - t0
    out["steps"], out["extra_mib"] = 0, 0.0
elif strategy == "tensormap-background":
    t0 = time.perf_counter()
    handle = tensormap.save(dict(model.named_parameters()), path + ".tmap", background=True)
    out["blocked"] = time.perf_counter() - t0
    pid = handle.pid
    base = private_kib(pid)
    steps, peak = train_until(handle.done, lambda: private_kib(pid))
    handle.wait()
    out["total"] = time.perf_counter() - t0
    out["steps"], out["extra_mib"] = steps, max(0, peak - base) / 1024
elif strategy == "staging-copy":
    t0 = time.perf_counter()
    staged = {name: p.detach().clone() for name, p in model.named_parameters()}
    out["blocked"] = time.perf_counter() - t0
    writer = threading.Thread(target=tensormap.save, args=(staged, path + ".tmap"))
    writer.start()
    steps, peak = train_until(lambda: not writer.is_alive(), rss_anon_kib)
    writer.join()
    out["total"] = time.perf_counter() - t0
    out["steps"], out["extra_mib"] = steps, max(0, peak - base_kib) / 1024
elif strategy in ("dcp-save", "dcp-async"):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "store"), rank=0, world_size=1)
    state = {"model": dict(model.named_parameters())}
    t0 = time.perf_counter()
    if strategy == "dcp-save":
        dcp.save(state, checkpoint_id=path + ".dcp")
        out["blocked"] = out["total"] = time.perf_counter() - t0
        out["steps"], out["extra_mib"] = 0, 0.0
    else:
        future = dcp.async_save(state, checkpoint_id=path + ".dcp")
        out["blocked"] = time.perf_counter() - t0
        steps, peak = train_until(future.done, rss_anon_kib)
        future.result()
        out["total"] = time.perf_counter() - t0
        out["steps"], out["extra_mib"] = steps, max(0, peak - base_kib) / 1024
    saved = {"model": {name: torch.empty_like(p) for name, p in model.named_parameters()}}
    dcp.load(saved, checkpoint_id=path + ".dcp")
    out["snapshot"] = sums(saved["model"].values()) == at_call
    dist.destroy_process_group()
if strategy.startswith(("tensormap", "staging")):
    with tensormap.open(path + ".tmap") as saved:
        out["snapshot"] = sums(saved.get_tensor(name) for name, _ in model.named_parameters()) == at_call
print(json.dumps(out))
"""


def dcp_available(python):
    code = "import torch.distributed.checkpoint as d; print(hasattr(d, 'async_save'))"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "True"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/tensormap-bench")
    ap.add_argument("--python-package", default=os.path.join(ROOT, "build", "python"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    python = "/usr/bin/python3"
    env = dict(os.environ, USE_LIBUV="0",
               PYTHONPATH=os.pathsep.join([os.path.abspath(args.python_package), os.path.join(ROOT, "bench")]))
    # (strategy, how training writes): the background saves under both kinds of training.
    strategies = [("tensormap-sync", "step"), ("tensormap-background", "step"),
                  ("tensormap-background", "continuous"), ("staging-copy", "step")]
    if dcp_available(python):
        strategies += [("dcp-save", "step"), ("dcp-async", "step")]
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for rnd in range(args.rounds):
        for strategy, writes in strategies:
            folder = tempfile.mkdtemp(dir=args.work, prefix="training-")
            try:
                r = subprocess.run([python, "-c", WORKER, strategy, folder, str(args.mib), writes],
                                   capture_output=True, text=True, env=env, timeout=1800)
                if r.returncode != 0:
                    raise RuntimeError(f"{strategy}: {r.stderr.strip()[-2000:]}")
                row = json.loads(r.stdout.strip().splitlines()[-1])
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            row.update(strategy=strategy, writes=writes, round=rnd, mib=args.mib)
            print(json.dumps(row), flush=True)
            rows.append(row)
    release = "debian13" if dcp_available(python) else "debian12"
    torch_version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                   text=True).stdout.strip()
    med = {s: {k: statistics.median(r[k] for r in rows if (r["strategy"], r["writes"]) == s)
               for k in ("blocked", "total", "steps", "extra_mib")} for s in strategies}
    sync = med[("tensormap-sync", "step")]["total"]
    lines = [f"# Training checkpoints ({release}, torch {torch_version}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs)", "",
             f"A {args.mib} MiB model (parameters of 16 MiB), saved to local disk while training goes on; medians of {args.rounds} interleaved rounds, each strategy in a fresh process. "
             "Made by `bench/training.py` (or `bench/run_suite.py --training`).", "",
             "| strategy | training writes | blocks for (s) | vs a synchronous save | save ends after (s) "
             "| training steps meanwhile | extra memory at peak (MiB) | holds the values of the call |",
             "|---|---|---|---|---|---|---|---|"]
    for s in strategies:
        m = med[s]
        held = [r["snapshot"] for r in rows if (r["strategy"], r["writes"]) == s]
        lines.append(f"| {s[0]} | {s[1]} | {m['blocked']:.3f} | {m['blocked'] / sync:.3f}x | {m['total']:.2f} | "
                     f"{m['steps']:.0f} | {m['extra_mib']:.0f} | "
                     f"{'yes' if all(held) else 'no' if not any(held) else f'{sum(held)} of {len(held)}'} |")
    lines += ["", "`training writes`: `step`, 0.2 s of forward and backward (a matmul loop) then one write of "
              "every parameter, as an optimizer's update; `continuous`, every parameter written again and again, the "
              "worst case for copy-on-write.",
              "`blocks for`: how long the call kept training from going on. `extra memory`: for the "
              "background save, the child's private pages at their peak (the pages training wrote meanwhile); "
              "for the others, the process's own anonymous memory at its peak during the save, over what it held "
              "before. `holds the values of the call`: the checkpoint, read back, against sums of every parameter "
              "taken at the call (training changes them right after)."]
    write_results(args.out, "TRAINING", release, lines, rows)


def write_results(out, name, release, lines, rows):
    """<NAME>-<release>.md (the table) and <name>-<release>.json (every row) into `out`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}-{release}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, f"{name.lower()}-{release}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
