"""Copy-mode loads with and without their options, interleaved in one run: the checksum
check (LoadOptions::verify_checksums) and the destination's 2 MiB pages
(LoadOptions::huge_pages), warm (the file in the page cache) and cold (evicted first).

Each load is a fresh process of bench/tensormap_harness (a skeleton model of N MiB, then
tensormap::load in copy mode); the strategies alternate load by load, round by round.
These VMs are noisy: compare within a run, as ratios of medians.

    bench/copy_modes.py [--mib 1024] [--rounds 5] [--harness build/bench/tensormap_harness] [--out FILE.md]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {
    "tensormap-copy": "unchecked, 4 KiB pages",
    "tensormap-copy-verified": "checked, 4 KiB pages",
    "tensormap-copy-huge": "unchecked, 2 MiB pages",
}


def run(harness, directory, mib, strategy, cold):
    command = [harness, "run", "--dir", directory, "--mib", str(mib), "--strategy", strategy] + (["--cold"] if cold else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--harness", default=os.path.join(ROOT, "build", "bench", "tensormap_harness"))
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as directory:
        subprocess.run([args.harness, "make", "--dir", directory, "--mib", str(args.mib)], check=True,
                       capture_output=True)
        times = {(s, c): [] for s in STRATEGIES for c in ("warm", "cold")}
        for _ in range(args.rounds):
            for cache in ("warm", "cold"):
                if cache == "warm":
                    run(args.harness, directory, args.mib, "tensormap-copy", False)  # the file in the cache
                for strategy in STRATEGIES:
                    times[(strategy, cache)].append(run(args.harness, directory, args.mib, strategy, cache == "cold")["load_ms"])
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    lines = [f"# Copy-mode loads of {args.mib} MiB: checksums and 2 MiB pages",
             "",
             f"{platform.node()}, {os.cpu_count()} CPUs, {platform.release()}, transparent huge pages `{thp}`; "
             f"{args.rounds} interleaved rounds, medians (min..max) of fresh processes; "
             f"`bench/copy_modes.py --mib {args.mib} --rounds {args.rounds}`.",
             "",
             "| load | cache | ms | GiB/s | vs unchecked, 4 KiB pages |",
             "|---|---|---:|---:|---:|"]
    for cache in ("warm", "cold"):
        base = statistics.median(times[("tensormap-copy", cache)])
        for strategy, label in STRATEGIES.items():
            t = times[(strategy, cache)]
            m = statistics.median(t)
            lines.append(f"| {label} | {cache} | {m:.0f} ({min(t):.0f}..{max(t):.0f}) | {args.mib / 1024 / (m / 1e3):.2f} | "
                         f"{m / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
