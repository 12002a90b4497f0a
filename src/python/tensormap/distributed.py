"""Training checkpoints across ranks: every rank of a torch.distributed group saves its own
part, and the result reads as one model (spec/FORMAT.md, section 16).

The protocol is the C++ save_distributed's (tensormap/distributed.h), over
torch.distributed's collectives: the ranks agree on their models, each writes one file of
its own, and rank 0 writes the index last, once every file is in place: the commit.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _C


def _matches(pattern: str, name: str) -> bool:
    """ParallelPlan's patterns: '*' matches any run of characters, nothing else is special."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), name, re.DOTALL) is not None


# The tensors of this save's agreements, held until the next save. torch 2.6's gloo may
# drop its last reference to a collective's tensors on a worker thread just after the
# collective returns; were that the last reference, the worker would need the GIL, which
# destroy_process_group holds while it joins the workers: a deadlock (fixed after 2.6 by
# pytorch/pytorch#154976). Every save ends with an agreement, so it leaves no tensor of
# its own for gloo to drop.
_held: List[torch.Tensor] = []


def _gather(dist, group, world: int, t: torch.Tensor) -> List[torch.Tensor]:
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    _held.extend(out + [t])
    return out


def _agree(dist, group, world: int, failure: Optional[Tuple[str, str]]) -> None:
    """Every rank learns whether any rank failed; all raise the lowest failing rank's error."""
    from . import _error
    failed = _gather(dist, group, world, torch.tensor([failure is not None], dtype=torch.int64))
    if not any(int(f) for f in failed):
        return
    text = torch.tensor(bytearray(json.dumps(failure).encode()), dtype=torch.uint8)
    lengths = _gather(dist, group, world, torch.tensor([text.numel()], dtype=torch.int64))
    longest = max(int(n) for n in lengths)
    texts = _gather(dist, group, world, torch.cat([text, torch.zeros(longest - text.numel(), dtype=torch.uint8)]))
    for rank, (t, n) in enumerate(zip(texts, lengths)):
        f = json.loads(bytes(t[:int(n)].tolist()).decode())
        if f is not None:
            raise _error(f[0], f"rank {rank} of {world}: {f[1]}")


def _attempt(step) -> Optional[Tuple[str, str]]:
    try:
        step()
    except _C.Error as e:
        return (getattr(e, "kind", "Io"), str(e))
    except (RuntimeError, ValueError, OSError, TypeError) as e:
        return ("InvalidArgument" if isinstance(e, (ValueError, TypeError)) else "Io", str(e))
    return None


class DistributedSave:
    """A background distributed save (save_distributed(..., background=True)): every rank's
    file is written by a child process; ``wait()``, called by every rank together, waits
    for them, then commits (rank 0 writes the index). ``done()``: this rank's file only."""

    def __init__(self, finish, handle):
        self._finish, self._handle = finish, handle

    def done(self) -> bool:
        return self._handle is None or self._handle.done()

    def wait(self) -> None:
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()


def save_distributed(obj: Union[torch.nn.Module, dict], path, splits: Sequence[Tuple[str, int]] = (), *,
                     group=None, sync: bool = True, background: bool = False) -> Optional[DistributedSave]:
    from . import _path, _state_items

    import torch.distributed as dist
    path = _path(path)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    items = _state_items(obj, "tensormap.save_distributed")
    _held.clear()  # the last save's: its collectives ended long ago
    dims: List[int] = [-1] * len(items)
    describe: List[tuple] = []

    def check():
        from . import _error
        _C.distributed_file_name(path, "0" * 16, rank, world)  # the index's name
        for i, (name, t) in enumerate(items):
            if t.is_meta:
                raise _error("InvalidArgument", f"{path}: tensor {name!r} holds no data to save")
            for pattern, dim in splits:
                if _matches(pattern, name):
                    d = dim + t.dim() if dim < 0 else dim
                    if not 0 <= d < t.dim():
                        raise ValueError(f"{path}: the splits split dimension {dim} of tensor {name!r}, "
                                         f"of rank {t.dim()}")
                    dims[i] = d
                    break
            describe.append((name, dims[i], str(t.dtype), tuple(t.shape)))

    _agree(dist, group, world, _attempt(check))
    # 1. The models agree: names, splits, dtypes, part shapes.
    everyone: List[list] = [None] * world
    dist.all_gather_object(everyone, describe, group=group)
    for other in everyone:
        if other != describe:
            at = next((i for i, (a, b) in enumerate(zip(other, describe)) if a != b), min(len(other), len(describe)))
            from . import _error
            raise _error("ModelMismatch", f"{path}: the ranks' models differ at tensor {at}"
                         + (f" ({items[at][0]!r} here)" if at < len(items) else "")
                         + ": its name, split, dtype or shape")
    # 2. Who writes each replicated tensor: the rank with the fewest bytes so far.
    nbytes = [t.numel() * t.element_size() for _, t in items]
    load = [sum(n for n, d in zip(nbytes, dims) if d >= 0)] * world
    owner = [-1] * len(items)
    for i, d in enumerate(dims):
        if d < 0:
            owner[i] = min(range(world), key=lambda r: (load[r], r))
            load[owner[i]] += nbytes[i]
    # 3. This save's id, rank 0's, names every rank's file.
    box = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    save_id = box[0]
    folder = os.path.dirname(path) or "."
    files = [_C.distributed_file_name(path, save_id, r, world) for r in range(world)]
    own = {name: t for (name, t), d, o in zip(items, dims, owner) if d >= 0 or o == rank}

    def commit():
        whole = [(name, files[o]) for (name, _), d, o in zip(items, dims, owner) if d < 0]
        split = []
        for (name, t), d in zip(items, dims):
            if d >= 0:
                shape = list(t.shape)
                shape[d] *= world
                split.append((name, d, shape, files))
        total = sum(n if d < 0 else n * world for n, d in zip(nbytes, dims))
        _C.publish_distributed_index(path, whole, split, total, sync)

    def finish(handle, start_failure=None):
        _agree(dist, group, world, start_failure or (_attempt(handle.wait) if handle is not None else None))
        _agree(dist, group, world, _attempt(commit) if rank == 0 else None)

    from . import save
    target = os.path.join(folder, files[rank])
    if background:
        handle = [None]

        def start():
            if own:
                handle[0] = save(own, target, sync=sync, background=True)

        # No agreement here: the call returns without waiting for the other ranks' forks; a
        # rank whose save did not start says so at wait(), which every rank calls.
        failure = _attempt(start)
        return DistributedSave(lambda: finish(handle[0], failure), handle[0])
    _agree(dist, group, world, _attempt(lambda: save(own, target, sync=sync) if own else None))
    finish(None)
    return None
