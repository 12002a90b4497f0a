"""Tests of the tensormap command line that the conformance check does not cover:
convert, diff, help, human output and exit codes. Usage: test_cli.py PATH/TO/tensormap"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VALID = os.path.join(ROOT, "format", "valid")
CLI = None
results = []


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True)


def check(name, ok, detail=""):
    results.append(ok)
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))


def described(path):
    return json.loads(run("inspect", "--json", path).stdout)


def test_help_and_usage_errors(tmp):
    r = run("--help")
    check("--help exits 0 and lists the subcommands", r.returncode == 0 and all(
        c in r.stdout for c in ("inspect", "verify", "convert", "diff")), r.stdout)
    for sub in ("inspect", "verify", "convert", "diff"):
        r = run(sub, "--help")
        check(f"{sub} --help exits 0", r.returncode == 0 and "Usage" in r.stdout, r.stderr)
    check("no subcommand is a usage error (2)", run().returncode == 2)
    check("unknown option is a usage error (2)", run("inspect", "--bogus", "x").returncode == 2)
    check("missing argument is a usage error (2)", run("diff", "a").returncode == 2)
    r = run("convert", os.path.join(VALID, "align_64.tmap"), os.path.join(tmp, "o.tmap"), "--dtype", "I8")
    check("--dtype of a non-float is a usage error (2)", r.returncode == 2, r.stderr)


def test_bad_inputs_are_one_line_errors(tmp):
    empty = os.path.join(tmp, "empty")
    open(empty, "wb").close()
    rand = os.path.join(tmp, "random.bin")
    with open(rand, "wb") as f:
        f.write(os.urandom(4096))
    safetensors_like = os.path.join(tmp, "model.safetensors")
    with open(safetensors_like, "wb") as f:
        f.write((2).to_bytes(8, "little") + b"{}" + b" " * 100)
    for label, path in (("missing file", os.path.join(tmp, "absent")), ("directory", tmp),
                        ("empty file", empty), ("random bytes", rand), ("other format", safetensors_like)):
        for sub in ("inspect", "verify"):
            r = run(sub, path)
            lines = r.stderr.strip().splitlines()
            check(f"{sub} of a {label}: exit 1, one line naming the file",
                  r.returncode == 1 and len(lines) == 1 and path in lines[0] and "Traceback" not in r.stderr,
                  f"exit {r.returncode}, stderr {r.stderr!r}")


def test_inspect_human_output():
    r = run("inspect", os.path.join(VALID, "metadata.tmap"))
    check("inspect prints version, alignment, metadata and a tensor table",
          r.returncode == 0 and "tensormap 1.0" in r.stdout and "alignment 64" in r.stdout
          and "format: pt" in r.stdout and "checksum" in r.stdout, r.stdout)


def test_convert_changes_alignment_and_keeps_bytes(tmp):
    out = os.path.join(tmp, "aligned.tmap")
    r = run("convert", os.path.join(VALID, "all_dtypes.tmap"), out, "--alignment", "4096")
    check("convert --alignment 4096 succeeds", r.returncode == 0, r.stderr)
    before, after = described(os.path.join(VALID, "all_dtypes.tmap")), described(out)
    check("converted file has the new alignment", after["alignment"] == 4096)
    strip = lambda d: [(t["name"], t["dtype"], t["shape"], t["checksum"]) for t in d["tensors"]]
    check("every tensor keeps its bytes (same checksums)", strip(before) == strip(after))
    check("every offset is on the new alignment", all(t["offset"] % 4096 == 0 for t in after["tensors"]))
    check("converted file verifies", run("verify", out).returncode == 0)
    r = run("diff", os.path.join(VALID, "all_dtypes.tmap"), out)
    check("diff of a realigned copy finds no differences (exit 0)", r.returncode == 0 and "no differences" in r.stdout, r.stdout)


def test_convert_dtype_converts_floats_only(tmp):
    out = os.path.join(tmp, "bf16.tmap")
    r = run("convert", os.path.join(VALID, "all_dtypes.tmap"), out, "--dtype", "BF16")
    check("convert --dtype BF16 succeeds", r.returncode == 0, r.stderr)
    dtypes = {t["name"]: t["dtype"] for t in described(out)["tensors"]}
    check("floating tensors become BF16", all(dtypes[f"t_{d}"] == "BF16" for d in ("f16", "f32", "f64", "bf16")), dtypes)
    check("integer, bool, complex and F8 tensors keep their dtype",
          dtypes["t_i32"] == "I32" and dtypes["t_bool"] == "BOOL" and dtypes["t_c64"] == "C64"
          and dtypes["t_f8_e4m3"] == "F8_E4M3" and dtypes["t_u16"] == "U16", dtypes)
    r = run("diff", os.path.join(VALID, "all_dtypes.tmap"), out)
    check("diff reports the dtype changes with a max abs difference, exit 1",
          r.returncode == 1 and "changed: t_f32: dtype F32 -> BF16, max abs difference" in r.stdout, r.stdout)


def test_diff_reports_names_and_shapes(tmp):
    r = run("diff", os.path.join(VALID, "align_64.tmap"), os.path.join(VALID, "spec_example.tmap"))
    check("diff lists names only in A and only in B", r.returncode == 1 and "only in A: a" in r.stdout
          and "only in B: w" in r.stdout, r.stdout)
    r = run("diff", os.path.join(VALID, "metadata.tmap"), os.path.join(VALID, "spec_example.tmap"))
    check("diff of same-shaped tensors with different bytes gives the max abs difference",
          r.returncode == 1 and "changed: w: max abs difference" in r.stdout, r.stdout)


def test_convert_to_safetensors_and_back_is_bit_identical(tmp):
    st = os.path.join(tmp, "model.safetensors")
    r = run("convert", os.path.join(VALID, "all_dtypes.tmap"), st)
    check("convert to .safetensors picks the safetensors format", r.returncode == 0 and "safetensors" in r.stdout, r.stdout + r.stderr)
    d = described(st)
    check("inspect --json of safetensors: format, null version/alignment/checksums",
          d["format"] == "safetensors" and d["version"] is None and d["alignment"] is None
          and all(t["checksum"] is None for t in d["tensors"]), d)
    check("every safetensors tensor is aligned to its element size",
          all(t["offset"] % {"C128": 16, "C64": 8, "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
                              "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(t["dtype"], 1) == 0 for t in d["tensors"]))
    check("verify of safetensors says only the structure was checked",
          "only its structure was validated" in run("verify", st).stdout)
    back = os.path.join(tmp, "back.tmap")
    check("convert back to tensormap", run("convert", st, back, "--alignment", "64").returncode == 0)
    r = run("diff", os.path.join(VALID, "all_dtypes.tmap"), back)
    check("the round trip through safetensors loses nothing", r.returncode == 0, r.stdout)
    forced = os.path.join(tmp, "forced.bin")
    check("--format safetensors overrides the extension",
          run("convert", os.path.join(VALID, "rank0.tmap"), forced, "--format", "safetensors").returncode == 0
          and described(forced)["format"] == "safetensors")


def test_convert_into_shards_and_back(tmp):
    index = os.path.join(tmp, "model.safetensors.index.json")
    r = run("convert", os.path.join(VALID, "all_dtypes.tmap"), index, "--shard-size", "100")
    check("convert --shard-size writes shards and an index", r.returncode == 0 and "shards" in r.stdout, r.stdout + r.stderr)
    shards = sorted(f for f in os.listdir(tmp) if f.startswith("model-"))
    check("shards are named model-0000N-of-0000M.safetensors",
          len(shards) > 2 and all(f.endswith(".safetensors") and "-of-" in f for f in shards), shards)
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    check("the index maps all 17 tensors", len(weight_map) == 17)
    d = described(index)
    check("inspect --json of an index", d["format"] == "sharded safetensors" and len(d["tensors"]) == 17, d)
    check("verify of an index", run("verify", index).returncode == 0)
    back = os.path.join(tmp, "back.tmap")
    check("convert an index back into one file", run("convert", index, back, "--alignment", "64").returncode == 0)
    check("nothing lost across shards", run("diff", os.path.join(VALID, "all_dtypes.tmap"), back).returncode == 0)
    r = run("convert", os.path.join(VALID, "all_dtypes.tmap"), os.path.join(tmp, "x.tmap"), "--shard-size", "1M")
    check("--shard-size needs an index name (exit 2)", r.returncode == 2, r.stderr)
    r = run("convert", os.path.join(VALID, "all_dtypes.tmap"), index, "--shard-size", "lots")
    check("a bad --shard-size is a usage error (exit 2)", r.returncode == 2, r.stderr)


def test_progress_bar_only_on_a_terminal(tmp):
    out = os.path.join(tmp, "p.tmap")
    piped = run("convert", os.path.join(VALID, "all_dtypes.tmap"), out)
    check("no progress bar when stderr is not a terminal", "%" not in piped.stderr, piped.stderr)
    # `script` gives the command a pseudo-terminal.
    tty = subprocess.run(["script", "-qec", f"{CLI} convert {os.path.join(VALID, 'all_dtypes.tmap')} {out}", "/dev/null"],
                         capture_output=True)  # bytes: text mode would turn \r into \n
    check("a progress bar, redrawn in place, when stderr is a terminal",
          tty.returncode == 0 and b"\r[" in tty.stdout and b"100%" in tty.stdout, repr(tty.stdout[:200]))


def test_the_cli_is_the_core_only_fast_and_small(tmp):
    """The CLI links the torch-free core only (issue 14): --help in well under 100 ms,
    inspect and verify of a 64 MiB checkpoint of every format under 48 MiB peak RSS."""
    import time
    libs = subprocess.run(["ldd", CLI], capture_output=True, text=True).stdout
    check("the CLI does not link LibTorch", "libtorch" not in libs and "libc10" not in libs, libs)
    if "libasan" in libs or "libubsan" in libs:
        print("skip time and memory figures: a sanitizer build is neither fast nor small")
        return
    times = []
    for _ in range(5):
        start = time.monotonic()
        run("--help")
        times.append(time.monotonic() - start)
    times.sort()
    check(f"--help takes under 100 ms (median of 5: {times[2] * 1000:.1f} ms)", times[2] < 0.1, times)
    import numpy
    # One process per measurement: ru_maxrss of children is the largest child so far, so
    # each is measured in a fresh Python helper that runs the CLI once.
    rng = numpy.random.default_rng(0)
    st = os.path.join(tmp, "m.safetensors")
    header = {f"t{i}": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [i << 22, (i + 1) << 22]}
              for i in range(16)}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(st, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _ in range(16):
            f.write(rng.standard_normal(1 << 20, dtype=numpy.float32).tobytes())
    files = {"safetensors": st}
    for name, out, extra in (("tensormap", "m.tmap", []), ("sharded tensormap", "m.tmap.index.json", ["--shard-size", "16M"]),
                             ("torch.save", "m.pt", [])):
        files[name] = os.path.join(tmp, out)
        r = run("convert", st, files[name], *extra)
        check(f"convert to {name} for the memory check", r.returncode == 0, r.stderr)
    for name, path in files.items():
        for command in ("inspect", "verify"):
            probe = subprocess.run([sys.executable, "-c", (
                "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
                "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"), CLI, command, path],
                capture_output=True, text=True)
            code, kib = (int(x) for x in probe.stdout.split())
            check(f"{command} of 64 MiB of {name}: exit 0, peak RSS {kib / 1024:.1f} MiB < 48 MiB",
                  code == 0 and kib < 48 * 1024, probe.stderr)


def test_shard_size_must_be_a_size(tmp):
    source = os.path.join(VALID, "all_dtypes.tmap")
    for bad in ("0.5", "0", "-1", "inf", "nan", "1e30", "12X", "G"):
        out = os.path.join(tmp, "m.safetensors.index.json")
        r = run("convert", source, out, "--shard-size", bad)
        check(f"--shard-size {bad} is a usage error (2) and writes nothing",
              r.returncode == 2 and os.listdir(tmp) == [], (r.returncode, r.stderr, os.listdir(tmp)))
    r = run("convert", source, os.path.join(tmp, "m.safetensors.index.json"), "--shard-size", "0.1K")
    check("--shard-size 0.1K (102 bytes) shards", r.returncode == 0 and len(os.listdir(tmp)) > 2, (r.stderr, os.listdir(tmp)))


def test_convert_failure_leaves_no_output(tmp):
    out = os.path.join(tmp, "never.tmap")
    r = run("convert", os.path.join(ROOT, "format", "invalid", "rule17_hole.tmap"), out)
    check("convert of an invalid file fails (1) and writes nothing",
          r.returncode == 1 and not os.path.exists(out) and os.listdir(tmp) == [], (r.stderr, os.listdir(tmp)))


def main(argv):
    global CLI
    CLI = argv[1]
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    for test in tests:
        with tempfile.TemporaryDirectory() as tmp:
            if test.__code__.co_argcount:
                test(tmp)
            else:
                test()
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
