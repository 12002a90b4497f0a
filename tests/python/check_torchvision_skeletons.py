"""Every torchvision classification model, built under tensormap.skeleton(): no weight memory
whatever its initialisation does, and map-loaded outputs equal to the original's.

Each model runs in a fresh child process (forked from a parent that has imported torch and
torchvision and computed nothing, so its RssAnon figures are its own):
1. RssAnon before and after `with tensormap.skeleton(): model = ctor()`: the growth must
   stay under 5% of the model's parameter bytes or 8 MiB, whichever is larger (swin,
   convnext, inception and googlenet run trunc_normal_'s in-place arithmetic on weights).
2. For models of at most --max-params parameters: the model built normally (seeded), its
   eval output on one fixed input, saved as .tmap and .safetensors; each file map-loaded
   into a new skeleton must give exactly the same output.

    check_torchvision_skeletons.py [--max-params N] [--only NAME,...]

Exits 1 naming every model that failed; prints one line per model.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torchvision
from torchvision import models

import tensormap
from process_memory import rss_anon

MIB = 1 << 20


def classification_models():
    if hasattr(models, "list_models"):  # torchvision >= 0.14
        return sorted(models.list_models(module=models))
    raise SystemExit("torchvision %s has no list_models" % torchvision.__version__)


def tensor_bytes(model):
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def check_one(name, max_params, work):
    """Runs in the child: returns a dict of figures; raises on a failed check."""
    ctor = getattr(models, name)
    before = rss_anon()
    started = time.perf_counter()
    with tensormap.skeleton():
        skeleton = ctor()
    build_ms = (time.perf_counter() - started) * 1e3
    growth = rss_anon() - before
    weight_bytes = tensor_bytes(skeleton)
    params = sum(p.numel() for p in skeleton.parameters())
    limit = max(weight_bytes // 20, 8 * MIB)
    result = {"model": name, "params": params, "weights_mib": weight_bytes / MIB,
              "growth_mib": growth / MIB, "build_ms": build_ms, "compared": []}
    if growth >= limit:
        raise AssertionError(f"{name}: building under skeleton() grew RssAnon by {growth / MIB:.1f} MiB, "
                             f"over the limit of {limit / MIB:.1f} MiB ({weight_bytes / MIB:.1f} MiB of tensors)")
    released = [n for n, p in skeleton.named_parameters() if not tensormap.is_released(p)]
    if released:
        raise AssertionError(f"{name}: parameters left unreleased by skeleton(): {released[:5]}")
    del skeleton
    if params > max_params:
        return result

    torch.manual_seed(0)
    original = ctor().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(x)
    for suffix in ("tmap", "safetensors"):
        path = os.path.join(work, f"{name}.{suffix}")
        tensormap.save(original, path)
        with tensormap.skeleton():
            model = ctor()
        tensormap.load(model, path, mode="map")
        model.eval()
        with torch.no_grad():
            got = model(x)
        if not torch.equal(got, expected):
            raise AssertionError(f"{name}: the output after a map load of {suffix} differs from the original's "
                                 f"(max difference {(got - expected).abs().max().item()})")
        result["compared"].append(suffix)
        del model
        os.unlink(path)
    return result


def run_in_child(name, max_params, work):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report as one JSON line, then leave without cleanup
        os.close(read_end)
        try:
            report = {"ok": True, **check_one(name, max_params, work)}
        except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
            report = {"ok": False, "model": name, "error": f"{type(e).__name__}: {e}",
                      "trace": traceback.format_exc()}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"ok": False, "model": name, "error": f"the child died (wait status {status})"}
    return json.loads(b"".join(chunks))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-params", type=float, default=30e6,
                        help="compare outputs for models of at most this many parameters (default 30e6)")
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    args = parser.parse_args()
    names = classification_models()
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}: {len(names)} classification models")
    failed = []
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            r = run_in_child(name, int(args.max_params), work)
            if not r["ok"]:
                failed.append(name)
                print(f"FAIL {name}: {r['error']}\n{r.get('trace', '')}")
                continue
            print(f"ok   {name:22s} {r['params'] / 1e6:7.1f}M params, {r['weights_mib']:8.1f} MiB, "
                  f"skeleton +{r['growth_mib']:5.1f} MiB RssAnon in {r['build_ms']:6.1f} ms, "
                  f"outputs equal after map load: {', '.join(r['compared']) or '(not compared: large)'}")
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
