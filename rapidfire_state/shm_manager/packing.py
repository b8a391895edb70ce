"""Packing: how a stored value is laid out in one shared storage, and how views come back.

A value (tensors nested in dicts, lists, tuples, with plain leaves) is split into
its structure (a *treedef*, tensors replaced by slots) and its tensors, which sit
at 64-byte-aligned offsets of one storage.  :class:`Packed` (storage, layout,
treedef) is what the registry holds; unpickled in a client it becomes the value
itself, its tensors views of the storage.  :class:`ObjectCache` keeps, per
process, the views of the objects this process has seen.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from rapidfire_state.constants import SHMLocation, SHMObjectType
from rapidfire_state.exceptions import ConfigError
from rapidfire_state.shm_manager.metadata import ObjectIds, ObjectMeta

#: Tensor offsets inside an object's shared storage are multiples of this.
ALIGNMENT = 64

# True only inside a registry Manager process started with manager_initializer: there,
# a packed object stays packed (the Manager keeps one storage, not thousands of views).
_IN_REGISTRY_PROCESS = False
_TLS = threading.local()


def keep_packed_in_this_process() -> None:
    """Called by the registry Manager's initializer: unpickled objects stay :class:`Packed` there."""
    global _IN_REGISTRY_PROCESS
    _IN_REGISTRY_PROCESS = True


def in_registry_process() -> bool:
    return _IN_REGISTRY_PROCESS


class Packed:
    """An object's shared storage + layout + structure, as kept in the registry.

    Pickles to :func:`_rebuild_packed`, which in a client builds the stored value
    (views of the storage) and in the registry process keeps it packed.
    """

    __slots__ = ("storage", "layout", "treedef")

    def __init__(self, storage: Any, layout: tuple, treedef: Any):
        self.storage = storage  # one shared UntypedStorage, or None for an object without tensors
        self.layout = layout  # ((offset in elements, shape, dtype), ...)
        self.treedef = treedef

    def __reduce__(self) -> tuple:
        return (_rebuild_packed, (self.storage, self.layout, self.treedef))

    def views(self) -> list:
        """The tensors, as views of the storage."""
        return tensor_views(self.storage, self.layout)

    def unpack(self) -> Any:
        """The stored value (tensors as views of the storage)."""
        return unflatten(self.treedef, self.views())


def _rebuild_packed(storage: Any, layout: tuple, treedef: Any) -> Any:
    packed = Packed(storage, layout, treedef)
    if _IN_REGISTRY_PROCESS or getattr(_TLS, "want_packed", False):
        return packed
    return packed.unpack()


@contextmanager
def packed_fetch() -> Iterator[None]:
    """Within it, registry reads in this thread return :class:`Packed` instead of the value."""
    previous = getattr(_TLS, "want_packed", False)
    _TLS.want_packed = True
    try:
        yield
    finally:
        _TLS.want_packed = previous


def contiguous_stride(shape: tuple) -> tuple:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def tensor_views(storage: Any, layout: tuple) -> list:
    """Contiguous views of ``storage`` at ``layout``'s (offset, shape, dtype) entries."""
    import torch

    return [
        torch.empty(0, dtype=dtype).set_(storage, offset, shape, contiguous_stride(shape))
        for offset, shape, dtype in layout
    ]


# --- value structure ----------------------------------------------------------------------

# treedef nodes: ("T", i) tensor slot; ("V", value) plain leaf; ("D", keys, children) dict;
# ("O", keys, children, metadata) OrderedDict (state dicts keep their _metadata);
# ("L", children) list; ("U", children) tuple.


def plain_leaf_types() -> tuple:
    import torch

    return (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def flatten(value: Any, tensors: list, *, strict: bool) -> Any:
    """The structure of ``value`` with tensors replaced by slots; appends the tensors.

    Two entries that are the same memory (tied weights: ``state_dict()`` returns a
    fresh ``detach()`` of the shared parameter under each name) share one slot, so
    they are stored once and load as one tensor.  ``strict`` checks what
    :meth:`SharedMemoryManager.store` accepts; fetched payloads are walked loosely.
    """
    import torch
    from collections import OrderedDict

    plain = plain_leaf_types() if strict else ()
    seen: dict[tuple, int] = {}

    def slot(tensor: Any, path: str) -> tuple:
        if strict:
            check_tensor(tensor, path)
        same = None
        if tensor.numel() and tensor.layout == torch.strided and tensor.device.type != "meta":
            same = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(),
                    tensor.is_conj(), tensor.is_neg())
            if same in seen:
                return ("T", seen[same])
        tensors.append(tensor)
        if same is not None:
            seen[same] = len(tensors) - 1
        return ("T", len(tensors) - 1)

    def walk(item: Any, path: str) -> Any:
        if isinstance(item, torch.Tensor):
            return slot(item, path)
        if isinstance(item, torch.Size):
            return ("V", item)
        if isinstance(item, dict):
            keys = tuple(item.keys())
            if strict:
                for k in keys:
                    if not isinstance(k, plain) or isinstance(k, (torch.dtype, torch.device, torch.Size)):
                        raise ConfigError(
                            f"{path} has a key {k!r} of type {type(k).__name__}; dict keys must be "
                            "str, int, float, complex, bool, bytes or None"
                        )
            children = tuple(walk(item[k], f"{path}[{k!r}]") for k in keys)
            if isinstance(item, OrderedDict):
                return ("O", keys, children, getattr(item, "_metadata", None))
            return ("D", keys, children)
        if isinstance(item, list):
            return ("L", tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(item)))
        if isinstance(item, tuple):
            return ("U", tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(item)))
        if strict and not isinstance(item, plain):
            raise ConfigError(
                f"{path} is a {type(item).__module__}.{type(item).__qualname__}; a stored value may hold "
                "tensors, dicts, lists, tuples and plain values (None, bool, int, float, complex, str, bytes, "
                "torch.dtype, torch.device, torch.Size) only"
            )
        return ("V", item)

    return walk(value, "value")


def unflatten(node: Any, tensors: Sequence[Any]) -> Any:
    """The value a :func:`flatten` structure describes, its slots filled from ``tensors``."""
    tag = node[0]
    if tag == "T":
        return tensors[node[1]]
    if tag == "V":
        return node[1]
    if tag == "D":
        return {k: unflatten(c, tensors) for k, c in zip(node[1], node[2])}
    if tag == "O":
        from collections import OrderedDict

        out: Any = OrderedDict((k, unflatten(c, tensors)) for k, c in zip(node[1], node[2]))
        if node[3] is not None:
            out._metadata = node[3]
        return out
    if tag == "L":
        return [unflatten(c, tensors) for c in node[1]]
    if tag == "U":
        return tuple(unflatten(c, tensors) for c in node[1])
    raise ConfigError(f"corrupt structure node {node!r}")  # pragma: no cover


def check_tensor(tensor: Any, path: str) -> None:
    """ConfigError for a tensor that has no dense data to store."""
    import torch

    if tensor.is_nested or tensor.layout != torch.strided:
        raise ConfigError(f"{path} is a {tensor.layout} tensor; only dense (strided) tensors can be stored")
    if tensor.is_quantized:
        raise ConfigError(f"{path} is a quantized tensor; dequantize it before storing")
    if tensor.device.type == "meta":
        raise ConfigError(f"{path} is a meta tensor and has no data to store")


def same_treedef(a: Any, b: Any) -> bool:
    """Whether two structures are equal (False when they cannot be compared)."""
    try:
        return bool(a == b)
    except Exception:  # e.g. an adopted raw payload with an array leaf
        return False


def shapes_and_dtypes(tensors: Sequence[Any]) -> tuple:
    """What an in-place store must match: each tensor's shape and dtype, in order."""
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def to_cpu(tensor: Any) -> Any:
    """The tensor on the CPU: CPU tensors are returned as they are (no copy)."""
    if tensor.device.type == "cpu":
        return tensor
    return tensor.detach().to("cpu", non_blocking=False)


def tensor_nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def layout_for(tensors: Sequence[Any]) -> tuple[tuple, int]:
    """Aligned offsets of ``tensors`` in one storage; returns (layout, storage bytes)."""
    layout, offset = [], 0
    for t in tensors:
        size = t.element_size()
        layout.append((offset // size, tuple(t.shape), t.dtype))
        offset += -(-tensor_nbytes(t) // ALIGNMENT) * ALIGNMENT
    return tuple(layout), max(offset, ALIGNMENT)




def disk_tensor(tensor: Any) -> Any:
    """The tensor as it is written to disk: on the CPU, owning exactly its own bytes."""
    cpu = to_cpu(tensor.detach())
    if cpu.untyped_storage().nbytes() != tensor_nbytes(cpu) or not cpu.is_contiguous():
        cpu = cpu.contiguous().clone()  # don't write the rest of a larger (e.g. shared) storage
    return cpu


# --- a value being stored -----------------------------------------------------------------


@dataclass(frozen=True)
class StoreRequest:
    """A value being stored under ``key``: its structure and tensors, and what its metadata will say."""

    key: str
    treedef: Any
    tensors: list
    signature: tuple  # shapes_and_dtypes(tensors)
    num_bytes: int
    ids: ObjectIds
    object_type: SHMObjectType
    manager_name: str
    #: the cross-host disk copy written for this value (placement "cross_host"), recorded in its metadata
    copy_path: Optional[str] = None

    @classmethod
    def of(cls, key: str, value: Any, ids: ObjectIds, object_type: SHMObjectType, manager_name: str) -> "StoreRequest":
        """Flatten ``value`` (checked: :class:`ConfigError` for what cannot be stored)."""
        tensors: list = []
        treedef = flatten(value, tensors, strict=True)
        return cls(
            key=key,
            treedef=treedef,
            tensors=tensors,
            signature=shapes_and_dtypes(tensors),
            num_bytes=sum(tensor_nbytes(t) for t in tensors),
            ids=ids,
            object_type=object_type,
            manager_name=manager_name,
        )

    @property
    def tensor_count(self) -> int:
        return len(self.tensors)

    def meta(self, gen: int, location: SHMLocation, path: Any = None) -> ObjectMeta:
        """The metadata entry of this value published now as generation ``gen``."""
        return ObjectMeta.new(
            gen=gen,
            location=location,
            path=path,
            num_bytes=self.num_bytes,
            tensor_count=self.tensor_count,
            ids=self.ids,
            object_type=self.object_type,
            manager_name=self.manager_name,
            copy_path=self.copy_path,
        )


# --- the process's views of shared objects ------------------------------------------------


@dataclass
class CachedObject:
    """This process's views of one object in shared memory, labelled with the generation they show."""

    gen: int
    treedef: Any
    signature: tuple  # shapes_and_dtypes(tensors)
    tensors: list
    storage: Any  # the packed storage, or None for a raw (adopted) payload

    @classmethod
    def from_payload(cls, payload: Any, gen: int) -> "CachedObject":
        """Views of a fetched payload: a :class:`Packed` object, or a raw value written into the registry."""
        if isinstance(payload, Packed):
            tensors = payload.views()
            return cls(gen, payload.treedef, shapes_and_dtypes(tensors), tensors, payload.storage)
        tensors = []
        treedef = flatten(payload, tensors, strict=False)
        return cls(gen, treedef, shapes_and_dtypes(tensors), tensors, None)

    def value(self) -> Any:
        """The stored value, its tensors these views."""
        return unflatten(self.treedef, self.tensors)


class ObjectCache:
    """Per key, the :class:`CachedObject` this process last saw; safe for the threads of a process.

    A registry entry's generation tells whether another process has replaced the
    object since (then the entry is refreshed from the registry).
    """

    def __init__(self) -> None:
        self._entries: dict[str, CachedObject] = {}
        # RLock: held only around dict operations, never across a registry call
        self._entries_lock = threading.RLock()

    def get(self, key: str) -> Optional[CachedObject]:
        with self._entries_lock:
            return self._entries.get(key)

    def put(self, key: str, entry: CachedObject) -> CachedObject:
        with self._entries_lock:
            self._entries[key] = entry
        return entry

    def remember(self, key: str, payload: Any, gen: int) -> CachedObject:
        """Views of ``payload`` (see :meth:`CachedObject.from_payload`), kept as ``key``'s entry."""
        return self.put(key, CachedObject.from_payload(payload, gen))

    def drop(self, *keys: str) -> None:
        with self._entries_lock:
            for key in keys:
                self._entries.pop(key, None)

    def clear(self) -> None:
        with self._entries_lock:
            self._entries.clear()

    def keys(self) -> list[str]:
        with self._entries_lock:
            return list(self._entries)
