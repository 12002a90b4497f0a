"""Training checkpoints across ranks: save_distributed from 2 and 4 processes over gloo on
loopback (a FileStore), loads at other world sizes, kills, background saves."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import tensormap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.environ.get("TENSORMAP_CLI", os.path.join(ROOT, "build", "tensormap"))
SPLITS = [("*.up.*", 0), ("*.down.weight", 1)]

# A rank: builds its part of a Megatron-style model (column-parallel `up`, row-parallel
# `down`, replicated biases and norms) from the whole model's file, then does `action`.
RANK = r"""
import faulthandler, json, os, sys, time, torch, torch.distributed as dist, tensormap, tensormap.distributed
action, folder, rank, world, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
faulthandler.dump_traceback_later(float(sys.argv[7]), exit=True)  # a hung rank says where, and ends
dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, sys.argv[6]), rank=rank,
                        world_size=world)
splits = [("*.up.*", 0), ("*.down.weight", 1)]


class Block(torch.nn.Module):
    def __init__(self, d, h, world):
        super().__init__()
        self.up = torch.nn.Linear(d, h // world)
        self.down = torch.nn.Linear(h // world, d)
        self.norm = torch.nn.LayerNorm(d)


def model_for(world):
    return torch.nn.Sequential(*[Block(size, 4 * size, world) for _ in range(2)])


def part(full, name, rank, world):
    t = full.get_tensor(name)
    for pattern, dim in splits:
        if tensormap.distributed._matches(pattern, name):
            n = t.shape[dim] // world
            return t.narrow(dim, rank * n, n)
    return t


index = os.path.join(folder, "ckpt.tmap.index.json")
model = model_for(world)
with tensormap.open(os.path.join(folder, "full.tmap")) as full, torch.no_grad():
    for name, p in model.state_dict(keep_vars=True).items():
        p.copy_(part(full, name, rank, world))
if action == "save":
    tensormap.save_distributed(model, index, splits)
elif action == "check":  # this rank's part, read from the index, against the whole model's
    with tensormap.open(index) as ckpt, tensormap.open(os.path.join(folder, "full.tmap")) as full:
        for name in full.keys():
            t = full.get_tensor(name)
            got = ckpt.get_slice(name)
            for pattern, dim in splits:
                if tensormap.distributed._matches(pattern, name):
                    n = t.shape[dim] // world
                    index_ = [slice(None)] * t.dim()
                    index_[dim] = slice(rank * n, (rank + 1) * n)
                    got, t = got[tuple(index_)], t.narrow(dim, rank * n, n)
                    break
            else:
                got = got[:]
            assert torch.equal(got, t), name
elif action == "load-part":  # this rank's part loaded from the index, each mode, checked against the whole
    with tensormap.open(os.path.join(folder, "full.tmap")) as full:
        for mode in ("map", "copy"):
            mine = model_for(world)
            report = tensormap.load(mine, index, mode=mode, splits=splits)  # rank, world: torch.distributed's
            assert report.complete, report
            for name, t in mine.state_dict().items():
                assert torch.equal(t, part(full, name, rank, world)), (mode, name)
elif action == "background":
    handle = tensormap.save_distributed(model, index, splits, background=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on: the checkpoint keeps the values of the call
    handle.wait()
    assert handle.done()
elif action == "background-fails":
    handle = tensormap.save_distributed(model, os.path.join(folder, "missing", "x.tmap.index.json"), splits,
                                        background=True)
    try:
        handle.wait()
    except tensormap.Error as e:
        print("raised", e.kind, str(e).split(":")[0], flush=True)
elif action in ("mismatch", "background-mismatch"):  # rank 1 holds one tensor more
    state = dict(model.state_dict(), **({"extra": torch.zeros(3)} if rank == 1 else {}))
    try:
        handle = tensormap.save_distributed(state, index, splits, background=action == "background-mismatch")
        if handle is not None:
            handle.wait()
    except tensormap.Error as e:
        print("raised", e.kind, str(e).split(":")[0], flush=True)
elif action == "in-flight":  # another save of a checkpoint whose background save is in flight
    first = tensormap.save_distributed(model, index, splits, background=True)
    for background in (False, True):
        try:
            later = tensormap.save_distributed(model, index, splits, background=background)
            if later is not None:
                later.wait()
            print("not refused", flush=True)
        except tensormap.Error as e:
            print("refused", e.kind, "in flight" in str(e), flush=True)
    first.wait()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    tensormap.save_distributed(model, index, splits)
elif action == "slow-save":
    print("ready", flush=True)
    tensormap.save_distributed(model, index, splits)
# A rank leaves only once every rank has its connections up: one that made no collective
# (load-part) could otherwise close its end while a peer still builds gloo's full mesh
# ("connectFullMesh failed ... Connection closed by peer"). Over held tensors, as saves do.
tensormap.distributed._agree(dist, None, world, None)
dist.destroy_process_group()
"""


def start_ranks(folder, action, world, size, streams, timeout=120):
    """The ranks of one job, rank r writing to streams[r] (stdout, stderr). Each job meets in
    a store of its own (one a killed job left could only mislead the next), and gloo binds
    loopback without resolving the host's name. A rank still running after `timeout` s
    prints its stacks and exits."""
    store = f"store-{action}-{os.urandom(4).hex()}"
    env = dict(os.environ, USE_LIBUV="0", GLOO_SOCKET_IFNAME="lo")
    return [subprocess.Popen([sys.executable, "-c", RANK, action, str(folder), str(r), str(world), str(size), store,
                              str(timeout)], stdout=out, stderr=err, text=True, env=env)
            for r, (out, err) in enumerate(streams)]


def run_ranks(folder, action, world, size=16, timeout=120):
    # Files, not pipes: a rank blocked on a full pipe would hold up the collective its
    # peers wait in.
    names = [(folder / f"rank-{action}-{r}.out", folder / f"rank-{action}-{r}.err") for r in range(world)]
    streams = [(open(o, "w"), open(e, "w")) for o, e in names]
    try:
        procs = start_ranks(folder, action, world, size, streams, timeout)
        for p in procs:
            try:
                p.wait(timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                    q.wait()
    finally:
        for o, e in streams:
            o.close()
            e.close()
    outs = [(o.read_text(), e.read_text()) for o, e in names]
    for o, e in names:
        o.unlink()
        e.unlink()
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} of {world} ({action}) ended with {p.returncode}: {err[-3000:]}"
    return [out for out, _ in outs]


class Block(torch.nn.Module):  # as the ranks build it
    def __init__(self, d, h, world):
        super().__init__()
        self.up = torch.nn.Linear(d, h // world)
        self.down = torch.nn.Linear(h // world, d)
        self.norm = torch.nn.LayerNorm(d)


def model_for(size, world):
    return torch.nn.Sequential(*[Block(size, 4 * size, world) for _ in range(2)])


def whole_model(folder, size=16, seed=0):
    """The whole model (world size 1), saved as full.tmap, from which the ranks take their parts."""
    torch.manual_seed(seed)
    model = model_for(size, 1)
    with torch.no_grad():
        for block in model:
            block.norm.weight.uniform_()
            block.norm.bias.uniform_()
    tensormap.save(model, folder / "full.tmap")
    return model


def test_saved_at_two_ranks_it_reads_whole_and_at_one_two_and_four(tmp_path):
    whole = whole_model(tmp_path)
    run_ranks(tmp_path, "save", 2)
    names = sorted(os.listdir(tmp_path))
    # Each rank names its file with an id of its own: in rank order, not the names'.
    rank_files = sorted((n for n in names if n.startswith("ckpt-")), key=lambda n: n[n.index("-rank"):])
    assert len(rank_files) == 2 and all(f.endswith(f"-rank0000{r}-of-00002.tmap") for r, f in enumerate(rank_files))
    index = json.loads((tmp_path / "ckpt.tmap.index.json").read_text())
    assert set(index["parts"]) == {f"{b}.{x}" for b in "01" for x in ("up.weight", "up.bias", "down.weight")}
    with tensormap.open(tmp_path / "ckpt.tmap.index.json") as ckpt, tensormap.open(tmp_path / "full.tmap") as full:
        assert sorted(ckpt.keys()) == sorted(full.keys())
        for name in full.keys():
            assert torch.equal(ckpt.get_tensor(name), full.get_tensor(name)), name
    for mode in ("map", "copy"):  # at world size 1
        model = model_for(16, 1)
        report = tensormap.load(model, tmp_path / "ckpt.tmap.index.json", mode=mode)
        assert report.complete
        for (name, a), b in zip(model.state_dict().items(), whole.state_dict().values()):
            assert torch.equal(a, b), (mode, name)
    run_ranks(tmp_path, "check", 2)
    run_ranks(tmp_path, "check", 4)
    run_ranks(tmp_path, "load-part", 4)  # tensormap.load(..., splits=) at another world size
    # The command line reads it as one model.
    r = subprocess.run([CLI, "verify", str(tmp_path / "ckpt.tmap.index.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([CLI, "inspect", str(tmp_path / "ckpt.tmap.index.json")], capture_output=True, text=True)
    assert r.returncode == 0 and "0.up.weight" in r.stdout and "[64,16]" in r.stdout, r.stdout + r.stderr
    for out, extra in (("one.tmap", []), ("shards.safetensors.index.json", ["--shard-size", "4K"])):
        r = subprocess.run([CLI, "convert", str(tmp_path / "ckpt.tmap.index.json"), str(tmp_path / out), *extra],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([CLI, "diff", str(tmp_path / out), str(tmp_path / "full.tmap")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_kill_of_one_rank_at_any_point_leaves_the_old_checkpoint(tmp_path):
    whole_model(tmp_path, size=1024)  # 2 blocks of 32 MiB: a save takes a while
    run_ranks(tmp_path, "save", 2, size=1024)
    index = tmp_path / "ckpt.tmap.index.json"
    old_index = index.read_bytes()
    with tensormap.open(tmp_path / "full.tmap") as full:
        reference = {name: full.get_tensor(name).clone() for name in full.keys()}
    # The model changes, so that a new checkpoint would differ from the old one.
    whole_model(tmp_path, size=1024, seed=5)
    with tensormap.open(tmp_path / "full.tmap") as full:
        new_reference = {name: full.get_tensor(name).clone() for name in full.keys()}
    rnd = random.Random(11)
    interrupted = 0
    for trial in range(6):
        procs = start_ranks(tmp_path, "slow-save", 2, 1024, [(subprocess.PIPE, subprocess.DEVNULL)] * 2)
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.0, 0.12))
        victim = rnd.randrange(2)
        procs[victim].send_signal(signal.SIGKILL)
        time.sleep(0.2)
        procs[1 - victim].send_signal(signal.SIGKILL)  # the job dies with it
        for p in procs:
            p.wait()
            p.stdout.close()
        now = index.read_bytes()
        if now == old_index:
            interrupted += 1  # the old checkpoint, whole
        else:
            old_index, reference = now, new_reference  # committed before its kill: the new one, whole
        with tensormap.open(index) as ckpt:
            assert sorted(ckpt.keys()) == sorted(reference)
            for name, t in reference.items():
                assert torch.equal(ckpt.get_tensor(name), t), (trial, name)
        r = subprocess.run([CLI, "verify", str(index)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert interrupted > 0, "every save committed before its kill: the kills came too late to test anything"
    # The next save collects what the killed ones left.
    run_ranks(tmp_path, "save", 2, size=1024)
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt") or n.startswith(".ckpt"))
    assert len(left) == 3, left


def test_a_background_distributed_save_holds_the_values_of_the_call(tmp_path):
    whole_model(tmp_path)
    run_ranks(tmp_path, "background", 2)
    with tensormap.open(tmp_path / "ckpt.tmap.index.json") as ckpt, tensormap.open(tmp_path / "full.tmap") as full:
        for name in full.keys():
            assert torch.equal(ckpt.get_tensor(name), full.get_tensor(name)), name


def test_a_background_distributed_saves_error_is_raised_by_wait_on_every_rank(tmp_path):
    whole_model(tmp_path)
    outs = run_ranks(tmp_path, "background-fails", 2)
    for out in outs:
        assert out.startswith("raised Io rank "), outs
    assert not any(n.startswith("x") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_models_that_differ_across_ranks_fail_every_rank_and_leave_no_file(tmp_path, background):
    """In the foreground the ranks agree before writing; in the background the call makes no
    collective, so wait() finds the mismatch, and each rank removes the file it wrote."""
    whole_model(tmp_path)
    outs = run_ranks(tmp_path, "background-mismatch" if background else "mismatch", 2)
    for out in outs:
        assert out.startswith("raised ModelMismatch ") and "ckpt.tmap.index.json" in out, outs
    assert not any(n.startswith("ckpt") for n in os.listdir(tmp_path)), os.listdir(tmp_path)


def test_another_save_of_a_checkpoint_in_flight_is_refused_until_wait(tmp_path):
    whole_model(tmp_path)
    outs = run_ranks(tmp_path, "in-flight", 2)
    for out in outs:
        assert out.split("\n")[:2] == ["refused InvalidArgument True"] * 2, outs
    with tensormap.open(tmp_path / "ckpt.tmap.index.json") as ckpt:
        for name in ckpt.keys():
            assert bool((ckpt.get_tensor(name) == 3.0).all()), name
    assert len([n for n in os.listdir(tmp_path) if "-rank" in n]) == 2, os.listdir(tmp_path)
