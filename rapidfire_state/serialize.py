"""Signed dill payloads for database storage, and config flattening for SQL.

A leaf module: it imports only the standard library, ``dill`` and the leaves
``constants``/``exceptions``.  It never imports torch itself: tensors can only
reach :func:`encode_payload` if the caller already imported torch, so the module
looks torch up in ``sys.modules``; decoding a blob that holds tensors imports
torch through the unpickler, as any pickle would.

Blob format (version 1), all integers big-endian::

    offset  size  field
    0       4     magic           b"RFSP"
    4       2     format version  1
    6       8     key id          first 8 bytes of HMAC-SHA256(key, b"rapidfire_state payload key id")
    14      8     body length     number of bytes after the MAC
    22      32    MAC             HMAC-SHA256(key, header || body), header = bytes 0..21
    54      n     body            dill pickle (protocol 5) of the object

The key id lets a reader tell "signed with another key" from "tampered with";
it reveals nothing the MAC itself does not.  The body length lets it tell
"truncated" from "tampered with".  Both are only diagnostics: nothing is
unpickled unless the MAC verifies (constant-time comparison).

The key is ``$RF_PAYLOAD_KEY`` (any non-empty string, as UTF-8 bytes; read on
every call), else the file ``$RF_HOME/payload.key``: 32 random bytes created on
first use with mode 0600.  Every process that shares a database must share the
key: on several nodes, set ``RF_PAYLOAD_KEY`` or copy the key file.

Tensors on an accelerator are copied to the CPU while pickling (their storages
are intercepted), so a blob never needs a GPU to be decoded: CUDA tensors come
back as CPU tensors.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import math
import os
import secrets
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Union

import dill

from rapidfire_state.constants import rf_home
from rapidfire_state.datapaths import fsync_directory
from rapidfire_state.exceptions import ConfigError, PayloadIntegrityError
from rapidfire_state.validation import check_name

__all__ = [
    "PAYLOAD_MAGIC",
    "PAYLOAD_VERSION",
    "KEY_ENV_VAR",
    "KEY_FILENAME",
    "JSONValue",
    "encode_payload",
    "decode_db_payload",
    "flatten_config",
]

PAYLOAD_MAGIC = b"RFSP"
PAYLOAD_VERSION = 1
KEY_ENV_VAR = "RF_PAYLOAD_KEY"
KEY_FILENAME = "payload.key"

_HEADER = struct.Struct(">4sH8sQ")  # magic, version, key id, body length
_HEADER_LEN = _HEADER.size  # 22
_MAC_LEN = hashlib.sha256().digest_size  # 32
_PREFIX_LEN = _HEADER_LEN + _MAC_LEN  # 54: everything before the body
_KEY_ID_LEN = 8
_KEY_ID_LABEL = b"rapidfire_state payload key id"
_PICKLE_PROTOCOL = 5
_NEW_KEY_BYTES = 32
# A key file shorter than this was not written by us, or is still being written by
# the O_EXCL fallback path; either way it is not a key worth trusting.
_MIN_KEY_FILE_BYTES = 16
_KEY_FILE_SETTLE_SECONDS = 2.0

JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]

# --- the key ----------------------------------------------------------------------

# Keys read from key files, per (source, absolute path).  The environment variable is
# never cached: it is read on every call so that a process may set it at any time.
_KEY_CACHE: dict[tuple[str, str], bytes] = {}
_KEY_LOCK = threading.Lock()


def _reset_key_lock_after_fork() -> None:
    # A thread of the parent may have held the lock at fork(); the child has no such
    # thread, so it would wait forever on the copy.  The cache itself stays valid.
    global _KEY_LOCK
    _KEY_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_key_lock_after_fork)


def _payload_key() -> tuple[bytes, str]:
    """Return ``(key, description of where it came from)``.

    ``$RF_PAYLOAD_KEY`` wins when set and non-empty (an empty value counts as
    unset, like every other ``RF_*`` variable); else the key file under
    ``$RF_HOME``, created on first use.
    """
    env_key = os.environ.get(KEY_ENV_VAR)
    if env_key:
        # surrogateescape gives back the exact bytes of a non-UTF-8 POSIX environment.
        return env_key.encode("utf-8", "surrogateescape"), f"${KEY_ENV_VAR}"
    path = (rf_home() / KEY_FILENAME).absolute()
    cache_key = ("file", str(path))
    with _KEY_LOCK:
        key = _KEY_CACHE.get(cache_key)
        if key is None:
            key = _load_or_create_key_file(path)
            _KEY_CACHE[cache_key] = key
    return key, f"key file {path}"


def _load_or_create_key_file(path: Path) -> bytes:
    """Read the key file, creating it first (race-free) when it does not exist."""
    try:
        if not path.exists():
            _create_key_file(path)
        return _read_key_file(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot read or create the payload key file {path}: {exc}; "
            f"make $RF_HOME writable or set ${KEY_ENV_VAR}"
        ) from exc


def _create_key_file(path: Path) -> None:
    """Create ``path`` holding fresh random bytes, unless another process already has.

    The key is written and fsynced under a temporary name, then hard-linked to
    its final name: ``os.link`` fails when the name exists, so exactly one
    process wins and no reader ever sees a partially written key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(_NEW_KEY_BYTES)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{KEY_FILENAME}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), 0o600)  # mkstemp already uses 0600; be explicit
            tmp.write(key)
            tmp.flush()
            os.fsync(tmp.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return  # another process won the race; its key is the key
        except OSError as exc:
            # Some file systems have no hard links; fall back to O_EXCL (still one
            # winner; readers wait out the short write in _read_key_file).
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            _create_key_file_exclusive(path, key)
            return
    finally:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
    # a key lost in a crash would make every stored blob unreadable
    fsync_directory(path.parent)


def _create_key_file_exclusive(path: Path, key: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)


def _read_key_file(path: Path) -> bytes:
    deadline = time.monotonic() + _KEY_FILE_SETTLE_SECONDS
    while True:
        key = path.read_bytes()
        if len(key) >= _MIN_KEY_FILE_BYTES:
            return key
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"payload key file {path} holds {len(key)} bytes; at least "
                f"{_MIN_KEY_FILE_BYTES} are required (delete it to create a new key, "
                f"which makes existing blobs unreadable, or set ${KEY_ENV_VAR})"
            )
        time.sleep(0.01)


def _key_id(key: bytes) -> bytes:
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:_KEY_ID_LEN]


def _mac(key: bytes, header: bytes | memoryview, body: bytes | memoryview) -> bytes:
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(body)
    return mac.digest()


# --- encoding ---------------------------------------------------------------------


# Storages on these devices are pickled as they are: CPU ones need no copy, meta
# ones have no data (and meta tensors do not pickle through storages anyway).
_STAYING_DEVICES = frozenset({"cpu", "meta"})


class _CPUPickler(dill.Pickler):  # type: ignore[misc]
    """A dill pickler that copies accelerator storages to the CPU.

    Every dense tensor pickles through its storage (``_rebuild_tensor_v2/v3``),
    so intercepting storages covers plain tensors, ``nn.Parameter``, views and
    tensor subclasses alike while keeping dtype, shape, strides and
    ``requires_grad``.  torch's own storage reduction would record the CUDA
    location and need a GPU to load.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # CPU copies made while pickling: keep them alive until the dump ends so
        # that no id() in the memo can be reused by a later temporary.
        self._cpu_copies: list[Any] = []

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is None:  # no tensor can exist if torch was never imported
            return NotImplemented
        cpu_copy = None
        if isinstance(obj, torch.UntypedStorage):
            if obj.device.type not in _STAYING_DEVICES:
                cpu_copy = obj.cpu()
        elif isinstance(obj, torch.storage.TypedStorage):
            # Go through the wrapped untyped storage: TypedStorage's public .device
            # and .cpu() emit a deprecation warning on every call.
            untyped = obj._untyped_storage
            if untyped.device.type not in _STAYING_DEVICES:
                cpu_copy = obj._new_wrapped_storage(untyped.cpu())
        if cpu_copy is None:
            return NotImplemented
        self._cpu_copies.append(cpu_copy)
        return cpu_copy.__reduce_ex__(self.proto)


def encode_payload(obj: Any) -> bytes:
    """Serialize ``obj`` with dill into a signed, versioned blob.

    Handles what dill handles (lambdas, closures, nested configs, classes
    defined in ``__main__``) and torch tensors; tensors on an accelerator are
    stored as CPU tensors.  See the module docstring for the format.

    Raises ``ConfigError`` when the object cannot be pickled, or when no key is
    available (``$RF_HOME`` not writable and ``$RF_PAYLOAD_KEY`` unset).
    """
    buffer = io.BytesIO()
    try:
        _CPUPickler(buffer, protocol=_PICKLE_PROTOCOL).dump(obj)
    except Exception as exc:  # dill raises PicklingError, TypeError, AttributeError...
        raise ConfigError(
            f"cannot serialize object of type {type(obj).__qualname__}: {exc}"
        ) from exc
    body = buffer.getbuffer()
    key, _ = _payload_key()
    header = _HEADER.pack(PAYLOAD_MAGIC, PAYLOAD_VERSION, _key_id(key), len(body))
    return b"".join((header, _mac(key, header, body), body))


# --- decoding ---------------------------------------------------------------------


def decode_db_payload(data: bytes | bytearray | memoryview) -> Any:
    """Verify and deserialize a blob made by :func:`encode_payload`.

    Every check happens before a single byte is unpickled: ``data`` must be
    bytes-like, carry the magic and a known format version, have the length its
    header declares, name the current key, and its HMAC must verify.  Any
    failure raises ``PayloadIntegrityError`` saying which check failed; so does a
    blob that verifies but cannot be unpickled (for instance a class whose
    module is gone), chained to the original error.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()  # any shape or format: its raw bytes
    elif isinstance(data, bytearray):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise PayloadIntegrityError(
            f"payload must be bytes, bytearray or memoryview, not {type(data).__qualname__}"
        )
    size = len(data)
    if size == 0:
        raise PayloadIntegrityError("payload is empty (0 bytes)")
    if not data.startswith(PAYLOAD_MAGIC):
        if size < len(PAYLOAD_MAGIC) and PAYLOAD_MAGIC.startswith(data):
            raise PayloadIntegrityError(f"payload is truncated: {size} bytes, header needs {_HEADER_LEN}")
        raise PayloadIntegrityError(
            f"not a rapidfire_state payload: starts with {data[:8]!r}, expected magic "
            f"{PAYLOAD_MAGIC!r} (an unsigned pickle or foreign data is never loaded)"
        )
    if size < _HEADER_LEN:
        raise PayloadIntegrityError(f"payload is truncated: {size} bytes, header needs {_HEADER_LEN}")
    _, version, key_id, body_len = _HEADER.unpack_from(data)
    if version != PAYLOAD_VERSION:
        raise PayloadIntegrityError(
            f"payload format version {version} is not supported; this library reads version "
            f"{PAYLOAD_VERSION} (was it written by a newer rapidfire_state?)"
        )
    expected = _PREFIX_LEN + body_len
    if size < expected:
        raise PayloadIntegrityError(f"payload is truncated: {size} bytes, its header declares {expected}")
    if size > expected:
        raise PayloadIntegrityError(
            f"payload has {size - expected} unexpected trailing bytes ({size} bytes, header "
            f"declares {expected}); it was tampered with or concatenated"
        )
    key, key_source = _payload_key()
    if not hmac.compare_digest(key_id, _key_id(key)):
        raise PayloadIntegrityError(
            f"payload was signed with a different key than the one in use ({key_source}), "
            "or its header was tampered with; every process sharing a database must "
            f"share the key (set ${KEY_ENV_VAR} or copy the key file)"
        )
    view = memoryview(data)
    header, mac, body = view[:_HEADER_LEN], view[_HEADER_LEN:_PREFIX_LEN], view[_PREFIX_LEN:]
    if not hmac.compare_digest(mac, _mac(key, header, body)):
        raise PayloadIntegrityError(
            f"payload failed its integrity check (HMAC-SHA256 mismatch, {size} bytes): "
            "it was tampered with or corrupted"
        )
    try:
        return dill.loads(body)
    except Exception as exc:
        raise PayloadIntegrityError(
            f"payload verified but could not be unpickled: {type(exc).__name__}: {exc}"
        ) from exc


# --- flattening -------------------------------------------------------------------


def flatten_config(config: Mapping[Any, Any], *, sep: str = ".") -> dict[str, JSONValue]:
    """Flatten a nested config into ``{"a.b.c": value}`` whose values are JSON-safe.

    - nested mappings become dotted keys (keys converted with ``str()``); an
      empty nested mapping is kept as ``{}`` so that the key is not lost;
    - lists and tuples holding no container stay JSON lists (elements
      converted as below); those holding a dict, list or tuple are flattened
      by index (``a.0.b``);
    - ``None``, bools, ints, strings and finite floats are kept; ``nan`` and
      ``±inf`` become ``"nan"``, ``"inf"``, ``"-inf"``;
    - an ``Enum`` member becomes its ``.value`` when that is a JSON scalar;
    - a numpy scalar becomes the equivalent Python scalar; a set becomes a
      list sorted by ``repr`` (set order is not stable across processes);
    - anything else (objects, functions, classes, tensors...) becomes ``repr(value)``.

    The result always passes ``json.dumps(result, allow_nan=False)``.  Raises
    ``ConfigError`` when ``config`` is not a mapping, when two entries flatten
    to the same key (``{"a.b": 1, "a": {"b": 2}}``), or on a reference cycle.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"flatten_config needs a dict, got {type(config).__qualname__}: {config!r:.200}")
    check_name("sep", sep, allow_blank=True)  # " " is a separator like any other
    out: dict[str, JSONValue] = {}
    _flatten_mapping(config, "", sep, out, set())
    return out


def _flatten_mapping(
    mapping: Mapping[Any, Any], prefix: str, sep: str, out: dict[str, JSONValue], active: set[int]
) -> None:
    _enter(mapping, prefix, active)
    for key, value in mapping.items():
        _flatten_value(value, f"{prefix}{sep}{key}" if prefix else str(key), sep, out, active)
    active.discard(id(mapping))


def _flatten_value(value: Any, path: str, sep: str, out: dict[str, JSONValue], active: set[int]) -> None:
    if isinstance(value, Mapping):
        if value:
            _flatten_mapping(value, path, sep, out, active)
        else:
            _put(out, path, {})
    elif isinstance(value, (list, tuple)) and any(
        isinstance(item, (Mapping, list, tuple)) for item in value
    ):
        _enter(value, path, active)
        for index, item in enumerate(value):
            _flatten_value(item, f"{path}{sep}{index}", sep, out, active)
        active.discard(id(value))
    elif isinstance(value, (list, tuple)):
        _put(out, path, [_json_leaf(item) for item in value])
    elif isinstance(value, (set, frozenset)):
        _put(out, path, sorted((_json_leaf(item) for item in value), key=repr))
    else:
        _put(out, path, _json_leaf(value))


def _enter(container: Any, path: str, active: set[int]) -> None:
    # Only containers on the current path count: the same dict used twice side by
    # side is fine, a dict that contains itself would recurse forever.
    if id(container) in active:
        raise ConfigError(f"config contains a reference cycle at {path!r}")
    active.add(id(container))


def _put(out: dict[str, JSONValue], path: str, value: JSONValue) -> None:
    if path in out:
        raise ConfigError(
            f"two config entries flatten to the same key {path!r}; rename one of them"
        )
    out[path] = value


def _json_leaf(value: Any) -> JSONValue:
    """Convert one non-container value to a JSON scalar (or its repr)."""
    if isinstance(value, Enum):
        # Checked before str/int: StrEnum/IntEnum members are str/int instances too.
        inner = value.value
        return inner if _is_json_scalar(inner) else repr(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        # numpy scalars (np.int64, np.bool_...) are common in search spaces built
        # with np.linspace; store the number, not "np.int64(3)".
        item = value.item()
        if item is not value:
            return _json_leaf(item)
    return repr(value)


def _is_json_scalar(value: Any) -> bool:
    if isinstance(value, Enum):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))

