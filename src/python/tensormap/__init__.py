"""tensormap: save and load PyTorch models with linear memory.

A checkpoint is memory-mapped and each parameter of a model is bound to its bytes in the
mapping: pages are read when first touched and copied only when written (copy-on-write),
so resident memory never exceeds one copy of the weights. Reads tensormap files,
safetensors files, sharded checkpoints (``*.index.json``) and ``torch.save`` archives;
writes the first three formats and torch.save archives.

The linear-memory recipe::

    import tensormap

    with tensormap.skeleton():              # or: with torch.device("meta"):
        model = MyModel()                   # no memory for the weights
    tensormap.load(model, "model.tmap")     # every weight a view of the file

    tensormap.save(model, "copy.safetensors")  # streamed, atomic

    with tensormap.open("model.safetensors") as f:   # lazy, read-only, any format
        w = f["layer.0.weight"]                      # zero-copy
        rows = f.get_slice("embed.weight")[0:128]    # reads only those rows

Every failure raises :class:`tensormap.Error`, whose ``kind`` names what went wrong.
The objects of this package run on the CPU; move a model to a GPU after loading it.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
import threading
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _C
from ._C import Error

__all__ = [
    "Error", "LoadReport", "Checkpoint", "Slice", "skeleton", "build_skeleton", "release", "is_released", "load",
    "materialize", "save", "save_distributed", "open", "safe_open", "load_file", "save_file", "convert", "verify",
    "prefault", "prefault_in_background",
]

__version__ = "0.1.0"

PathLike = Union[str, "os.PathLike[str]"]


def _error(kind: str, message: str) -> Error:
    error = Error(message)
    error.kind = kind
    return error


def _path(path: PathLike) -> str:
    return os.fspath(path)


# --- skeletons ------------------------------------------------------------------------------

_skeleton_threads = threading.local()  # .depth: the skeleton scopes open on this thread


def _skeleton_depth() -> int:
    """How many :func:`skeleton` scopes are open on this thread."""
    return getattr(_skeleton_threads, "depth", 0)
_register_parameter = torch.nn.Module.register_parameter


def _register_parameter_released(module: torch.nn.Module, name: str, param) -> None:
    """``nn.Module.register_parameter`` that, inside :func:`skeleton` on this thread,
    releases the parameter it registers: a later write through ``param.data`` (which
    does not require grad, so the dispatcher cannot tell it from any other tensor) then
    finds it released and does nothing."""
    _register_parameter(module, name, param)
    if _skeleton_depth() and param is not None and param.device.type == "cpu":
        _C.release(param)


_tensor_data = torch.Tensor.data  # torch's own descriptor, which Parameter inherits


def _parameter_data_set(param, value) -> None:
    """``param.data = value``. LibTorch's set_data refuses a released parameter (it
    compares dispatch keys), so for one: inside :func:`skeleton` the assignment is an
    initialisation and is skipped (the parameter stays released); outside, it binds the
    parameter to ``value``'s storage, as ``set_`` does. Anything else is torch's."""
    if isinstance(value, torch.Tensor) and _C.is_released(param) and value.dtype == param.dtype:
        if _skeleton_depth():
            return
        with torch.no_grad():
            param.set_(value)
        return
    _tensor_data.__set__(param, value)


_parameter_data = property(_tensor_data.__get__, _parameter_data_set, doc=_tensor_data.__doc__)


@contextlib.contextmanager
def skeleton():
    """Build models without paying for their weights.

    Inside the block, a model's parameters stay unallocated whatever its initialisation
    does to them:

    * every parameter is released as it is registered, and any write into one (random
      fills, ``fill_``, ``zero_``, ``mul_``, ``clamp_``, ``copy_``, ``index_put_``, any
      in-place or ``out=`` op, through ``.data`` or a view) does nothing and keeps it
      released, with its shape, dtype and identity;
    * an out-of-place op reading a released tensor returns released tensors of the right
      shapes (from torch's meta kernels), or raises naming the op where torch has none;
    * random fills (``uniform_``, ``normal_``) of any tensor do nothing;
    * everything else runs: buffers and tables computed from scratch keep their values.

    :func:`load` then binds the parameters; using one before that raises, and
    :func:`materialize` initialises what no load bound. Buffers stay real (they are
    small in practice); :func:`build_skeleton` releases them too. The scope belongs to the
    thread that opens it (the same dispatcher as the C++ ``tensormap::SkeletonScope``).
    """
    if torch.nn.Module.register_parameter is not _register_parameter_released:
        torch.nn.Module.register_parameter = _register_parameter_released
        torch.nn.Parameter.data = _parameter_data
    scope = _C.SkeletonScope()
    _skeleton_threads.depth = _skeleton_depth() + 1
    try:
        yield
    finally:
        _skeleton_threads.depth -= 1
        scope.close()


def build_skeleton(factory: Callable[..., torch.nn.Module], *args, **kwargs) -> torch.nn.Module:
    """``factory(*args, **kwargs)`` (a model class, say) under :func:`skeleton`, then
    :func:`release`: a model without weight memory whose every tensor, buffers included,
    raises when used until :func:`load` binds it, so that what a non-strict load leaves is
    never read as garbage (:func:`materialize` initialises it). The C++ ``tensormap::build_skeleton``."""
    with skeleton():
        model = factory(*args, **kwargs)
    return release(model)


def release(module: torch.nn.Module) -> torch.nn.Module:
    """Free the storage of every parameter and buffer of ``module`` (CPU), in place.

    Each tensor keeps its object, shape, dtype and ``requires_grad``; any operation on it
    raises until :func:`load` binds it. Returns ``module``.
    """
    for t in _unique_tensors(module):
        _C.release(t)
    return module


def is_released(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` was released (by :func:`release`) and not loaded since."""
    return _C.is_released(tensor)


def materialize(module: torch.nn.Module, names: Optional[Sequence[str]] = None,
                init: Optional[Callable[[str, torch.Tensor], None]] = None) -> List[str]:
    """Give every tensor of ``module`` that is still released its own memory, in place.

    For what a non-strict :func:`load` did not find in the checkpoint
    (``LoadReport.missing``): in a model built on ``meta``, under :func:`skeleton` or by
    :func:`build_skeleton`, those stay released and raise when used. A tensor that is not
    released (a buffer of a model built under :func:`skeleton`, or any tensor of a model
    built normally) is initialised only when ``names`` names it: pass
    ``names=report.missing`` for those (any named tensor is released first, whatever it
    holds). The tensor objects stay
    the same (references and tied weights stay valid). Each is initialised by the
    ``reset_parameters()`` of the module that holds it (``_reset_parameters()`` for
    ``nn.MultiheadAttention``), as a fresh model would be, even inside :func:`skeleton`;
    the module's loaded tensors, and those of the modules below it, sit out of that reset
    untouched (and stay mapped). A module without ``reset_parameters`` leaves zeros. Then
    ``init(name, tensor)``, if given, is called for each under ``torch.no_grad()`` and may
    overwrite it. Returns the dotted names given memory (a tied tensor under its first).
    """
    _unmeta(module)  # a meta model's tensors become released CPU ones first
    entries = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for table, is_buffer in ((m._parameters, False), (m._buffers, True)):
            for key, t in table.items():
                if t is not None:
                    entries.append((dot + key, t, is_buffer))
    if names is not None:
        tensors = {name: t for name, t, _ in entries}
        unknown = [n for n in names if n not in tensors]
        if unknown:
            raise _error("NotFound", f"materialize: the model has no tensor named {', '.join(map(repr, unknown))}")
        for n in names:
            _C.release(tensors[n])

    def reset(name: str) -> None:
        m = module.get_submodule(name) if name else module
        rule = getattr(m, "reset_parameters", None)
        if isinstance(m, torch.nn.MultiheadAttention):
            rule = m._reset_parameters
        if callable(rule):
            rule()

    return _C.materialize(entries, reset, init)


def _unique_tensors(module: torch.nn.Module) -> List[torch.Tensor]:
    seen, out = set(), []
    for m in module.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


# --- loading --------------------------------------------------------------------------------

class LoadReport(collections.namedtuple("LoadReport", "loaded missing unexpected mismatched")):
    """What a load did: names ``loaded``; ``missing`` (in the model, not the checkpoint),
    ``unexpected`` (in the checkpoint, not the model) and ``mismatched`` (one line each:
    the name and what differs)."""

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _state_entries(module: torch.nn.Module) -> List[Tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_buffer) for what ``module.state_dict()`` holds: every parameter
    and persistent buffer under each of its names (tied weights under each)."""
    parameters = {id(p) for p in module.parameters()}
    entries = []
    for name, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):
            entries.append((name, value, id(value) not in parameters))
    return entries


def _unmeta(module: torch.nn.Module) -> None:
    """Replace the meta tensors of ``module`` by released CPU tensors of the same shape,
    dtype and requires_grad, which a load binds in place. Tied tensors stay tied."""
    replaced: Dict[int, torch.Tensor] = {}
    for m in module.modules():
        for table, is_parameter in ((m._parameters, True), (m._buffers, False)):
            for key, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                new = replaced.get(id(t))
                if new is None:
                    new = torch.empty(0, dtype=t.dtype)
                    if is_parameter:
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    _C.release_as(new, list(t.shape))
                    replaced[id(t)] = new
                table[key] = new


def _open_state(source) -> "_C.StateDict":
    if isinstance(source, Checkpoint):
        return source._state
    return _C.StateDict.open(_path(source))


def load(module: torch.nn.Module, path: Union[PathLike, "Checkpoint"], mode: str = "auto",
         strict: bool = True, *, verify_checksums: bool = True, drop_read_pages: bool = True,
         splits: Optional[Sequence[Tuple[str, int]]] = None, rank: Optional[int] = None,
         world_size: Optional[int] = None) -> LoadReport:
    """Bind every parameter and persistent buffer of ``module`` to the checkpoint.

    ``path`` is any checkpoint :func:`open` reads (or a :class:`Checkpoint`); tensors are
    matched by their ``state_dict()`` names.

    ``mode="map"``: each tensor becomes a zero-copy view of the file's private mapping;
    pages are read when touched, a write (an optimizer step) copies only the pages it
    touches and never reaches the file. Dtypes must match exactly. ``mode="copy"``: owned
    memory, filled tensor by tensor (dtypes converted), the file's pages given back after
    each. ``mode="auto"`` (the default): map a local file, copy from a network filesystem
    or a URL (``http(s)://``, ``s3://``), where map mode has no meaning.

    The model may be built under :func:`skeleton`, on the ``meta`` device (its tensors are
    replaced by loaded ones; tied weights stay tied), or normally (map mode rebinds each
    tensor in place, copy mode copies into it); the parameter objects of a model not on
    ``meta`` stay the same objects.

    ``strict``: any missing, unexpected or mismatched name raises ``Error`` (kind
    ``ModelMismatch``) listing them all, and nothing is loaded. Otherwise the matching
    tensors are loaded and the rest reported. Returns a :class:`LoadReport`.
    ``verify_checksums`` (copy mode, on by default) checks each tensor of a tensormap file
    against its XXH3-64 as it is read, for about 4% of the load's time; in map mode,
    ``prefault(model, verify=path)`` checks.

    ``splits`` (tensor parallelism; ``[(pattern, dim), ...]`` as :func:`save_distributed`
    takes): ``module`` is rank ``rank``'s part of a model split among ``world_size`` ranks
    (both default to ``torch.distributed``'s, once it is initialized): each tensor whose
    name matches a pattern is split along ``dim`` in equal parts, and this rank loads part
    ``rank``, reading only its bytes; the rest load whole. Any checkpoint works, whatever
    world size saved it (a save_distributed index at another world size included). No
    collective runs: every rank reads on its own.
    """
    state = _open_state(path)
    part = None
    if splits is not None or rank is not None or world_size is not None:
        if rank is None or world_size is None:
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"{path}: a load with splits needs rank and world_size, or torch.distributed "
                                 "initialized to give them")
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        part = (int(rank), int(world_size), [(str(p), int(d)) for p, d in (splits or ())])
    _unmeta(module)
    report = _C.load(_state_entries(module), state, mode, strict, verify_checksums, drop_read_pages, part)
    return LoadReport(report["loaded"], report["missing"], report["unexpected"], report["mismatched"])


def prefault(module: torch.nn.Module, threads: int = 0, *, verify: Optional[PathLike] = None) -> None:
    """Fault in every page of every tensor of ``module`` now (after a map-mode load: the
    file's pages), on ``threads`` threads (0: torch's intra-op count), without writing.

    ``verify``: the checkpoint the model was loaded from; each tensor is then checked
    against its XXH3-64 as it is faulted in (map mode's counterpart of a verified copy
    load), and a mismatch raises ``Error`` of kind ``ChecksumMismatch`` naming it. Call it
    right after the load: a tensor written since then no longer matches."""
    state = _C.StateDict.open(_path(verify)) if verify is not None else None
    _C.prefault(_state_entries(module), threads, state)


def prefault_in_background(module: torch.nn.Module):
    """The same prefault on a thread of its own, while the caller goes on (a first
    forward pass). Returns an object with ``wait()`` (raises what :func:`prefault` would)
    and ``done()``; the thread stops when it is garbage-collected."""
    return _C.prefault_in_background(_state_entries(module))


# --- saving ---------------------------------------------------------------------------------


def _state_items(obj, caller: str) -> List[Tuple[str, torch.Tensor]]:
    """The (name, detached tensor) pairs a save writes: a module's state as load binds it,
    or a mapping's items."""
    if isinstance(obj, torch.nn.Module):
        items = [(name, t) for name, t, _ in _state_entries(obj)]
    elif isinstance(obj, collections.abc.Mapping):
        items = list(obj.items())
    else:
        raise TypeError(f"{caller} takes an nn.Module or a mapping of names to tensors, not {type(obj).__name__}")
    tensors = []
    for name, t in items:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"{caller}: {name!r} is not a str name of a torch.Tensor")
        tensors.append((name, t.detach()))
    return tensors


def save_distributed(obj: Union[torch.nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                     splits: Sequence[Tuple[str, int]] = (), *, group=None, sync: bool = True,
                     background: bool = False):
    """Save a tensor-parallel model from every rank of a ``torch.distributed`` group (the
    default group unless ``group`` is given; gloo at least), as one checkpoint: the index
    at ``path`` (``<name>.tmap.index.json``) and one file per rank beside it.

    Every rank calls it together with its own model, built with split shapes, and the
    same ``splits`` (``[(pattern, dim), ...]``, ``*`` matching any run of characters, the
    first match winning: ParallelPlan's). Each rank writes its part of each split tensor
    and its share of the replicated ones (each written once); rank 0 writes the index once
    every rank's file is in place: the commit. Until then the previous checkpoint at
    ``path`` stays whole, whatever fails or is killed. The result reads as the whole model
    (``load``, ``open``, the command line) and loads at any world size.

    ``background=True``: each rank's file is written by a child process (as
    ``save(..., background=True)``), and this returns at once a handle whose ``wait()``,
    called by every rank together, waits for the files, checks that the ranks' models
    agree, and commits. The call itself makes no collective. Errors of any rank are raised
    on every rank, prefixed with that rank. Saving a checkpoint again while its background
    save is in flight is refused (``InvalidArgument``) until that save's ``wait()``."""
    from .distributed import save_distributed as run
    return run(obj, path, splits, group=group, sync=sync, background=background)


def save(obj: Union[torch.nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
         format: Optional[str] = None, *, alignment: int = 4096,
         metadata: Optional[Mapping[str, str]] = None, sync: bool = True,
         store_ties_once: bool = True, background: bool = False) -> Optional["_C.BackgroundSave"]:
    """Write a module's ``state_dict()`` or a mapping of names to tensors to ``path``.

    Streamed one tensor at a time (a strided view or a GPU tensor in pieces of at most
    16 MiB), and atomic: the file appears complete or not at all, and saving over the
    file a model was map-loaded from leaves that model unchanged. ``format`` is
    ``"tensormap"``, ``"safetensors"`` or ``"torch.save"``; by default it follows the
    name (``*.safetensors``, ``*.pt``/``*.pth``, else tensormap). Tied weights are stored
    once where the format can say so (``store_ties_once``).

    ``background=True``: returns at once (after a fork: its page tables, some 10-30 ms
    per GiB of tensors on the machines we measured) a handle
    with ``wait()`` (raises the save's ``Error``), ``done()`` and ``pid``, while a child
    process writes the file. The file holds the values of the moment of the call,
    whatever training writes afterwards; the pages written meanwhile are the only extra
    memory. A second background save to the same path waits for the first. The child
    outlives the caller: a process that exits with a save in flight leaves it to finish.
    """
    path = _path(path)
    tensors = _state_items(obj, "tensormap.save")
    meta = [(str(k), str(v)) for k, v in (metadata or {}).items()]
    return _C.save(tensors, path, format, alignment, meta, sync, store_ties_once, background)


def save_file(tensors: Mapping[str, torch.Tensor], filename: PathLike,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """safetensors' ``save_file``: :func:`save` with its format picked from the name."""
    save(tensors, filename, metadata=metadata)


# --- reading --------------------------------------------------------------------------------

class _Metadata(dict):
    """A checkpoint's metadata: a dict that may also be called, as safetensors'
    ``metadata()`` is."""

    def __call__(self) -> Dict[str, str]:
        return dict(self)


class Slice:
    """A tensor of a checkpoint not yet read, for reading parts of it (safetensors'
    ``get_slice``): ``s[0:128]``, ``s[:, 64:96]``, ``s[3]``. The first dimension indexed
    with less than its whole range is read alone (zero-copy along dimension 0, otherwise
    row by row), so the rest of the tensor never enters memory; further indices apply to
    that part."""

    def __init__(self, state, name: str):
        self._state, self._name = state, name
        self._info = state.info(name)

    def get_shape(self) -> List[int]:
        return list(self._info["shape"])

    def get_dtype(self) -> str:
        return self._info["dtype"]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._info["shape"])

    def __len__(self) -> int:
        shape = self._info["shape"]
        if not shape:
            raise TypeError("len() of a 0-d tensor")
        return shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        shape = self._info["shape"]
        if not isinstance(index, tuple):
            index = (index,)
        if any(i is Ellipsis for i in index) or any(i is None for i in index):
            return self._state.at(self._name)[index]
        if len(index) > len(shape):
            raise IndexError(f"{len(index)} indices for tensor {self._name!r} of {len(shape)} dimensions")
        for dim, i in enumerate(index):
            if isinstance(i, slice):
                start, stop, step = i.indices(shape[dim])
                if step != 1:
                    break
                length = max(0, stop - start)
                if length == shape[dim]:
                    continue
                part = self._state.slice(self._name, dim, start, length)
                return part[index[:dim] + (slice(None),) + index[dim + 1:]]
            if isinstance(i, int):
                size = shape[dim]
                if not -size <= i < size:
                    raise IndexError(f"index {i} is out of bounds for dimension {dim} of "
                                     f"{self._name!r}, of size {size}")
                part = self._state.slice(self._name, dim, i % size, 1)
                return part[index[:dim] + (0,) + index[dim + 1:]]
            break
        return self._state.at(self._name)[index]


class Checkpoint(collections.abc.Mapping):
    """A checkpoint of any format, as a lazy, read-only ``Mapping[str, Tensor]``.

    ``f[name]`` is a zero-copy view of the file's private mapping where the format and
    alignment allow (a write into it copies the touched pages and never reaches the file;
    other views of this object see it). Names are in file (or index) order.
    Also answers to safetensors' ``safe_open`` names: ``keys()``, ``get_tensor``,
    ``get_slice``, ``metadata()``. Views stay valid after the object is closed.
    """

    def __init__(self, path: PathLike):
        self._open = _C.StateDict.open(_path(path))
        self._metadata = _Metadata(self._open.metadata())

    @property
    def _state(self):
        if self._open is None:
            raise ValueError("the tensormap.Checkpoint is closed")
        return self._open

    @staticmethod
    def _name(name) -> str:
        """Tensor names are str, as in safetensors' safe_open (which refuses bytes too):
        pybind11 would otherwise take bytes for a std::string."""
        if not isinstance(name, str):
            raise TypeError(f"a tensor name is a str, not {type(name).__name__} ({name!r})")
        return name

    # Mapping (a key that is not a str is not there, as in a dict of str keys)
    def __getitem__(self, name: str) -> torch.Tensor:
        if not isinstance(name, str) or name not in self._state:
            raise KeyError(name)
        return self._state.at(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.keys())

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._state

    def keys(self) -> List[str]:  # a list, as safe_open's is; Mapping's views work too
        return list(self._state.keys())

    # What the file is
    @property
    def path(self) -> str:
        return self._state.path

    @property
    def format(self) -> str:
        """``"tensormap"``, ``"safetensors"``, ``"sharded tensormap"``,
        ``"sharded safetensors"`` or ``"torch.save"``."""
        return self._state.format

    @property
    def metadata(self) -> _Metadata:
        """The metadata strings (a dict; ``f.metadata()`` also works)."""
        return self._metadata

    def info(self, name: str) -> Dict[str, object]:
        """``dtype`` (its safetensors spelling), ``shape`` and ``byte_length``, read
        without touching the tensor's data."""
        return self._state.info(self._name(name))

    def alias_of(self, name: str) -> Optional[str]:
        """The name whose bytes ``name`` shares (a tied weight stored once), or None."""
        return self._state.alias_of(self._name(name))

    def skipped(self) -> List[Tuple[str, str]]:
        """What a torch.save archive holds besides tensors, not read (where, what)."""
        return self._state.skipped()

    # Parts and copies
    def slice(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """Elements ``[start, start + length)`` of the tensor along ``dim``, reading only
        them (zero-copy along dimension 0)."""
        return self._state.slice(self._name(name), dim, start, length)

    def raw_bytes(self, name: str) -> torch.Tensor:
        """The tensor's bytes, owned, as a flat uint8 tensor (any dtype, even one this
        torch lacks)."""
        return self._state.raw_bytes(self._name(name))

    # safetensors' safe_open
    def get_tensor(self, name: str) -> torch.Tensor:
        return self._state.at(self._name(name))

    def get_slice(self, name: str) -> Slice:
        return Slice(self._state, self._name(name))

    def offset_keys(self) -> List[str]:
        return self.keys()

    # Context manager
    def close(self) -> None:
        """Drop this object's hold on the file (views made from it keep theirs)."""
        self._open = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._open is None:
            return "<tensormap.Checkpoint (closed)>"
        return f"<tensormap.Checkpoint {self.path!r}: {self.format}, {len(self)} tensors>"


def open(path: PathLike) -> Checkpoint:  # noqa: A001 (the module's own open)
    """Open any checkpoint tensormap reads, recognised by its content: a tensormap file,
    a safetensors file, a sharded index, a torch.save archive. Nothing is read but the
    header; raises ``Error`` naming the first rule the file breaks. ``path`` may be an
    ``http(s)://`` or ``s3://bucket/key`` URL (README, "Checkpoints in S3 and over HTTP"):
    its tensors are then read by ranges into tensors of their own."""
    return Checkpoint(path)


def safe_open(filename: PathLike, framework: str = "pt", device: str = "cpu") -> Checkpoint:
    """safetensors' ``safe_open``, over every format tensormap reads: change the import,
    keep the code. Only ``framework="pt"`` and ``device="cpu"``."""
    if framework not in ("pt", "torch", "pytorch"):
        raise _error("InvalidArgument", f"tensormap.safe_open gives torch tensors only, not framework {framework!r}")
    if str(device) != "cpu":
        raise _error("InvalidArgument", f"tensormap.safe_open maps into CPU memory; move the tensors to {device} after")
    return Checkpoint(filename)


def load_file(filename: PathLike, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """safetensors' ``load_file``: every tensor, as zero-copy views, in a dict."""
    with safe_open(filename, device=device) as f:
        return {name: f[name] for name in f}


# --- whole files ----------------------------------------------------------------------------

def convert(src: PathLike, dst: PathLike, format: Optional[str] = None, *,
            dtype: Optional[Union[str, torch.dtype]] = None, shard_size: int = 0,
            alignment: int = 4096, sync: bool = True) -> Dict[str, object]:
    """Convert ``src`` (any format) into ``dst``, streamed in pieces of at most 16 MiB,
    atomically. ``format`` as for :func:`save` (by default from ``dst``'s name);
    ``dtype`` converts floating-point tensors (``torch.bfloat16`` or ``"BF16"``);
    ``shard_size`` > 0 writes shards beside the index ``dst`` (``*.index.json``)."""
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    if isinstance(dtype, torch.dtype):
        if dtype not in names:
            raise _error("InvalidArgument", f"convert converts to a floating-point dtype, not {dtype}")
        dtype = names[dtype]
    return _C.convert(_path(src), _path(dst), format, alignment, dtype, shard_size, sync)


def verify(path: PathLike) -> Dict[str, object]:
    """Check a checkpoint whole: its structure, and for tensormap files every tensor's
    XXH3-64 checksum and every padding byte. Returns ``format``, ``tensors`` and
    ``checksums`` (whether there were any to check); raises ``Error`` listing every
    problem, of the first one's kind."""
    return _C.verify(_path(path))


