"""Tests of the tensormap command line that the conformance check does not cover:
convert, diff, help, human output and exit codes. Usage: test_cli.py PATH/TO/tensormap"""
import json
import os
import shutil
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
    r = run("convert", os.path.join(VALID, "align_64.tmap"), os.path.join(tmp, "o.tmap"), "--format", "gguf")
    check("--format names one of the formats (2)", r.returncode == 2 and "tensormap, safetensors, torch.save" in r.stderr,
          r.stderr)
    r = run("convert", os.path.join(VALID, "align_64.tmap"), os.path.join(tmp, "o.pt"), "--format", "torch")
    check("--format torch is torch.save, as in Python", r.returncode == 0 and run("inspect", os.path.join(tmp, "o.pt")).returncode == 0,
          r.stderr)


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


def write_safetensors(path, tensors, metadata=None):
    """A safetensors file written by hand: {name: (dtype, shape, bytes)}."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(t[2] for t in tensors.values()))


HOSTILE = "a\x1b[31mRED\nfake line\x07\u009b2J\u202eevil"  # colour, a forged row, a bell, C1 CSI, bidi


def test_names_and_metadata_from_a_file_cannot_drive_the_terminal(tmp):
    weights = os.path.join(tmp, "w.safetensors")
    write_safetensors(weights, {HOSTILE: ("U8", [4], bytes(4)), "plain": ("U8", [2], bytes(2))},
                      {"note": "title\x1b]0;owned\x07 here", HOSTILE: "x"})
    tmap = os.path.join(tmp, "w.tmap")
    converted = run("convert", weights, tmap)
    shard = "s\x1b[2Jhard.safetensors"
    write_safetensors(os.path.join(tmp, shard), {HOSTILE: ("U8", [4], bytes(4))})
    index = os.path.join(tmp, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": {HOSTILE: shard}}, f)
    plain = os.path.join(tmp, "plain.safetensors")
    write_safetensors(plain, {"plain": ("U8", [2], bytes(2))})
    name = "\\x1b[31mRED\\x0afake line\\x07\\xc2\\x9b2J\\xe2\\x80\\xaeevil"  # as printed
    outputs = {"inspect tmap": (run("inspect", tmap), name), "inspect safetensors": (run("inspect", weights), name),
               "inspect sharded": (run("inspect", index), name), "diff": (run("diff", tmap, plain), name),
               "warm": (run("warm", index), "s\\x1b[2Jhard.safetensors")}
    for what, (r, shown) in outputs.items():
        raw = [c for c in ("\x1b", "\x07", "\u009b", "\u202e") if c in r.stdout + r.stderr]
        forged = [line for line in r.stdout.splitlines() if line.startswith("fake line")]
        check(f"{what}: untrusted names print escaped", converted.returncode == 0 and r.returncode in (0, 1)
              and not raw and not forged and shown in r.stdout,
              f"exit {r.returncode}, raw {raw}, forged {forged}: {r.stdout!r} {r.stderr!r}")
    r = run("inspect", "--json", tmap)
    names = [t["name"] for t in json.loads(r.stdout)["tensors"]]
    check("inspect --json keeps the exact bytes of a name", HOSTILE in names, names)


def test_edit_and_convert_through_a_symlink_write_the_target_and_keep_the_link(tmp):
    real, link = os.path.join(tmp, "real.tmap"), os.path.join(tmp, "link.tmap")
    shutil.copy(os.path.join(VALID, "spec_example.tmap"), real)
    os.symlink("real.tmap", link)
    r = run("edit", link, "--metadata", "x=y")
    check("edit through a symlink edits the target and keeps the link",
          r.returncode == 0 and os.path.islink(link) and described(real)["metadata"].get("x") == "y"
          and sorted(os.listdir(tmp)) == ["link.tmap", "real.tmap"], (r.stderr, os.listdir(tmp)))
    r = run("convert", os.path.join(VALID, "align_64.tmap"), link)
    check("convert onto a symlink replaces the target and keeps the link",
          r.returncode == 0 and os.path.islink(link) and "a" in {t["name"] for t in described(real)["tensors"]},
          r.stderr)


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


def test_hostile_pickles_are_refused_in_bounded_memory(tmp):
    """Issue 29: an 8 MB pickle of popped values once made inspect peak at 1.2 GB.

    Shared values (None, small ints) cost nothing; anything else is charged to a budget of
    20 times the pickle's size plus 1 MiB, so the peak stays under that, plus the pickle's
    own copy and the process (24 MiB)."""
    import zipfile
    libs = subprocess.run(["ldd", CLI], capture_output=True, text=True).stdout
    sanitized = "libasan" in libs or "libubsan" in libs
    size = 8_000_000
    state = b"}q\x00(" + b"K\x01N" * 100_000 + b"u0c__torch__\nM\nq\x010"
    bounded = 21 * size / 2**20 + 24
    for what, body, limit_mib in (
            ("popped Nones", b"N0" * (size // 2), 48), ("popped small ints", b"K\x000" * (size // 3), 48),
            ("one list memoized 4M times", b"0]" + b"q\x00" * (size // 2), 48),
            ("popped lists", b"]0" * (size // 2), bounded), ("lists left on the stack", b"]" * size, bounded),
            ("empty strings", b"\x8c\x00" * (size // 2), bounded), ("memoized lists", b"]\x94" * (size // 2), bounded),
            ("tuples of tuples", b"N" + b"\x85" * size, bounded), ("a Nones stack", b"N" * size, bounded),
            ("marks", b"(" * size, bounded),
            ("one TorchScript state built 800,000 times", b"0" + state + b"h\x01)\x81h\x00b0" * 800_000 + b"h\x00", bounded)):
        path = os.path.join(tmp, "hostile.pt")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", b"\x80\x02}" + body + b".")
            z.writestr("archive/version", "3\n")
        probe = subprocess.run([sys.executable, "-c", (
            "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr)"), CLI, "inspect", path],
            capture_output=True, text=True)
        first, message = probe.stdout.split("\n", 1)
        code, kib = (int(x) for x in first.split())
        ok = code == 1 and "UnsupportedArchive" in message and (sanitized or kib < limit_mib * 1024)
        check(f"8 MB pickle of {what}: exit 1 (UnsupportedArchive), peak RSS {kib / 1024:.1f} MiB < {limit_mib:.0f} MiB",
              ok, message)
    # A path longer than a name may be: refused where it leads to a container, cut where it
    # names a value that is skipped.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}(X\x88\x13\x00\x00" + b"k" * 5000 + b"}(X\x01\x00\x00\x00xK\x01uu.")
        z.writestr("archive/version", "3\n")
    r = run("inspect", path)
    check("a 5000-byte path to a container is refused, naming the limit",
          r.returncode == 1 and "more than the 4096 a name may have" in r.stderr, r.stderr)


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


def big_safetensors(path, size=384 << 20):
    """A safetensors file of one U8 tensor of `size` bytes, sparse (quick to make and read)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + size)


def writing(pid, out_dir):
    """True once process `pid` holds a file of `out_dir` open for writing (named or not)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        for fd in os.listdir(fd_dir):
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith(out_dir + "/") and not target.endswith("in.safetensors"):
                return True
    except OSError:
        pass
    return False


def test_signals_during_convert_leave_nothing(tmp):
    import signal
    import time
    source = os.path.join(tmp, "in.safetensors")
    big_safetensors(source)
    out = os.path.join(tmp, "out.tmap")
    for named in (False, True):
        env = dict(os.environ, TENSORMAP_NAMED_TEMPORARIES="1" if named else "0")
        label = "named temporary" if named else "nameless (O_TMPFILE) file"
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL):
            p = subprocess.Popen([CLI, "convert", source, out], stderr=subprocess.PIPE, text=True, env=env)
            deadline = time.monotonic() + 20
            while p.poll() is None and not writing(p.pid, tmp) and time.monotonic() < deadline:
                time.sleep(0.002)
            caught = p.poll() is None
            p.send_signal(sig)
            err = p.communicate()[1]
            left = sorted(os.listdir(tmp))
            if sig == signal.SIGKILL:
                # Nothing can clean up after kill -9: a nameless file vanishes with the process;
                # a named one stays until a later save of the same path collects it.
                ok = p.returncode == -9 and (left == ["in.safetensors"] or named)
            else:
                ok = p.returncode == 1 and left == ["in.safetensors"] and f"stopped by {sig.name}" in err
            check(f"{sig.name} while convert writes a {label}: exit {'-9' if sig == signal.SIGKILL else '1'}, "
                  "no output, no temporary", caught and ok, (caught, p.returncode, err, left))
            for name in left:
                if name != "in.safetensors":
                    os.unlink(os.path.join(tmp, name))


def test_file_size_limit_is_a_clean_error(tmp):
    import resource
    source = os.path.join(tmp, "in.safetensors")
    big_safetensors(source, 8 << 20)
    out = os.path.join(tmp, "out.tmap")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    for named in ("0", "1"):
        r = subprocess.run([CLI, "convert", source, out], capture_output=True, text=True, preexec_fn=limit,
                           env=dict(os.environ, TENSORMAP_NAMED_TEMPORARIES=named))
        check(f"convert past `ulimit -f` (named temporaries {named}): exit 1 naming the error, nothing left",
              r.returncode == 1 and "File too large" in r.stderr and sorted(os.listdir(tmp)) == ["in.safetensors"],
              (r.returncode, r.stderr, os.listdir(tmp)))


WRITE_PATH_CALLS = ("openat", "pwrite64", "write", "copy_file_range", "ftruncate", "fsync", "fdatasync", "linkat", "rename",
                    "renameat", "renameat2", "unlink", "unlinkat", "flock", "close")


def write_path_calls(args, out_dir, env):
    """The write-path system calls a run of `args` makes, as (name, n): its n-th call of that
    name. Opens and closes count only where they touch out_dir (not the loader's)."""
    log = os.path.join(out_dir + ".strace")
    subprocess.run(["strace", "-f", "-qq", "-o", log, "-e", "trace=" + ",".join(WRITE_PATH_CALLS), CLI, *args],
                   capture_output=True, env=env, check=True)
    seen, points, fds = {}, [], set()
    with open(log) as f:
        for line in f:
            call = line.split(None, 1)[1].split("(", 1)[0] if " " in line else ""
            if call not in WRITE_PATH_CALLS:
                continue
            seen[call] = seen.get(call, 0) + 1
            if call == "openat" and out_dir not in line:
                continue
            if call == "close" and line.split("(", 1)[1].split(")", 1)[0] not in fds:
                continue
            if call == "openat" and "= " in line and line.rsplit("= ", 1)[1].strip().isdigit():
                fds.add(line.rsplit("= ", 1)[1].strip())
            if call == "write" and line.split("(", 1)[1].startswith(("1,", "2,")):
                continue  # the terminal, not the checkpoint
            points.append((call, seen[call]))
    os.unlink(log)
    return points


def test_a_kill_at_every_write_path_system_call_leaves_old_or_new(tmp):
    """Every writer (tensormap, safetensors, torch.save, sharded) killed by SIGKILL at each
    of its write-path system calls in turn (strace's fault injection): the destination is
    then the complete old checkpoint or the complete new one, and any named temporary left
    (killed between naming the file and the rename) is collected by the next save."""
    if not strace_works():
        print("SKIP kills at every write-path call: strace cannot trace here (no ptrace?)")
        return
    old_src, new_src = os.path.join(VALID, "all_dtypes.tmap"), os.path.join(VALID, "spec_example.tmap")
    cases = (("out.tmap", []), ("out.safetensors", []), ("out.pt", []),
             ("out.tmap.index.json", ["--shard-size", "64"]))
    work = os.path.join(tmp, "w")
    for out_name, extra in cases:
        for named in ("0", "1") if out_name == "out.tmap" else ("0",):
            env = dict(traced_env(), TENSORMAP_NAMED_TEMPORARIES=named)
            if os.path.isdir(work):
                subprocess.run(["rm", "-rf", work], check=True)
            os.mkdir(work)
            out = os.path.join(work, out_name)
            assert run("convert", old_src, out, *extra).returncode == 0
            points = write_path_calls(["convert", new_src, out, *extra], work, env)
            assert run("convert", old_src, out, *extra).returncode == 0  # back to the old one
            failures, leftovers = [], 0
            for call, n in points:
                subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=" + call,
                                "-e", f"inject={call}:signal=KILL:when={n}", CLI, "convert", new_src, out, *extra],
                               capture_output=True, env=env)
                same_old = run("diff", out, old_src).returncode == 0
                same_new = run("diff", out, new_src).returncode == 0
                whole = run("verify", out).returncode == 0
                if not (whole and (same_old or same_new)):
                    failures.append(f"{call}#{n}")
                stray = [e for e in os.listdir(work) if ".tmp-" in e]
                leftovers += len(stray)
                for e in stray:  # a dead writer's named temporary: the next save collects it
                    os.utime(os.path.join(work, e), (0, 0))
                if stray or not same_old:
                    assert run("convert", old_src, out, *extra).returncode == 0
                if any(".tmp-" in e for e in os.listdir(work)):
                    failures.append(f"{call}#{n}: a stale temporary was not collected")
            check(f"{out_name} (named temporaries {named}): killed at each of {len(points)} write-path calls, "
                  f"always old or new ({leftovers} named temporaries left, all collected)",
                  len(points) >= 5 and not failures, failures)



def test_edit_removes_puts_and_keeps_the_other_tensors_bytes(tmp):
    a, src = os.path.join(tmp, "a.tmap"), os.path.join(tmp, "src.safetensors")
    assert run("convert", os.path.join(VALID, "all_dtypes.tmap"), a).returncode == 0
    assert run("convert", os.path.join(VALID, "spec_example.tmap"), src).returncode == 0
    before = {t["name"]: t for t in described(a)["tensors"]}
    r = run("edit", a, "--remove", "t_bool", "--put", src, "--metadata", "who=me")
    after = described(a)
    names = [t["name"] for t in after["tensors"]]
    kept_same = all(t["checksum"] == before[t["name"]]["checksum"] for t in after["tensors"] if t["name"] in before)
    check("edit removes, adds and sets metadata; kept tensors keep their bytes and checksums",
          r.returncode == 0 and "t_bool" not in names and names[-1] == "w" and len(names) == 17 and kept_same
          and after["metadata"] == {"who": "me"} and run("verify", a).returncode == 0
          and sorted(os.listdir(tmp)) == ["a.tmap", "src.safetensors"], (r.stdout, r.stderr, names))
    image = open(a, "rb").read()
    nothing = run("edit", a)
    missing = run("edit", a, "--remove", "nope", "--remove", "t_u8")
    other = run("edit", src, "--remove", "w")
    check("edit: nothing to do is a usage error (2); a missing name or a safetensors file is 1, file untouched",
          nothing.returncode == 2 and missing.returncode == 1 and "'nope'" in missing.stderr
          and other.returncode == 1 and "only tensormap files" in other.stderr and open(a, "rb").read() == image
          and sorted(os.listdir(tmp)) == ["a.tmap", "src.safetensors"],
          (nothing.stderr, missing.stderr, other.stderr))
    if not strace_works():
        print("SKIP edit's kill points: strace cannot trace here (no ptrace?)")
        return
    log = os.path.join(tmp, "edit.strace")
    subprocess.run(["strace", "-f", "-qq", "-o", log, "-e", "trace=copy_file_range,pread64", CLI, "edit", a,
                    "--remove", "t_u8"], capture_output=True, env=traced_env(), check=True)
    calls = open(log).read()
    os.unlink(log)
    check("edit copies the kept tensors with copy_file_range, not read and write",
          "copy_file_range(" in calls and "= -1" not in calls.split("copy_file_range(", 1)[1].split("\n", 1)[0],
          calls[-2000:])
    # Killed at each write-path call: the file is the whole old one or the whole new one.
    work = os.path.join(tmp, "w")
    os.mkdir(work)
    old, out = os.path.join(work, "old.tmap"), os.path.join(work, "m.tmap")
    assert run("convert", a, old).returncode == 0
    shutil.copy(old, out)
    args = ["edit", out, "--remove", "t_i8", "--put", src]
    points = write_path_calls(args, work, traced_env())  # runs the edit once, whole
    new = os.path.join(tmp, "new.tmap")
    shutil.copy(out, new)
    shutil.copy(old, out)
    assert run("diff", new, old).returncode == 1, "the edit changed the file"
    failures = []
    for call, n in points:
        subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=" + call,
                        "-e", f"inject={call}:signal=KILL:when={n}", CLI, *args], capture_output=True, env=traced_env())
        same_old, same_new = run("diff", out, old).returncode == 0, run("diff", out, new).returncode == 0
        if not (run("verify", out).returncode == 0 and (same_old or same_new)):
            failures.append(f"{call}#{n}")
        shutil.copy(old, out)
        for e in os.listdir(work):
            if ".tmp-" in e:
                os.unlink(os.path.join(work, e))
    check(f"edit killed at each of {len(points)} write-path calls: always the old file or the new one",
          len(points) >= 5 and not failures, failures)


def strace_works():
    return subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


def traced_env():
    """The environment for a CLI run under strace. LeakSanitizer cannot run under ptrace
    (it aborts at exit), and the sanitizer build's CLI is traced too: leaks are checked
    by every untraced run instead."""
    asan = ":".join(o for o in (os.environ.get("ASAN_OPTIONS", ""), "detect_leaks=0") if o)
    return dict(os.environ, ASAN_OPTIONS=asan)


def test_a_file_replaced_by_rename_while_it_is_opened_is_read_whole(tmp):
    """The input is replaced by rename (as every writer publishes) right after the CLI's
    open of it returns: strace holds the process in that openat for two seconds while the
    test renames another checkpoint over the path. Whatever the CLI does next must come
    from the file it opened: convert writes exactly the old checkpoint, verify finds it
    sound. A reader that opens or maps the path a second time mixes the two files."""
    import time
    if not strace_works():
        print("SKIP rename during open: strace cannot trace here (no ptrace?)")
        return
    old_src, new_src = os.path.join(VALID, "all_dtypes.tmap"), os.path.join(VALID, "spec_example.tmap")
    for ext in ("tmap", "safetensors", "pt"):
        old, new, path = (os.path.join(tmp, f"{n}.{ext}") for n in ("old", "new", "in"))
        for src, dst in ((old_src, old), (new_src, new)):
            assert run("convert", src, dst).returncode == 0
        for command in (["convert", path, os.path.join(tmp, "out.tmap")], ["verify", path]):
            subprocess.run(["cp", old, path], check=True)
            log = os.path.join(tmp, "opens.strace")
            subprocess.run(["strace", "-f", "-qq", "-o", log, "-e", "trace=openat", CLI, *command],
                           capture_output=True, check=True, env=traced_env())
            with open(log) as f:
                opens = [i + 1 for i, line in enumerate(f) if f'"{path}"' in line]
            p = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=openat", "-e",
                                  f"inject=openat:delay_exit=2000000:when={opens[0]}", CLI, *command],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=traced_env())
            replaced, deadline = False, time.monotonic() + 30
            while not replaced and p.poll() is None and time.monotonic() < deadline:
                children = []
                for task in os.listdir(f"/proc/{p.pid}/task"):
                    with open(f"/proc/{p.pid}/task/{task}/children") as f:
                        children += f.read().split()
                for child in children:
                    try:
                        held = [os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")]
                    except OSError:
                        held = []
                    if path in held:
                        subprocess.run(["cp", new, path + ".next"], check=True)
                        os.rename(path + ".next", path)
                        replaced = True
                time.sleep(0.005)
            out, err = p.communicate()
            if command[0] == "convert":
                ok = p.returncode == 0 and run("diff", command[2], old).returncode == 0
            else:
                ok = p.returncode == 0
            check(f"{command[0]} of a .{ext} replaced by rename just after its open reads the opened file "
                  f"({len(opens)} open(s) of the path)", replaced and ok, (replaced, p.returncode, out, err))


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
