#!/usr/bin/python3
"""The whole benchmark suite in one command: tensormap against the real peers (torch's
torch.load, with and without mmap=True + assign=True, and the safetensors library),
LibTorch's own loaders and the two seed recipes, on the same files, in one run.

    bench/run_suite.py [--quick] [--sizes 256,1024,4096] [--out bench/results] [--remote] [--training]
    scripts/debian13 bench/run_suite.py     # on Debian 12: the run with torch 2.6 peers

Every measurement runs in a fresh process: C++ strategies in build/bench/tensormap_harness,
Python ones in bench/peers.py under /usr/bin/python3. Every strategy ends with the same
first use, a sum of every weight. Writes results.json, RESULTS.md (tables, ratios to the
best peer, targets) and plot.png (time and peak memory against model size, one line per
strategy) into the results folder. --quick: 256 MiB only, a few minutes at most. The
peers that need torch 2.1+ or safetensors are reported as unavailable on Debian 12.
"""
import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = [
    "tensormap-map", "tensormap-map-naive-touch", "tensormap-copy", "tensormap-copy-keep-cache",
    "tensormap-copy-verified", "safetensors-map",
    "torchsave-map", "torch-load", "torch-pickle-load", "seed-load-then-rebind",
]
# bench/peers.py, in Python: the real libraries users load with today, and the seeds.
PY_STRATEGIES = ["py-torch-load", "py-torch-mmap-assign", "py-safetensors-load", "py-safetensors-meta-assign",
                 "py-seed000", "py-seed002"]
PEERS = ["py-torch-load", "py-torch-mmap-assign", "py-safetensors-load", "py-safetensors-meta-assign"]
FILE_OF = {"tensormap-map": "tmap", "tensormap-map-naive-touch": "tmap", "tensormap-copy": "tmap",
           "tensormap-copy-keep-cache": "tmap", "tensormap-copy-verified": "tmap",
           "safetensors-map": "safetensors", "torchsave-map": "pt", "torch-load": "archive",
           "torch-pickle-load": "pt", "seed-load-then-rebind": "archive", "py-torch-load": "pt",
           "py-torch-mmap-assign": "pt", "py-safetensors-load": "safetensors",
           "py-safetensors-meta-assign": "safetensors", "py-seed000": "pt", "py-seed002": "dbm",
           "tensormap-map-prefault": "tmap", "tensormap-map-background": "tmap"}
# The forward section: build + load + first forward pass (time to first output), then the
# steady state, interleaved over rounds. "-cp": the .tmap copied with cp first (cached in
# the folios cp's writes made); "-cp-warmed": that copy after `tensormap warm`.
FORWARD = ["tensormap-map", "tensormap-map-prefault", "tensormap-map-background", "tensormap-map-cp", "tensormap-map-cp-warmed",
           "tensormap-copy", "torchsave-map", "safetensors-map", "torch-load"]
PY_FORWARD = ["py-torch-load", "py-torch-mmap-assign", "py-safetensors-meta-assign"]
# tensormap's Python package, on the same files as the Python peers (bench/peers.py).
PY_TENSORMAP = ["py-tensormap-map", "py-tensormap-meta-map", "py-tensormap-background", "py-tensormap-copy",
                "py-tensormap-safetensors-map", "py-tensormap-torchsave-map"]
FILE_OF.update({"py-tensormap-map": "tmap", "py-tensormap-meta-map": "tmap", "py-tensormap-background": "tmap",
                "py-tensormap-copy": "tmap", "py-tensormap-safetensors-map": "safetensors",
                "py-tensormap-torchsave-map": "pt"})
# Passes of the paired comparison: a map strategy's weights copied into owned memory in the
# same process, alternating pass by pass (bench/harness.cpp, --paired).
PAIRED = 9
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
PEERS_SCRIPT = os.path.join(ROOT, "bench", "peers.py")


def files_of(work, mib, strategy):
    """The files a strategy reads: one, or a dbm store's several."""
    stem = f"model-{mib}.{FILE_OF[strategy]}"
    return sorted(os.path.join(work, f) for f in os.listdir(work) if f == stem or f.startswith(stem + "."))


def total_ms(row):
    return row["build_ms"] + row["load_ms"] + row["touch_ms"] + row["use_ms"]


def harness(exe, *args, stdin=None):
    cmd = [PYTHON, PEERS_SCRIPT, *args] if exe == "peers" else [exe, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, input=stdin, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def mapping_pss(pid, path):
    """Pss and Rss in MiB of a process's mappings of `path`, from /proc/<pid>/smaps."""
    pss = rss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0] if line.strip() else ""
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Pss:"):
                pss += int(line.split()[1])
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return pss / 1024, rss / 1024


def sharing(exe, work, mib, n=4):
    path = os.path.join(work, f"model-{mib}.tmap")
    procs = [subprocess.Popen([exe, "hold", "--dir", work, "--mib", str(mib)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a holding process failed")
        figures = [mapping_pss(p.pid, path) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
    return {"processes": n, "file_mib": os.path.getsize(path) / 2**20,
            "total_pss_mib": sum(f[0] for f in figures), "rss_each_mib": [f[1] for f in figures]}


def forward_section(exe, work, mib, rounds, cli):
    """Every FORWARD, PY_FORWARD and PY_TENSORMAP strategy, `rounds` times interleaved, warm
    and cold."""
    rows = []
    copy = os.path.join(work, f"model-{mib}.cp.tmap")
    for rnd in range(rounds):
        for cache in ("warm", "cold"):
            for s in FORWARD + PY_FORWARD + PY_TENSORMAP:
                args = ["--dir", work, "--mib", str(mib), "--passes", "7"]
                warm_ms = None
                if s.startswith("tensormap-map-cp"):
                    if os.path.exists(copy):
                        os.remove(copy)
                    subprocess.run(["cp", os.path.join(work, f"model-{mib}.tmap"), copy], check=True)
                    args += ["--file", copy]
                    if s.endswith("-warmed"):
                        t0 = time.time()
                        subprocess.run([cli, "warm", copy], check=True, capture_output=True)
                        warm_ms = (time.time() - t0) * 1e3
                python = s in PY_FORWARD or s in PY_TENSORMAP
                if cache == "warm" and not s.startswith("tensormap-map-cp"):
                    # The same page cache for every strategy: the file evicted, then read once
                    # from the disk with read(), in the folios the kernel's read-ahead makes
                    # (left as they are, a previous strategy's own faults would decide them).
                    for f in files_of(work, mib, s):
                        harness(exe, "seqread", "--file", f, "--cold")
                if cache == "cold":
                    if python:
                        for f in files_of(work, mib, s):
                            harness(exe, "evict", "--file", f)
                    else:
                        args.append("--cold")
                name = "tensormap-map" if s.startswith("tensormap-map-cp") else s
                if not python:
                    args += ["--paired", str(PAIRED)]
                row = harness("peers" if python else exe, "forward", *args, "--strategy", name)[0]
                row.update({"strategy": s, "round": rnd, "cache": cache})
                if warm_ms is not None:
                    row["warm_ms"] = warm_ms
                rows.append(row)
                print(f"   forward {cache} {s}: " + (f"unavailable: {row['unavailable']}" if "unavailable" in row else
                      f"first output {first_output_ms(row):.0f} ms, steady {row['steady_forward_ms']:.0f} ms, "
                      f"2 MiB-mapped {100 * row['file_pmd_share']:.0f}%"), file=sys.stderr)
    if os.path.exists(copy):
        os.remove(copy)
    return rows


def first_output_ms(row):
    return row["build_ms"] + row["load_ms"] + row["first_forward_ms"]


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def forward_medians(rows, strategies, cache, extra):
    """Per strategy, in one cache state: the medians over rounds of build, load, first forward
    and first output, and of each extra figure (name: function of a row); or why it was
    unavailable."""
    med = {}
    for s in strategies:
        mine = [x for x in rows if x["strategy"] == s and x["cache"] == cache]
        if not mine:
            continue
        if any("unavailable" in x for x in mine):
            med[s] = {"unavailable": mine[0]["unavailable"]}
            continue
        figures = {"build_ms": lambda x: x["build_ms"], "load_ms": lambda x: x["load_ms"],
                   "first_forward_ms": lambda x: x["first_forward_ms"], "first_output_ms": first_output_ms, **extra}
        med[s] = {k: median([f(x) for x in mine]) for k, f in figures.items()}
    return med


def forward_table(r):
    rows = r.get("forward", [])
    if not rows:
        return []
    mib = rows[0]["mib"]
    rounds = 1 + max(x["round"] for x in rows)
    out = [f"\n## Time to first output and steady-state forward ({mib} MiB model, batch 1, medians of {rounds} "
           "interleaved rounds)\n",
           "Build the model without weights (or with, for the loaders that need it), load, one forward pass: "
           "*first output* adds the three. Then 7 more passes: *steady* is their median. *x best peer*: first "
           "output over the best real peer's (torch 2.x meta + `torch.load(mmap=True)` + `assign=True`, "
           "safetensors `load_file` + `assign=True`, or `torch.load` + `load_state_dict`) in the same cache state; "
           "*x owned*: steady over tensormap-copy's (weights in the process's own memory; another process). "
           f"*paired*: the map strategies' weights also copied into owned memory in the same process, then "
           f"{PAIRED} passes of each alternating: the median of mapped / owned per pair, which the VM's swings "
           "of speed from one second to the next do not reach. *2 MiB-mapped*: "
           "FilePmdMapped over the file's size. *warm*: the file was evicted, then read once with read() just "
           "before (the same page cache for every strategy); *cold*: evicted. *cp*: the .tmap copied with `cp` just before (cached as cp "
           "wrote it); *cp-warmed*: then `tensormap warm` (its time in the note). *background*: "
           "`prefault_in_background` started as the first pass starts; *prefault*: `prefault` before it.\n",
           "| cache | strategy | build ms | load ms | first forward ms | first output ms | x best peer | "
           "steady ms | x owned | paired | 2 MiB-mapped | note |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for cache in ("warm", "cold"):
        med = forward_medians(rows, FORWARD + PY_FORWARD, cache, {
            "steady_forward_ms": lambda x: x["steady_forward_ms"], "file_pmd_share": lambda x: x["file_pmd_share"],
            "paired_x_owned": lambda x: x.get("paired_x_owned", float("nan"))})
        for s, m in med.items():
            mine = [x for x in rows if x["strategy"] == s and x["cache"] == cache and "warm_ms" in x]
            if mine and "unavailable" not in m:
                m["warm_ms"] = median([x["warm_ms"] for x in mine])
        peers = [m["first_output_ms"] for s, m in med.items() if s in PY_FORWARD and "unavailable" not in m]
        best = min(peers) if peers else None
        owned = med.get("tensormap-copy", {}).get("steady_forward_ms")
        for s, m in med.items():
            if "unavailable" in m:
                out.append(f"| {cache} | {s} | | | | | | | | | | unavailable: {m['unavailable'][:80]} |")
                continue
            note = f"tensormap warm took {m['warm_ms']:.0f} ms" if "warm_ms" in m else ""
            paired = "" if math.isnan(m["paired_x_owned"]) else f"{m['paired_x_owned']:.2f}"
            out.append(f"| {cache} | {s} | {m['build_ms']:.0f} | {m['load_ms']:.0f} | {m['first_forward_ms']:.0f} | "
                       f"{m['first_output_ms']:.0f} | {m['first_output_ms'] / best if best else float('nan'):.2f} | "
                       f"{m['steady_forward_ms']:.0f} | {m['steady_forward_ms'] / owned if owned else float('nan'):.2f} | "
                       f"{paired} | {100 * m['file_pmd_share']:.0f}% | {note} |")
    return out


def python_table(r):
    """tensormap's Python package against the Python peers: the forward section's rows."""
    rows = [x for x in r.get("forward", []) if x["strategy"] in PY_FORWARD + PY_TENSORMAP]
    if not rows:
        return []
    rounds = 1 + max(x["round"] for x in rows)
    out = [f"\n## From Python: `import tensormap` against the Python peers ({rows[0]['mib']} MiB model, "
           f"medians of {rounds} interleaved rounds)\n",
           "The same files for every strategy (the .pt, .safetensors and .tmap of one model), each in a fresh "
           "`/usr/bin/python3`. *build*: the model under `tensormap.skeleton()`, on the meta device (torch 2.x), or "
           "with its weights (`py-torch-load`); *load*; *first forward*: the first full use of the weights; "
           "*x best peer*: first output (the three) over the best Python peer's. *peak*: VmHWM growth from "
           "just before the build (file pages mapped count too); *anon*: RssAnon growth, the process's own "
           "memory, at the end.\n",
           "| cache | strategy | build ms | load ms | first forward ms | first output ms | x best peer | "
           "peak MiB | anon MiB | note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for cache in ("warm", "cold"):
        med = forward_medians(rows, PY_FORWARD + PY_TENSORMAP, cache, {
            "peak": lambda x: x["used_hwm_mib"] - x["base_hwm_mib"],
            "anon": lambda x: x["used_anon_mib"] - x["base_anon_mib"]})
        peers = [m["first_output_ms"] for s, m in med.items() if s in PY_FORWARD and "unavailable" not in m]
        best = min(peers) if peers else None
        for s, m in med.items():
            if "unavailable" in m:
                out.append(f"| {cache} | {s} | | | | | | | | unavailable: {m['unavailable'][:80]} |")
                continue
            out.append(f"| {cache} | {s} | {m['build_ms']:.0f} | {m['load_ms']:.0f} | {m['first_forward_ms']:.0f} | "
                       f"{m['first_output_ms']:.0f} | {m['first_output_ms'] / best if best else float('nan'):.2f} | "
                       f"{m['peak']:.0f} | {m['anon']:.0f} | |")
    return out


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = "unknown system"
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            system = dict(line.rstrip().split("=", 1) for line in f if "=" in line).get("PRETTY_NAME", system).strip('"')
    versions = subprocess.run([PYTHON, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                              text=True).stdout.strip()
    try:
        from importlib.metadata import version
        versions += f", safetensors {version('safetensors')}"
        # Debian 13's python3-safetensors 0.5.2-1+b1 ships a module that says 0.4.5: name both.
        package = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "python3-safetensors"],
                                 capture_output=True, text=True)
        if package.returncode == 0 and package.stdout.strip():
            versions += f" (Debian package python3-safetensors {package.stdout.strip()})"
    except Exception:
        versions += ", no safetensors library"
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}, {system}; "
            f"Python torch {versions}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB only, warm and cold (~2 minutes)")
    ap.add_argument("--sizes", default="256,1024,4096", help="model sizes in MiB")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--work", default="/var/tmp/tensormap-bench", help="where checkpoints are written")
    ap.add_argument("--harness", default=os.path.join(ROOT, "build", "bench", "tensormap_harness"))
    ap.add_argument("--render", action="store_true", help="only redo RESULTS.md and plot.png from results.json")
    ap.add_argument("--larger-than-memory", action="store_true",
                    help="also a model 1.25x the machine's memory, written to --work (a few minutes, that much disk)")
    ap.add_argument("--forward-mib", type=int, default=1024, help="the model of the forward section")
    ap.add_argument("--forward-rounds", type=int, default=3, help="interleaved rounds of the forward section")
    ap.add_argument("--forward-only", action="store_true",
                    help="only the forward section: writes forward.json and FORWARD.md")
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "tensormap"))
    ap.add_argument("--python-package", default=os.path.join(ROOT, "build", "python"),
                    help="the folder holding the built tensormap Python package (for the py-tensormap-* strategies)")
    ap.add_argument("--remote", action="store_true",
                    help="also the remote section (bench/remote.py): 1 and 4 GiB over nginx, and S3 where moto is")
    ap.add_argument("--remote-only", action="store_true", help="only the remote section")
    ap.add_argument("--training", action="store_true",
                    help="also the training-checkpoint section (bench/training.py, bench/distributed.py): saves "
                         "while training goes on, saves from 2 ranks and reshard loads, against DCP where torch has it")
    ap.add_argument("--training-only", action="store_true", help="only the training-checkpoint section")
    args = ap.parse_args()
    os.environ["TENSORMAP_PYTHON"] = os.path.abspath(args.python_package)
    remote = [PYTHON, os.path.join(ROOT, "bench", "remote.py"), "--out", args.out, "--work", args.work,
              "--harness", args.harness]
    training = [PYTHON, os.path.join(ROOT, "bench", "training.py"), "--out", args.out, "--work", args.work,
                "--python-package", args.python_package]
    distributed = [PYTHON, os.path.join(ROOT, "bench", "distributed.py"), "--out", args.out, "--work", args.work,
                   "--python-package", args.python_package]
    if args.remote_only:
        sys.exit(subprocess.run(remote).returncode)
    if args.training_only:
        sys.exit(subprocess.run(training).returncode or subprocess.run(distributed).returncode)
    if args.forward_only:
        started = time.time()
        harness(args.harness, "make", "--dir", args.work, "--mib", str(args.forward_mib))
        results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "forward": forward_section(args.harness, args.work, args.forward_mib, args.forward_rounds,
                                              args.cli)}
        results["seconds"] = time.time() - started
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "forward.json"), "w") as f:
            json.dump(results, f, indent=1)
        report = "\n".join([f"# Forward: time to first output and steady state\n",
                             f"Machine: {results['machine']}. Date: {results['date']}. "
                             f"Section time {results['seconds']:.0f} s.\n"] + forward_table(results)
                           + python_table(results)) + "\n"
        with open(os.path.join(args.out, "FORWARD.md"), "w") as f:
            f.write(report)
        print(report)
        return
    sizes = [256] if args.quick else [int(s) for s in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    if args.render:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
        sizes = sorted({x["mib"] for x in results["runs"]})
        with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
            f.write(render(results, sizes))
        plot(results, sizes, os.path.join(args.out, "plot.png"))
        return
    exe, work = args.harness, args.work
    started = time.time()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "quick": args.quick, "runs": [], "baselines": {}, "save": [], "sharing": {}, "tp": {}}
    results["baselines"]["memcpy"] = harness(exe, "memcpy", "--mib", "512")[0]
    for mib in sizes:
        print(f"== {mib} MiB", file=sys.stderr)
        harness(exe, "make", "--dir", work, "--mib", str(mib))
        harness("peers", "make", "--dir", work, "--mib", str(mib))
        tmap = os.path.join(work, f"model-{mib}.tmap")
        results["baselines"][f"seqread-cold-{mib}"] = harness(exe, "seqread", "--file", tmap, "--cold")[0]
        results["baselines"][f"seqread-warm-{mib}"] = harness(exe, "seqread", "--file", tmap)[0]
        results["baselines"][f"seqwrite-{mib}"] = harness(exe, "seqwrite", "--dir", work, "--mib", str(mib))[0]
        for cache in ("warm", "cold"):
            for s in STRATEGIES + PY_STRATEGIES:
                if s == "torch-pickle-load" and mib > 1024:
                    continue  # needs ~4.5x the model in memory before it fails (see the 256 MiB row)
                python = s in PY_STRATEGIES
                extra = ["--cold"] if cache == "cold" else []
                for f in files_of(work, mib, s):
                    if cache == "warm":  # a warm run follows a read of the strategy's own files
                        harness(exe, "seqread", "--file", f)
                    elif python:  # the C++ harness evicts its own file; Python's are evicted here
                        harness(exe, "evict", "--file", f)
                row = harness("peers" if python else exe, "run", "--dir", work, "--mib", str(mib),
                              "--strategy", s, *extra)[0]
                results["runs"].append(row)
                status = (f"unavailable: {row['unavailable']}" if "unavailable" in row else
                          f"fails: {row['error']}" if "error" in row else
                          f"total {total_ms(row):.0f} ms, peak +{growth(row, 'used', 'hwm'):.0f} MiB")
                print(f"   {cache} {s}: {status}", file=sys.stderr)
        for s in ("tensormap", "torch"):
            results["save"].append(harness(exe, "save", "--dir", work, "--mib", str(mib), "--strategy", s)[0])
        results["sharing"][str(mib)] = sharing(exe, work, mib)
        whole = [r for r in results["runs"] if r["mib"] == mib and r["strategy"] == "tensormap-map"
                 and r["cache"] == "warm"][0]
        results["tp"][str(mib)] = {
            mode: harness(exe, "tp", "--dir", work, "--mib", str(mib), "--ranks", "4", "--mode", mode)
            for mode in ("map", "copy")}
        results["tp"][str(mib)]["whole_map_load_and_touch_ms"] = whole["load_ms"] + whole["touch_ms"]
        copy = [r for r in results["runs"] if r["mib"] == mib and r["strategy"] == "tensormap-copy"
                and r["cache"] == "warm"][0]
        results["tp"][str(mib)]["whole_copy_load_ms"] = copy["load_ms"]
        for mode in ("map", "copy"):  # only rank 0 reads the file and sends the others their parts
            results["tp"][str(mib)][f"source_{mode}"] = harness(
                exe, "tp", "--dir", work, "--mib", str(mib), "--ranks", "4", "--mode", mode, "--source", "0")
        for mode in ("map", "copy"):  # rank 1 of 4 alone, in one process, warm
            harness(exe, "seqread", "--file", tmap)
            results["tp"][str(mib)][f"alone_{mode}"] = harness(
                exe, "part", "--dir", work, "--mib", str(mib), "--ranks", "4", "--rank", "1", "--mode", mode)[0]
    if args.forward_mib in sizes:  # the default sizes hold the default forward model
        print("== forward", file=sys.stderr)
        harness(exe, "make", "--dir", work, "--mib", str(args.forward_mib))
        results["forward"] = forward_section(exe, work, args.forward_mib, args.forward_rounds, args.cli)
    if args.larger_than_memory:  # a real file on the disk, cold: map-load + forward against one sequential read
        print("== larger than memory", file=sys.stderr)
        results["huge"] = harness(exe, "huge", "--dir", os.path.join(work, "huge"), "--ratio", "1.25")[0]
        shutil.rmtree(os.path.join(work, "huge"), ignore_errors=True)  # 1.25x memory of disk
    results["seconds"] = time.time() - started
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report = render(results, sizes)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(report)
    plot(results, sizes, os.path.join(args.out, "plot.png"))
    print(report)
    broken = [f"{x['strategy']} {x['mib']} {x['cache']}: {x['error']}" for x in results["runs"]
              if "error" in x and x["strategy"] != "torch-pickle-load"]
    broken += [f"{x['strategy']} {x['mib']} {x['cache']}: its sum {x['check']} differs from tensormap-copy's"
               for x in results["runs"] if not same_weights(results, x)]
    if broken:
        sys.exit("strategies failed: " + "; ".join(broken))
    if args.remote:
        subprocess.run(remote, check=True)
    if args.training:
        subprocess.run(training, check=True)
        subprocess.run(distributed, check=True)
    print(f"suite took {results['seconds']:.0f} s; results in {args.out}", file=sys.stderr)


def growth(row, stage, what):
    return row[f"{stage}_{what}_mib"] - row[f"base_{what}_mib"]


def same_weights(r, row):
    """Whether a strategy's sum of every weight equals tensormap copy mode's (same files)."""
    if "check" not in row:
        return True
    ref = find(r, row["mib"], "tensormap-copy", row["cache"], None)
    return ref is None or abs(row["check"] - ref["check"]) <= 1e-5 * max(1.0, abs(ref["check"]))


def peers_table(r, sizes):
    """Every strategy against the best real peer of the same size and cache state."""
    out = ["\n## Against the real peers: build + load + first full read (a sum of every weight)\n",
           "Every strategy in a fresh process, same files, same model, same cache state. *total* = build + "
           "load + touch + first use; the ratios divide by the best real peer's total and peak (the peers are "
           + ", ".join(f"`{p}`" for p in PEERS) + "). Peak is VmHWM growth over the process's start, "
           "as a multiple of the model's size.\n",
           "| size | cache | strategy | build ms | load ms | touch ms | first use ms | total ms | "
           "x best peer's total | peak, x model | x best peer's peak |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mib in sizes:
        for cache in ("warm", "cold"):
            rows = [x for x in r["runs"] if x["mib"] == mib and x["cache"] == cache]
            done = [x for x in rows if "error" not in x and "unavailable" not in x]
            peers = [x for x in done if x["strategy"] in PEERS]
            best_t = min((total_ms(x) for x in peers), default=None)
            best_p = min((growth(x, "used", "hwm") for x in peers), default=None)
            for x in sorted(rows, key=lambda x: total_ms(x) if x in done else 1e18):
                if x not in done:
                    why = x.get("unavailable") or "fails: " + x.get("error", "")
                    out.append(f"| {mib} | {cache} | {x['strategy']} | | | | | | | | {why[:100]} |")
                    continue
                peak = growth(x, "used", "hwm")
                out.append(f"| {mib} | {cache} | {x['strategy']} | {x['build_ms']:.1f} | {x['load_ms']:.1f} | "
                           f"{x['touch_ms']:.1f} | {x['use_ms']:.1f} | {total_ms(x):.1f} | "
                           + (f"{total_ms(x) / best_t:.3f}" if best_t else "-") + f" | {peak / mib:.2f} | "
                           + (f"{peak / best_p:.2f}" if best_p else "-") + " |")
    return out


def render(r, sizes):
    memcpy = r["baselines"]["memcpy"]["memcpy_gbps"]
    out = [f"# tensormap benchmark results\n",
           f"Machine: {r['machine']}. Date: {r['date']}. Suite time {r['seconds']:.0f} s"
           f"{' (--quick)' if r['quick'] else ''}.\n",
           "Each row is one fresh process. *load* is the loader's call alone; *touch* then reads "
           "every weight (map strategies fault the mapping in: `prefault`, or one byte per 4 KiB "
           "page for *naive*); a map-mode load is only finished after its touch. Memory columns "
           "are growth over the process's start (LibTorch itself is ~150 MiB): peak (VmHWM), and "
           "RssAnon / RssFile after the touch. *first use* is then the same for every strategy, a sum "
           "of every weight, and *total* adds it all up. *cold*: the file was evicted first (mincore "
           "confirmed 0% cached).\n",
           f"Baselines: memcpy {memcpy:.2f} GB/s into memory already faulted in, "
           f"{r['baselines']['memcpy']['fresh_memcpy_gbps']:.2f} GB/s into fresh memory (2 threads)."]
    for mib in sizes:
        b = r["baselines"]
        out.append(f" {mib} MiB: sequential read cold {b[f'seqread-cold-{mib}']['gbps']:.2f} GB/s, "
                   f"warm {b[f'seqread-warm-{mib}']['gbps']:.2f} GB/s; write+fsync "
                   f"{b[f'seqwrite-{mib}']['gbps']:.2f} GB/s.")
    out.append("\n\n| size | cache | strategy | build ms | load ms | touch ms | first use ms | total ms | "
               "peak +MiB | RssAnon +MiB | RssFile +MiB | note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in r["runs"]:
        if "unavailable" in row:
            out.append(f"| {row['mib']} | {row['cache']} | {row['strategy']} | | | | | | | | | unavailable: "
                       f"{row['unavailable'][:90]} |")
            continue
        if "error" in row:
            out.append(f"| {row['mib']} | {row['cache']} | {row['strategy']} | {row['build_ms']:.0f} | "
                       f"{row['load_ms']:.0f} | | | | {growth(row, 'loaded', 'hwm'):.0f} | | | fails: "
                       f"{row['error'][:90]} |")
            continue
        out.append(f"| {row['mib']} | {row['cache']} | {row['strategy']} | {row['build_ms']:.1f} | "
                   f"{row['load_ms']:.1f} | {row['touch_ms']:.1f} | {row['use_ms']:.1f} | {total_ms(row):.1f} | "
                   f"{growth(row, 'used', 'hwm'):.0f} | {growth(row, 'used', 'anon'):.0f} | "
                   f"{growth(row, 'used', 'file'):.0f} | {row.get('note', '')} |")
    out.extend(peers_table(r, sizes))
    out.append("\n## Save (fsync included)\n\n| size | writer | ms | GB/s | of write+fsync | extra peak MiB |\n|---|---|---:|---:|---:|---:|")
    for s in r["save"]:
        base = r["baselines"][f"seqwrite-{s['mib']}"]["gbps"]
        out.append(f"| {s['mib']} | {s['strategy']} | {s['ms']:.0f} | {s['gbps']:.2f} | "
                   f"{100 * s['gbps'] / base:.0f}% | {s['extra_peak_mib']:.1f} |")
    out.append("\n## Sharing: 4 processes map one checkpoint and touch all of it\n\n"
               "| size | file MiB | total Pss of the mapping MiB | ratio to one copy |\n|---|---:|---:|---:|")
    for mib, s in r["sharing"].items():
        out.append(f"| {mib} | {s['file_mib']:.0f} | {s['total_pss_mib']:.0f} | {s['total_pss_mib'] / s['file_mib']:.2f} |")
    out.append("\n## Tensor parallelism of 4 over c10d (Gloo, FileStore): every rank reading its own parts, or rank 0 reading for all\n\n"
               "| size | mode | rank | load+touch ms | resident growth MiB | share of the model |\n|---|---|---:|---:|---:|---:|")
    for mib, t in r["tp"].items():
        for mode in ("map", "copy"):
            for rank in sorted(t[mode], key=lambda x: x["rank"]):
                out.append(f"| {mib} | {mode} | {rank['rank']} | {rank['load_and_touch_ms']:.0f} | "
                           f"{rank['resident_growth_mib']:.0f} | {rank['resident_growth_mib'] / int(mib):.2f} |")
        for mode in ("map", "copy"):
            for rank in sorted(t.get(f"source_{mode}", []), key=lambda x: x["rank"]):
                out.append(f"| {mib} | {mode}, rank 0 reads and sends | {rank['rank']} | "
                           f"{rank['load_and_touch_ms']:.0f} | {rank['resident_growth_mib']:.0f} | "
                           f"{rank['resident_growth_mib'] / int(mib):.2f} |")
        for mode in ("map", "copy"):
            a = t.get(f"alone_{mode}")
            if a:
                out.append(f"| {mib} | {mode}, rank 1 alone (one process, no group) | 1 | "
                           f"{a['load_ms'] + a['touch_ms']:.0f} | {a['resident_growth_mib']:.0f} | "
                           f"{a['resident_growth_mib'] / int(mib):.3f} |")
        out.append(f"| {mib} | whole model, map + touch | - | {t['whole_map_load_and_touch_ms']:.0f} | | 1 |")
        out.append(f"| {mib} | whole model, copy | - | {t['whole_copy_load_ms']:.0f} | | 1 |")
    out.extend(forward_table(r))
    out.extend(python_table(r))
    out.append("\n## Targets\n")
    out.extend(targets(r, sizes))
    return "\n".join(out) + "\n"


def find(r, mib, strategy, cache, *default):
    return next((x for x in r["runs"] if x["mib"] == mib and x["strategy"] == strategy and x["cache"] == cache),
                *default)


def targets(r, sizes):
    lines = []
    memcpy = r["baselines"]["memcpy"]["memcpy_gbps"]
    for mib in sizes:
        m = find(r, mib, "tensormap-map", "warm")
        lines.append(f"- {mib} MiB map load: {m['load_ms']:.2f} ms for {m['tensors']} tensors, mostly "
                     f"the fixed cost of opening (per-tensor cost: BM_MapLoad_ByTensorCount in "
                     f"tensormap_bench_torch; target <= 5 ms per 1,000); RssAnon after touch "
                     f"+{growth(m, 'touched', 'anon'):.1f} MiB (target ~0).")
        naive = find(r, mib, "tensormap-map-naive-touch", "cold")
        fast = find(r, mib, "tensormap-map", "cold")
        naive_w = find(r, mib, "tensormap-map-naive-touch", "warm")
        lines.append(f"- {mib} MiB full touch after map load: prefault {fast['touch_ms']:.0f} ms vs naive "
                     f"{naive['touch_ms']:.0f} ms cold ({naive['touch_ms'] / fast['touch_ms']:.2f}x), "
                     f"{m['touch_ms']:.1f} vs {naive_w['touch_ms']:.1f} ms warm "
                     f"({naive_w['touch_ms'] / m['touch_ms']:.2f}x); target >= 1.5x.")
        c = find(r, mib, "tensormap-copy", "warm")
        bw = c["mib"] * 2**20 / c["load_ms"] / 1e6
        fresh = r["baselines"]["memcpy"]["fresh_memcpy_gbps"]
        tl = find(r, mib, "torch-load", "warm")
        lines.append(f"- {mib} MiB copy mode warm: {bw:.2f} GB/s = {100 * bw / memcpy:.0f}% of memcpy "
                     f"into faulted memory, {100 * bw / fresh:.0f}% of memcpy into fresh memory "
                     f"(target >= 80%); peak +{growth(c, 'used', 'hwm'):.0f} MiB "
                     f"({growth(c, 'used', 'hwm') / mib:.2f}x the model) vs torch::load "
                     f"+{growth(tl, 'used', 'hwm'):.0f} MiB ({growth(tl, 'used', 'hwm') / mib:.2f}x).")
        cc = find(r, mib, "tensormap-copy", "cold")
        seq = r["baselines"][f"seqread-cold-{mib}"]["gbps"]
        bwc = cc["mib"] * 2**20 / cc["load_ms"] / 1e6
        lines.append(f"- {mib} MiB copy mode cold: {bwc:.2f} GB/s = {100 * bwc / seq:.0f}% of cold "
                     f"sequential read ({seq:.2f} GB/s; target >= 85%).")
        keep = find(r, mib, "tensormap-copy-keep-cache", "cold", None)
        if keep and "cached_fraction_after" in cc and "cached_fraction_after" in keep:
            lines.append(f"- {mib} MiB copy mode cold, read pages dropped: "
                         f"{100 * cc['cached_fraction_after']:.1f}% of the file cached after the load vs "
                         f"{100 * keep['cached_fraction_after']:.1f}% kept (target < 5%); load time "
                         f"{cc['load_ms'] / keep['load_ms']:.2f}x keeping them.")
        for cache in ("warm", "cold"):
            unchecked, checked = find(r, mib, "tensormap-copy", cache), find(r, mib, "tensormap-copy-verified", cache, None)
            if checked:
                lines.append(f"- {mib} MiB copy mode {cache}, checksums checked while copying: load time "
                             f"{checked['load_ms'] / unchecked['load_ms']:.2f}x unchecked (on by default below 1.10x).")
        s = next(x for x in r["save"] if x["mib"] == mib and x["strategy"] == "tensormap")
        w = r["baselines"][f"seqwrite-{mib}"]["gbps"]
        lines.append(f"- {mib} MiB save: {s['gbps']:.2f} GB/s = {100 * s['gbps'] / w:.0f}% of write+fsync "
                     f"(target >= 80%), extra peak {s['extra_peak_mib']:.1f} MiB (target <= 64).")
        t = r["tp"][str(mib)]
        shares = [x["resident_growth_mib"] / mib for mode in ("map", "copy") for x in t[mode]]
        lines.append(f"- {mib} MiB, tensor parallelism of 4: a rank holds {min(shares):.3f}-{max(shares):.3f} "
                     f"of the model (target ~0.25).")
        sent = [x["resident_growth_mib"] / mib for mode in ("map", "copy") for x in t.get(f"source_{mode}", [])]
        if sent:
            lines.append(f"- {mib} MiB, tensor parallelism of 4, rank 0 reading for all: a rank holds "
                         f"{min(sent):.3f}-{max(sent):.3f} of the model.")
        if "alone_map" in t:
            am, ac = t["alone_map"], t["alone_copy"]
            lines.append(f"- {mib} MiB, a rank's part alone against the whole model (warm): map + touch "
                         f"{am['load_ms'] + am['touch_ms']:.0f} vs {t['whole_map_load_and_touch_ms']:.0f} ms; "
                         f"copy {ac['load_ms'] + ac['touch_ms']:.0f} vs {t['whole_copy_load_ms']:.0f} ms "
                         f"({(ac['load_ms'] + ac['touch_ms']) / t['whole_copy_load_ms']:.2f}x).")
        sh = r["sharing"][str(mib)]
        lines.append(f"- {mib} MiB, 4 processes: total Pss {sh['total_pss_mib']:.0f} MiB = "
                     f"{sh['total_pss_mib'] / sh['file_mib']:.2f}x one copy (target <= 1.1x).")
    h = r.get("huge")
    if h and "error" not in h:
        lines.append(f"- Larger than memory: {h['layers']} layers, {h['file_gib']:.1f} GiB on a "
                     f"{h['memory_gib']:.1f} GiB machine, cold: build + map load {h['build_and_map_load_ms']:.0f} ms, "
                     f"first forward pass {h['first_forward_ms'] / 1000:.1f} s; together "
                     f"{h['forward_over_seqread']:.2f}x one cold sequential read of the file "
                     f"({h['cold_seqread_ms'] / 1000:.1f} s); RssAnon +{h['rss_anon_growth_mib']:.0f} MiB.")
    return lines


def plot(r, sizes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    everything = STRATEGIES + PY_STRATEGIES
    for i, s in enumerate(everything):
        rows = [x for x in (find(r, mib, s, "warm", None) for mib in sizes)
                if x and "error" not in x and "unavailable" not in x]
        if not rows:
            continue
        xs = [x["mib"] for x in rows]
        style = dict(linestyle="--" if s in PY_STRATEGIES else "-", marker="o", label=s,
                     color=plt.cm.tab20(i / max(1, len(everything) - 1)))
        ax1.plot(xs, [total_ms(x) for x in rows], **style)
        ax2.plot(xs, [growth(x, "used", "hwm") for x in rows], **style)
    ax1.set(xscale="log", yscale="log", xlabel="model size (MiB)",
            ylabel="build + load + first full read (ms)", title="Time, warm cache (dashed: Python)")
    ax2.set(xscale="log", xlabel="model size (MiB)", ylabel="peak memory growth (MiB)", title="Peak memory")
    ax2.plot(sizes, sizes, "k--", linewidth=0.8, label="1x the model")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
