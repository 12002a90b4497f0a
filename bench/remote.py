#!/usr/bin/python3
"""The remote section of the suite: a checkpoint loaded over HTTP (nginx) and from S3
(moto, where Debian packages it), against what a user would otherwise run, in one run.

    bench/remote.py [--sizes 1024,4096] [--rounds 3] [--out bench/results]
    bench/run_suite.py --remote            # the same, from the suite

Strategies, interleaved round by round, each in a fresh process:
  tensormap     the harness loads the model from the URL (copy mode, checksums checked),
                `connections` ranges in flight, straight into the parameters of a
                skeleton: the load makes the model's memory, fresh pages the kernel zeroes
                (and, in a virtual machine, the host first backs);
  tensormap-resident
                the same into a model whose memory exists (built and initialised before
                the clock starts), as when a running server takes new weights: the network
                path alone, with the checksums;
  tensormap-8-requests
                (S3) the same as tensormap with chunks of an eighth of the object: the 8
                requests curl makes. moto reads the whole object for each range request
                it serves, so there its time follows the number of requests;
  curl          the same number of curl processes, each a ranged GET of its share of the
                file, to /dev/null: the wire with nothing done to the bytes;
  curl-memory   the same, each into a file in /dev/shm: the bytes kept in fresh memory, as
                a load must (tmpfs pages), without a checksum;
  boto3         (S3) boto3's download_file to a local file, its default transfer settings.
Reported: time, throughput, peak RSS growth, bytes written to local disk. The goals
(issue 30): tensormap's throughput >= 90% of the best of the others; its RSS growth <=
the weights + 64 MiB.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "remote"))
import servers  # noqa: E402

CONNECTIONS = 8


def tensormap_load(harness, url, mib, env, resident=False):
    """The harness's load of the whole model (one rank of one) from `url`; with `resident`,
    into a model whose memory exists."""
    started = time.monotonic()
    out = subprocess.run([harness, "part", "--dir", "/nonexistent", "--mib", str(mib), "--ranks", "1", "--rank", "0",
                          "--url", url] + (["--resident"] if resident else []),
                         capture_output=True, text=True, env=env, timeout=3600)
    wall = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"harness part {url}: {out.stderr.strip()}")
    row = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("{")))
    return {"seconds": row["load_ms"] / 1000, "wall_seconds": wall, "rss_growth_mib": row["resident_growth_mib"],
            "disk_write_bytes": row["disk_write_bytes"]}


def curl_ranges(url, size, env, keep=False):
    """CONNECTIONS curl processes, each its share of the object, to /dev/null (or, with
    `keep`, to a file of its own in /dev/shm, removed after)."""
    share = -(-size // CONNECTIONS)
    shm = tempfile.mkdtemp(dir="/dev/shm", prefix="tensormap-bench-") if keep else None
    started = time.monotonic()
    procs = []
    for i in range(CONNECTIONS):
        first, last = i * share, min(size, (i + 1) * share) - 1
        if first > last:
            continue
        cmd = ["curl", "-sf", "-o", os.path.join(shm, str(i)) if keep else "/dev/null", "-r", f"{first}-{last}", url]
        if env.get("S3_SIGNING"):
            cmd[1:1] = ["--aws-sigv4", env["S3_SIGNING"], "--user", env["S3_USER"], "-H",
                        "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]
        procs.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in procs]
    seconds = time.monotonic() - started
    if shm:
        for name in os.listdir(shm):
            os.unlink(os.path.join(shm, name))
        os.rmdir(shm)
    if any(codes):
        raise RuntimeError(f"curl {url}: exits {codes}")
    return {"seconds": seconds, "rss_growth_mib": None, "disk_write_bytes": 0}


def boto3_download(store, key, size):
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        target = os.path.join(folder, "download")
        code = (f"import boto3, sys; s3 = boto3.client('s3', endpoint_url={store.url!r}, aws_access_key_id={store.key!r}, "
                f"aws_secret_access_key={store.secret!r}, region_name='us-east-1'); "
                f"s3.download_file({store.BUCKET!r}, {key!r}, {target!r})")
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True)
        seconds = time.monotonic() - started
        written = os.path.getsize(target)
    return {"seconds": seconds, "rss_growth_mib": None, "disk_write_bytes": written}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,4096", help="model sizes in MiB")
    ap.add_argument("--s3-sizes", default="1024", help="model sizes in MiB for S3 (moto holds objects in memory)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/tensormap-bench")
    ap.add_argument("--harness", default=os.path.join(ROOT, "build", "bench", "tensormap_harness"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    s3_sizes = [int(s) for s in args.s3_sizes.split(",") if s]
    os.makedirs(args.work, exist_ok=True)
    for mib in sorted(set(sizes + s3_sizes)):
        subprocess.run([args.harness, "make", "--dir", args.work, "--mib", str(mib)], check=True, capture_output=True)
    served = tempfile.mkdtemp(dir="/var/tmp", prefix="tensormap-remote-")
    os.chmod(served, 0o755)
    for mib in sizes:
        os.link(os.path.join(args.work, f"model-{mib}.tmap"), os.path.join(served, f"model-{mib}.tmap"))
    nginx = servers.Nginx(served, os.path.join(served, ".nginx"))
    store = None
    try:
        import moto.server  # noqa: F401
        import flask_cors  # noqa: F401
        store = servers.Moto()
        for mib in s3_sizes:
            store.put(f"model-{mib}.tmap", os.path.join(args.work, f"model-{mib}.tmap"))
    except ImportError:
        pass
    rows = []
    env = dict(os.environ, TENSORMAP_REMOTE_CONNECTIONS=str(CONNECTIONS))
    try:
        for rnd in range(args.rounds):
            for mib in sizes:
                url = f"{nginx.url}/model-{mib}.tmap"
                size = os.path.getsize(os.path.join(served, f"model-{mib}.tmap"))
                for name, run in (("tensormap", lambda: tensormap_load(args.harness, url, mib, env)),
                                  ("tensormap-resident", lambda: tensormap_load(args.harness, url, mib, env, True)),
                                  ("curl", lambda: curl_ranges(url, size, {})),
                                  ("curl-memory", lambda: curl_ranges(url, size, {}, keep=True))):
                    row = run()
                    row.update(server="nginx", strategy=name, mib=mib, bytes=size, round=rnd)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            for mib in s3_sizes if store else []:
                key = f"model-{mib}.tmap"
                size = os.path.getsize(os.path.join(args.work, key))
                s3_env = dict(env, **store.env)
                signed = {"S3_SIGNING": "aws:amz:us-east-1:s3", "S3_USER": f"{store.key}:{store.secret}"}
                eighth = str(max(4096, -(-size // CONNECTIONS)))
                for name, run in (("tensormap", lambda: tensormap_load(args.harness, f"s3://{store.BUCKET}/{key}", mib, s3_env)),
                                  ("tensormap-8-requests",
                                   lambda: tensormap_load(args.harness, f"s3://{store.BUCKET}/{key}", mib,
                                                          dict(s3_env, TENSORMAP_REMOTE_CHUNK_BYTES=eighth))),
                                  ("curl", lambda: curl_ranges(f"{store.url}/{store.BUCKET}/{key}", size, signed)),
                                  ("curl-memory",
                                   lambda: curl_ranges(f"{store.url}/{store.BUCKET}/{key}", size, signed, keep=True)),
                                  ("boto3", lambda: boto3_download(store, key, size))):
                    row = run()
                    row.update(server="moto S3", strategy=name, mib=mib, bytes=size, round=rnd)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        nginx.stop()
        if store:
            store.stop()
        for name in os.listdir(served):
            if name.endswith(".tmap"):
                os.unlink(os.path.join(served, name))
    render(rows, args.out)


def render(rows, out):
    tag = "debian13" if "trixie" in open("/etc/os-release").read() else "debian12"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"remote-{tag}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"# Remote loads ({tag}, {platform.node()}, {os.cpu_count()} CPUs, loopback)", "",
             f"Medians of {max(r['round'] for r in rows) + 1} interleaved rounds; {CONNECTIONS} connections each. "
             "Made by `bench/remote.py` (or `bench/run_suite.py --remote`).", "",
             "| server | model | strategy | time (s) | GiB/s | vs best other | RSS growth (MiB) | written to disk |",
             "|---|---|---|---|---|---|---|---|"]
    groups = sorted({(r["server"], r["mib"]) for r in rows})
    for server, mib in groups:
        mine = [r for r in rows if r["server"] == server and r["mib"] == mib]
        names = sorted({r["strategy"] for r in mine}, key=lambda n: (not n.startswith("tensormap"), n))
        medians = {n: statistics.median(r["seconds"] for r in mine if r["strategy"] == n) for n in names}
        best_other = min(v for n, v in medians.items() if not n.startswith("tensormap"))
        for n in names:
            runs = [r for r in mine if r["strategy"] == n]
            size = runs[0]["bytes"]
            growth = [r["rss_growth_mib"] for r in runs if r["rss_growth_mib"] is not None]
            written = max(r["disk_write_bytes"] for r in runs)
            lines.append(f"| {server} | {mib} MiB | {n} | {medians[n]:.2f} | {size / medians[n] / 2**30:.2f} | "
                         f"{best_other / medians[n]:.2f}x | {max(growth):.0f} |" if growth else
                         f"| {server} | {mib} MiB | {n} | {medians[n]:.2f} | {size / medians[n] / 2**30:.2f} | "
                         f"{best_other / medians[n]:.2f}x | - |")
            lines[-1] += f" {written / 2**20:.0f} MiB |"
    lines += ["", "`vs best other`: the best strategy's time but tensormap's over this one's (1.00x: as fast; the "
              "goal for tensormap is >= 0.90x). RSS growth: the harness's resident memory after the load less "
              "before (the weights are the model's size; a resident model's memory exists before). "
              "tensormap-resident: into a model whose memory exists; tensormap-8-requests: chunks of an eighth "
              "of the object, the requests curl makes (see bench/remote.py)."]
    with open(os.path.join(out, f"REMOTE-{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
