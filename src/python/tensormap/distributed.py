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
# pytorch/pytorch#154976). Every collective of a save runs over these held tensors
# (_gather, _exchange; never all_gather_object), so it leaves none for gloo to drop.
_held: List[torch.Tensor] = []

# The index paths of background saves started here and not yet waited for. Another save of
# the same checkpoint meanwhile is refused: its commit would remove the files of the one
# in flight, which are not in the index yet.
_in_flight: set = set()


def _gather(dist, group, world: int, t: torch.Tensor) -> List[torch.Tensor]:
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    _held.extend(out + [t])
    return out


def _exchange(dist, group, world: int, value) -> list:
    """Every rank's `value` (JSON-able), in rank order, over _gather's held tensors (not
    all_gather_object, whose tensors gloo could be the last to hold)."""
    data = torch.tensor(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    lengths = _gather(dist, group, world, torch.tensor([data.numel()], dtype=torch.int64))
    longest = max(int(n) for n in lengths)
    texts = _gather(dist, group, world, torch.cat([data, torch.zeros(longest - data.numel(), dtype=torch.uint8)]))
    return [json.loads(bytes(t[:int(n)].tolist()).decode()) for t, n in zip(texts, lengths)]


def _agree(dist, group, world: int, failure: Optional[Tuple[str, str]]) -> None:
    """Every rank learns whether any rank failed; all raise the lowest failing rank's error."""
    from . import _error
    failed = _gather(dist, group, world, torch.tensor([failure is not None], dtype=torch.int64))
    if not any(int(f) for f in failed):
        return
    for rank, f in enumerate(_exchange(dist, group, world, failure)):
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

    def __init__(self, finish, handle, key: Optional[str]):
        self._finish, self._handle, self._key = finish, handle, key
        if key is not None:
            _in_flight.add(key)

    def done(self) -> bool:
        return self._handle is None or self._handle.done()

    def wait(self) -> None:
        finish, self._finish = self._finish, None
        try:
            if finish is not None:
                finish()
        finally:
            self._forget()

    def _forget(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            _in_flight.discard(key)

    def __del__(self):  # not waited for: its file is written, nothing is committed
        self._forget()


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
    files: List[Optional[str]] = [None] * world

    def check():
        from . import _error
        # This rank's file, named with an id of its own (the index names every file);
        # checks the index's name too.
        files[rank] = _C.distributed_file_name(path, secrets.token_hex(8), rank, world)
        if os.path.abspath(path) in _in_flight:
            raise _error("InvalidArgument", f"{path}: a background distributed save of this checkpoint is in "
                         "flight; wait() for its handle before saving it again")
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

    def agree_on_models(names):
        """Every rank's description and file name: models that differ fail every rank."""
        mine = json.loads(json.dumps(describe))  # as the others' arrive: lists, not tuples
        everyone = _exchange(dist, group, world, [mine, names[rank]])
        for other, _ in everyone:
            if other != mine:
                at = next((i for i, (a, b) in enumerate(zip(other, mine)) if a != b), min(len(other), len(mine)))
                from . import _error
                raise _error("ModelMismatch", f"{path}: the ranks' models differ at tensor {at}"
                             + (f" ({items[at][0]!r} here)" if at < len(items) else "")
                             + ": its name, split, dtype or shape")
        names[:] = [name for _, name in everyone]

    def owners():
        """Who writes each replicated tensor: the rank with the fewest bytes so far. Each
        rank works it out alone; ranks whose models agree work out the same."""
        load = [sum(n for n, d in zip(nbytes, dims) if d >= 0)] * world
        owner = [-1] * len(items)
        for i, d in enumerate(dims):
            if d < 0:
                owner[i] = min(range(world), key=lambda r: (load[r], r))
                load[owner[i]] += nbytes[i]
        return owner

    def commit(files):
        whole = [(name, files[o]) for (name, _), d, o in zip(items, dims, owner) if d < 0]
        split = []
        for (name, t), d in zip(items, dims):
            if d >= 0:
                shape = list(t.shape)
                shape[d] *= world
                split.append((name, d, shape, files))
        total = sum(n if d < 0 else n * world for n, d in zip(nbytes, dims))
        _C.publish_distributed_index(path, whole, split, total, sync)

    from . import save
    folder = os.path.dirname(path) or "."
    nbytes = [t.numel() * t.element_size() for _, t in items]
    owner: List[int] = []

    def own():
        return {name: t for (name, t), d, o in zip(items, dims, owner) if d >= 0 or o == rank}

    def target():  # this rank's file, once check() has named it
        return os.path.join(folder, files[rank])

    if background:
        # No collective here: the call checks this rank's model, forks and returns. The
        # ranks' agreement, and any rank's failure to start, wait for wait().
        handle = [None]

        def start():
            check()
            owner.extend(owners())
            mine = own()
            if mine:
                handle[0] = save(mine, target(), sync=sync, background=True)

        failure = _attempt(start)

        def finish():
            _agree(dist, group, world, failure or (_attempt(handle[0].wait) if handle[0] is not None else None))
            try:
                agree_on_models(files)
            except Exception:
                if handle[0] is not None:  # this rank's file is of no save: it goes now
                    try:
                        os.unlink(target())
                    except OSError:
                        pass
                raise
            _agree(dist, group, world, _attempt(lambda: commit(files)) if rank == 0 else None)

        return DistributedSave(finish, handle[0], os.path.abspath(path) if failure is None else None)
    _agree(dist, group, world, _attempt(check))
    agree_on_models(files)
    owner.extend(owners())
    mine = own()
    _agree(dist, group, world, _attempt(lambda: save(mine, target(), sync=sync) if mine else None))
    _agree(dist, group, world, _attempt(lambda: commit(files)) if rank == 0 else None)
    return None
