#!/usr/bin/python3
"""The distributed part of the training-checkpoint section: a model split across 2 ranks
(gloo on loopback), saved by every rank and loaded back at another world size, tensormap
against torch.distributed.checkpoint (DCP) in one run.

    bench/distributed.py [--mib 1024] [--rounds 4] [--out bench/results]
    bench/run_suite.py --training             # with bench/training.py

Each rank holds half of every weight (split along dimension 0: for DCP a DTensor with a
Shard(0) placement, which is how DCP learns the split; for tensormap the same splits
pattern as ParallelPlan). Strategies, interleaved round by round, each in fresh processes
that save twice (a training job saves every N steps: the second save is the steady state,
the first pays the process's first-call costs; both are reported):
  save        tensormap.save_distributed / dcp.save, at world size 2: the slowest rank's time;
  async save  save_distributed(background=True) / dcp.async_save: how long the call blocks,
              and whether the checkpoint holds the values of the call (training writes
              every weight right after it);
  reshard     the checkpoint saved at 2 loaded whole in one process (copy mode / dcp.load
              into the full-size tensors).
DCP rows need torch 2.6 (DTensor on CPU, async_save): the Debian 13 run.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from training import write_results  # noqa: E402

RANK = r"""
import json, os, sys, time, torch, torch.distributed as dist
import tensormap
from process_pages import private_kib, rss_anon_kib  # bench/, on the ranks' path
engine, action, folder, rank, world, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, f"store-{action}-{world}"), rank=rank,
                        world_size=world)
rows = 4096 * 2 // world
count = mib * (1 << 20) // (4096 * 2 * 1024 * 4)  # whole weights of [8192, 1024] F32, 32 MiB each


def sums(tensors):
    return [float(t.double().sum()) for t in tensors]


activations = torch.randn(512, 512)


def train_until(done, sample):
    # Training steps while the save runs: 0.2 s of compute (a matmul loop), then one write
    # of every weight, as an optimizer's update; the extra memory sampled as it goes.
    steps, peak = 0, sample()
    while True:
        until = time.perf_counter() + 0.2
        while time.perf_counter() < until and not done():
            activations.copy_(torch.tanh(activations @ activations) * 0.1)
            peak = max(peak, sample())
        for k, t in enumerate(local.values()):
            t.add_(1.0)
            if k % 4 == 3:
                peak = max(peak, sample())
        steps += 1
        if done():
            return steps, max(peak, sample())


def go_on(handle_pid, done, base_kib):
    # After an async save's call: training until the save has written (its steps, and the
    # extra memory at peak: a fork's child's own pages, else this process's growth).
    if handle_pid is not None:
        base = private_kib(handle_pid)
        steps, peak = train_until(done, lambda: private_kib(handle_pid))
        return steps, max(0, peak - base) / 1024
    steps, peak = train_until(done, rss_anon_kib)
    return steps, max(0, peak - base_kib) / 1024


def save_once(i, last):  # save number i of this process; last: check it holds the values of the call
    at_call = sums(local.values()) if last else None
    dist.barrier()
    base_kib = rss_anon_kib()
    t0 = time.perf_counter()
    if engine == "bare":  # the disk's limit: each rank's bytes written and made durable, no format
        with open(os.path.join(folder, f"bare-{rank}-{i}"), "wb") as f:
            for t in local.values():
                f.write(memoryview(t.numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        blocked = time.perf_counter() - t0
        return blocked, blocked, None, 0, 0.0
    if engine == "tensormap":
        index = os.path.join(folder, "ckpt.tmap.index.json")  # a later save replaces the one before
        handle = tensormap.save_distributed(local, index, [("*", 0)], background=action == "async")
        blocked = time.perf_counter() - t0
        steps, extra = 0, 0.0
        if handle is not None:
            child = handle._handle.pid if handle._handle is not None else None
            steps, extra = go_on(child, handle.done, base_kib)  # training goes on
            handle.wait()
        else:
            for t in local.values():
                t.add_(1.0)
        total = time.perf_counter() - t0
        if not last:
            return blocked, total, None, steps, extra
        with tensormap.open(index) as ckpt:
            mine = [ckpt.get_slice(f"w{i}")[rank * rows:(rank + 1) * rows] for i in range(count)]
        return blocked, total, sums(mine) == at_call, steps, extra
    path = os.path.join(folder, f"ckpt-{i}.dcp")
    if action == "async":
        future = dcp.async_save(state, checkpoint_id=path)
    elif action == "async-staged":  # what async_save does with tensors off the CPU: a copy first
        staged = {name: DTensor.from_local(t.to_local().clone(), mesh, [Shard(0)], run_check=False)
                  for name, t in state.items()}
        future = dcp.async_save(staged, checkpoint_id=path)
    else:
        dcp.save(state, checkpoint_id=path)
    blocked = time.perf_counter() - t0
    steps, extra = 0, 0.0
    if action != "save":
        steps, extra = go_on(None, future.done, base_kib)
        future.result()
    else:
        for t in local.values():
            t.add_(1.0)
    total = time.perf_counter() - t0
    if action == "async-staged":
        del staged  # the next save's base is without it
    if not last:
        return blocked, total, None, steps, extra
    back = {name: DTensor.from_local(torch.empty(rows, 1024), mesh, [Shard(0)], run_check=False) for name in local}
    dcp.load(back, checkpoint_id=path)
    return blocked, total, sums([back[f"w{i}"].to_local() for i in range(count)]) == at_call, steps, extra


out = {}
if action in ("save", "async", "async-staged"):
    torch.manual_seed(rank)
    local = {f"w{i}": torch.randn(rows, 1024) for i in range(count)}
    if engine == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        mesh = init_device_mesh("cpu", (world,))
        state = {name: DTensor.from_local(t, mesh, [Shard(0)], run_check=False) for name, t in local.items()}
    # Two saves per process, as a training job saves every N steps: the first pays the
    # process's first-call costs; the second is the steady state. Both are reported.
    first = save_once(0, False)
    blocked, total, snapshot, steps, extra = save_once(1, True)
    mine = {"blocked": blocked, "total": total, "snapshot": snapshot, "first_blocked": first[0],
            "first_total": first[1], "extra_mib": extra, "steps": steps}
    times = [None] * world
    dist.all_gather_object(times, mine)
    out = {key: max(t[key] for t in times) for key in ("blocked", "total", "first_blocked", "first_total", "extra_mib")}
    out["steps"] = min(t["steps"] for t in times)
    out["snapshot"] = all(t["snapshot"] for t in times)
elif action == "reshard":  # world size 1: the whole model from the checkpoint saved at 2
    whole = {f"w{i}": torch.empty(8192, 1024) for i in range(count)}
    t0 = time.perf_counter()
    if engine == "tensormap":
        module = torch.nn.Module()
        for name, t in whole.items():
            module.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        tensormap.load(module, os.path.join(folder, "ckpt.tmap.index.json"), mode="copy")
        whole = dict(module.named_parameters())
    else:
        import torch.distributed.checkpoint as dcp
        dcp.load(whole, checkpoint_id=os.path.join(folder, "ckpt-1.dcp"))
    out["total"] = out["blocked"] = time.perf_counter() - t0
    out["snapshot"] = None
if rank == 0:
    print(json.dumps(out), flush=True)
# Not destroy_process_group: on torch 2.6 it can deadlock when gloo's worker still holds the
# last reference to a tensor of the all_gather_object above (pytorch/pytorch#154976).
os._exit(0)
"""


def dcp_available(python):
    code = ("import torch.distributed.checkpoint as d, torch.distributed.tensor as t; "
            "print(hasattr(d, 'async_save') and hasattr(t, 'DTensor'))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "True"


def run(python, env, engine, action, folder, world, mib):
    procs = [subprocess.Popen([python, "-c", RANK, engine, action, folder, str(r), str(world), str(mib)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"{engine} {action}: {err.strip()[-2000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--work", default="/var/tmp/tensormap-bench")
    ap.add_argument("--python-package", default=os.path.join(ROOT, "build", "python"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    python = "/usr/bin/python3"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(args.python_package), os.path.join(ROOT, "bench")]),
               USE_LIBUV="0", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    engines = ["tensormap"] + (["dcp"] if dcp_available(python) else [])
    os.makedirs(args.work, exist_ok=True)
    rows = []
    strategies = engines + ["bare"]
    for rnd in range(args.rounds):
        # The order turns round by round: on a VM, a write into pages just freed (the last
        # strategy's files removed) runs faster than one into pages not touched for a while.
        turn = rnd % len(strategies)
        for engine in strategies[turn:] + strategies[:turn]:
            folder = tempfile.mkdtemp(dir=args.work, prefix="distributed-")
            try:
                for action, world in (("save", 2), ("reshard", 1), ("async", 2), ("async-staged", 2)):
                    if (engine == "bare" and action != "save") or (engine != "dcp" and action == "async-staged"):
                        continue
                    row = run(python, env, engine, action, folder, world, args.mib)
                    row.update(engine=engine, action=action, round=rnd, mib=args.mib)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    release = "debian13" if "dcp" in engines else "debian12"
    torch_version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                   text=True).stdout.strip()

    def med(engine, action, key):
        return statistics.median(r[key] for r in rows if r["engine"] == engine and r["action"] == action)

    lines = [f"# Distributed checkpoints ({release}, torch {torch_version}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs)", "",
             f"A {args.mib} MiB model of [8192, 1024] F32 weights, each split along dimension 0 across 2 ranks "
             f"(gloo, loopback, local disk); medians of {args.rounds} interleaved rounds, fresh processes each. "
             "Each process saves twice, as a training job saves every N steps: the rows give the second "
             "save (the steady state), and a first save's blocking time below it. "
             "Made by `bench/distributed.py` (or `bench/run_suite.py --training`).", "",
             "| what | " + " | ".join(engines) + (" | tensormap vs DCP |" if "dcp" in engines else " |"),
             "|---|" + "---|" * len(engines) + ("---|" if "dcp" in engines else "")]
    def held(engine, action):
        got = [r["snapshot"] for r in rows if r["engine"] == engine and r["action"] == action]
        return "yes" if all(got) else "no" if not any(got) else f"{sum(got)} of {len(got)}"

    for label, action, key in (("save at world size 2 (s)", "save", "total"),
                               ("... the first save of a process (s)", "save", "first_total"),
                               ("async save: the call blocks for (s)", "async", "blocked"),
                               ("... the first save of a process (s)", "async", "first_blocked"),
                               ("async save: ends after (s)", "async", "total"),
                               ("async save: training steps meanwhile (the slower rank)", "async", "steps"),
                               ("async save: extra memory at peak, per rank (MiB)", "async", "extra_mib"),
                               ("reshard: load the save of 2 ranks in one process (s)", "reshard", "total")):
        values = [med(e, action, key) for e in engines]
        cells = [f"{v:.0f}" if key in ("steps", "extra_mib") else f"{v:.3f}" for v in values]
        ratio = f" {values[0] / values[1]:.2f}x |" if len(values) > 1 and values[1] > 0 else ""
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    lines.append("| async save holds the values of the call | " + " | ".join(held(e, "async") for e in engines)
                 + (" | |" if len(engines) > 1 else " |"))
    if "dcp" in engines:
        for label, key in (("async save, DCP staging a copy first (as it does off the CPU): the call blocks for (s)",
                            "blocked"), ("... the first save of a process (s)", "first_blocked")):
            ours, theirs = med("tensormap", "async", key), med("dcp", "async-staged", key)
            lines.append(f"| {label} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f}x |")
        ours, theirs = med("tensormap", "async", "extra_mib"), med("dcp", "async-staged", "extra_mib")
        lines.append(f"| ... extra memory at peak, per rank (MiB) | {ours:.0f} | {theirs:.0f} | "
                     f"{ours / theirs:.2f}x |" if theirs > 0 else f"| ... extra memory at peak, per rank (MiB) | "
                     f"{ours:.0f} | {theirs:.0f} | |")
        lines.append(f"| ... and holds the values of the call | {held('tensormap', 'async')} | "
                     f"{held('dcp', 'async-staged')} | |")
    bare, bare_first = med("bare", "save", "total"), med("bare", "save", "first_total")
    lines += ["", f"The disk's limit, in the same rounds: each rank writes its bytes to a file of its own and "
              f"fsyncs it, no format, in {bare:.3f} s ({bare_first:.3f} s the first time in a process: a second "
              "save writes while the kernel still writes the first's pages back); the saves take "
              + ", ".join(f"{e} {med(e, 'save', 'total') / bare:.2f}x ({med(e, 'save', 'first_total') / bare_first:.2f}x)"
                          for e in engines) + " that.",
              ""]
    check = ("After an async save's call, training goes on until the save is written: steps of 0.2 s of compute "
             "(a matmul loop), then 1 added to every weight, as an optimizer's update. The check: the checkpoint "
             "read back against every weight's sum at the call. Extra memory: for tensormap, the child's own "
             "pages at their peak (the pages training wrote before they were saved); for DCP, the rank's growth "
             "in anonymous memory (the staged copy, if any).")
    if "dcp" in engines:
        lines.append("`tensormap vs DCP`: tensormap's figure over DCP's (below 1: tensormap takes less). " + check
                     + " DCP's async_save copies only tensors off the CPU (its caching stager wants pinned memory, "
                     "which a CPU-only torch refuses: \"Cannot access accelerator device\"), so on CPU it writes "
                     "what training changed.")
    else:
        lines.append(check + " DCP's rows need torch 2.6: the Debian 13 run.")
    write_results(args.out, "DISTRIBUTED", release, lines, rows)


if __name__ == "__main__":
    main()
