"""Round trips through every pair of formats, for every dtype each pair can hold.

Formats: tensormap, safetensors, sharded tensormap, sharded safetensors, torch.save.
Every one of the 17 dtypes goes between the first four; torch.save (LibTorch 1.13) holds
the 12 that have a LibTorch dtype, so pairs with it use those. For every pair A -> B the
origin is converted to A, then A to B, and B must equal the origin bit for bit
(`tensormap diff` exits 0). Then `convert --dtype` must give, bit for bit, what torch's
Tensor.to gives, on values chosen to be hard: halfway cases, subnormals, overflow (NaN
must stay NaN).
Usage: check_round_trips.py PATH/TO/tensormap
"""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = os.path.join(ROOT, "format", "valid", "all_dtypes.tmap")
TORCH_DTYPES = os.path.join(ROOT, "tests", "fixtures", "torch_save", "all_dtypes.pt")

FORMATS = {  # name -> (file name, extra convert arguments)
    "tensormap": ("m.tmap", []),
    "safetensors": ("m.safetensors", []),
    "sharded tensormap": ("m.tmap.index.json", ["--shard-size", "200"]),
    "sharded safetensors": ("m.safetensors.index.json", ["--shard-size", "200"]),
    "torch.save": ("m.pt", []),
}


def main(cli):
    passed = failed = 0

    def run(*args):
        return subprocess.run([cli, *args], capture_output=True, text=True)

    for a in FORMATS:
        for b in FORMATS:
            origin = TORCH_DTYPES if "torch.save" in (a, b) else ALL
            with tempfile.TemporaryDirectory() as tmp:
                da, db = os.path.join(tmp, "a"), os.path.join(tmp, "b")
                os.mkdir(da)
                os.mkdir(db)
                pa = os.path.join(da, FORMATS[a][0])
                pb = os.path.join(db, FORMATS[b][0])
                steps = [run("convert", origin, pa, *FORMATS[a][1]), run("convert", pa, pb, *FORMATS[b][1]),
                         run("diff", origin, pb)]
                ok = all(s.returncode == 0 for s in steps)
                passed, failed = passed + ok, failed + (not ok)
                detail = "" if ok else " | ".join((s.stdout + s.stderr).strip()[:300] for s in steps if s.returncode)
                print(("ok   " if ok else "FAIL ") + f"{a} -> {b}" + (f": {detail}" if detail else ""))
    ok, lines = check_float_conversions(run)
    for line in lines:
        print(line)
    passed, failed = passed + ok, failed + (not ok)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def hard_floats(torch):
    """F32 and F64 values around every rounding edge of F16 and BF16, and random ones."""
    g = torch.Generator().manual_seed(0)
    f32 = torch.cat([
        torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25,
                      1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.4e38,
                      float("inf"), float("-inf"), float("nan")]),
        torch.randn(4096, generator=g) * 10.0 ** torch.randint(-12, 12, (4096,), generator=g).float(),
    ]).float()
    # Every float between two F16 (and two BF16) neighbours' halfway points, near 1.
    f32 = torch.cat([f32, (torch.arange(0x3F7FF000, 0x3F801000, dtype=torch.int64).int()).view(torch.float32)])
    return f32


def check_float_conversions(run):
    import torch
    lines, ok = [], True
    values = hard_floats(torch)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "floats.pt")
        torch.save({"f32": values, "f64": values.double() * (1 + 2.0 ** -30)}, source)
        for target, dtype in (("F16", torch.float16), ("BF16", torch.bfloat16), ("F32", torch.float32),
                              ("F64", torch.float64)):
            out = os.path.join(tmp, f"to_{target}.pt")
            step = run("convert", source, out, "--dtype", target)
            if step.returncode != 0:
                ok = False
                lines.append(f"FAIL convert --dtype {target}: {step.stderr.strip()[:300]}")
                continue
            converted = torch.load(out)
            expected = torch.load(source)
            for name in ("f32", "f64"):
                want = expected[name].to(dtype)
                got = converted[name]
                bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
                # NaN stays NaN; its bits differ between torch's own code paths (1.13's
                # vectorised BF16 gives 0xFFFF, its scalar one 0x7FC0), so only that is asked.
                nan = want.isnan()
                same = (got.dtype == dtype and torch.equal(got.isnan(), nan)
                        and torch.equal(got.view(bits)[~nan], want.view(bits)[~nan]))
                ok = ok and same
                lines.append(("ok   " if same else "FAIL ") + f"convert --dtype {target} of {name} equals torch's .to(), bit for bit")
    return ok, lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
