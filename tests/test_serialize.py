"""Signed dill payloads (encode/decode), the payload key, and flatten_config.

torch is imported only inside the tests that need it, so that the spawned
processes of the key race (which import this module) start quickly.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import math
import multiprocessing
import os
import pathlib
import pickle
import stat
import struct
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidfire_state import serialize
from rapidfire_state.exceptions import ConfigError, PayloadIntegrityError, RapidFireError
from rapidfire_state.serialize import (
    PAYLOAD_MAGIC,
    PAYLOAD_VERSION,
    decode_db_payload,
    encode_payload,
    flatten_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADER = struct.Struct(">4sH8sQ")  # the documented layout, re-implemented independently
PREFIX = HEADER.size + 32
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def rf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "rf_home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.delenv("RF_PAYLOAD_KEY", raising=False)
    serialize._KEY_CACHE.clear()
    yield home
    serialize._KEY_CACHE.clear()


def sign(body: bytes, key: bytes, *, version: int = PAYLOAD_VERSION) -> bytes:
    """Build a blob by the documented format, independently of the library."""
    key_id = hmac.new(key, b"rapidfire_state payload key id", hashlib.sha256).digest()[:8]
    header = HEADER.pack(PAYLOAD_MAGIC, version, key_id, len(body))
    return header + hmac.new(key, header + body, hashlib.sha256).digest() + body


class _Touch:
    """Unpickling an instance creates ``path``: a stand-in for arbitrary code execution."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def file_key() -> bytes:
    """The key in the key file, creating the file first if needed."""
    encode_payload(None)
    return (serialize.rf_home() / "payload.key").read_bytes()


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Touch(marker), protocol=4)


@dataclasses.dataclass
class Point:
    x: int
    y: list[int]


class Color(enum.Enum):
    RED = "red"
    PAIR = (1, 2)
    NAN = float("nan")


class Level(enum.IntEnum):
    LOW = 1


def _make_adder(n: int) -> Any:
    seen: list[int] = []

    def add(x: int) -> int:
        seen.append(x)
        return x + n + len(seen)

    return add


# --- round trips --------------------------------------------------------------------


def test_blob_starts_with_documented_header_and_verifies() -> None:
    blob = encode_payload({"lr": 1e-5})
    assert isinstance(blob, bytes)
    magic, version, _key_id, body_len = HEADER.unpack_from(blob)
    assert (magic, version) == (b"RFSP", 1)
    assert body_len == len(blob) - PREFIX
    key = (serialize.rf_home() / "payload.key").read_bytes()
    # Re-signing the body by the documented format reproduces the blob exactly.
    assert sign(blob[PREFIX:], key) == blob


def test_nested_config_round_trip() -> None:
    config = {
        "lr": 1e-5,
        "batch_size": 8,
        "model": {"layers": [64, 32], "act": "gelu", "extra": (1, None, True)},
        "tags": {"a", "b"},
        "raw": b"\x00\xff",
        "inf": float("inf"),
    }
    assert decode_db_payload(encode_payload(config)) == config


def test_lambda_and_closure_round_trip() -> None:
    config = {"fn": lambda x: x * 3, "add": _make_adder(10)}
    decoded = decode_db_payload(encode_payload(config))
    assert decoded["fn"](4) == 12
    assert decoded["add"](1) == 12  # 1 + 10 + len(seen) == 1: the closure cell came along
    assert decoded["add"](1) == 13


def test_dataclass_and_enum_round_trip() -> None:
    obj = {"p": Point(1, [2, 3]), "c": Color.PAIR}
    decoded = decode_db_payload(encode_payload(obj))
    assert decoded == obj
    assert decoded["c"] is Color.PAIR


def test_bytearray_and_memoryview_inputs_accepted() -> None:
    blob = encode_payload([1, 2, 3])
    assert decode_db_payload(bytearray(blob)) == [1, 2, 3]
    assert decode_db_payload(memoryview(blob)) == [1, 2, 3]


def test_tensor_round_trip() -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    obj = {
        "view": base[:, 1],  # non-contiguous view
        "half": torch.ones(3, dtype=torch.float16),
        "bf16": torch.full((2,), 1.5, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "ints": torch.tensor([1, -2], dtype=torch.int8),
    }
    decoded = decode_db_payload(encode_payload(obj))
    for name, tensor in obj.items():
        assert decoded[name].dtype == tensor.dtype, name
        assert torch.equal(decoded[name].detach(), tensor.detach()), name
    assert isinstance(decoded["param"], torch.nn.Parameter)
    assert decoded["param"].requires_grad


def test_cuda_tensor_comes_back_on_cpu_without_a_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = torch.randn(4, 3)
    obj = {"t": cpu.cuda(), "view": cpu.cuda()[:, 0], "p": torch.nn.Parameter(cpu.cuda())}
    blob = encode_payload(obj)
    decoded = decode_db_payload(blob)
    assert {t.device.type for t in decoded.values()} == {"cpu"}
    assert torch.equal(decoded["t"], cpu) and torch.equal(decoded["view"], cpu[:, 0])
    assert isinstance(decoded["p"], torch.nn.Parameter) and decoded["p"].requires_grad
    # A process that sees no GPU at all decodes it too.
    (tmp_path / "blob").write_bytes(blob)
    code = (
        "import sys, torch; from rapidfire_state.serialize import decode_db_payload;"
        "assert not torch.cuda.is_available();"
        f"d = decode_db_payload(open({str(tmp_path / 'blob')!r}, 'rb').read());"
        "print(sorted(t.device.type for t in d.values()))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['cpu', 'cpu', 'cpu']"


def test_unpicklable_object_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot serialize object of type dict") as info:
        encode_payload({"gen": (i for i in range(3))})  # dill cannot pickle generators
    assert isinstance(info.value.__cause__, TypeError)


def test_env_key_is_read_on_every_call(monkeypatch: pytest.MonkeyPatch, rf_home: Path) -> None:
    monkeypatch.setenv("RF_PAYLOAD_KEY", "key-one")
    blob_one = encode_payload("x")
    assert sign(blob_one[PREFIX:], b"key-one") == blob_one
    monkeypatch.setenv("RF_PAYLOAD_KEY", "clé-deux")  # any string, as UTF-8
    blob_two = encode_payload("x")
    assert sign(blob_two[PREFIX:], "clé-deux".encode()) == blob_two
    with pytest.raises(PayloadIntegrityError, match="different key"):
        decode_db_payload(blob_one)
    assert not (rf_home / "payload.key").exists()  # an env key never creates the file


def test_empty_env_key_counts_as_unset(monkeypatch: pytest.MonkeyPatch, rf_home: Path) -> None:
    monkeypatch.setenv("RF_PAYLOAD_KEY", "")
    blob = encode_payload("x")
    assert sign(blob[PREFIX:], (rf_home / "payload.key").read_bytes()) == blob


# --- corrupted input ----------------------------------------------------------------


@pytest.fixture
def blob() -> bytes:
    return encode_payload({"lr": 0.1, "layers": [1, 2, 3], "name": "run"})


def test_every_single_byte_flip_is_refused(blob: bytes) -> None:
    for index in range(len(blob)):
        damaged = bytearray(blob)
        damaged[index] ^= 0x01
        with pytest.raises(PayloadIntegrityError):
            decode_db_payload(bytes(damaged))


@pytest.mark.parametrize(
    ("region", "index", "message"),
    [
        ("magic", 0, "not a rapidfire_state payload"),
        ("version", 5, "version"),
        ("key id", 10, "different key"),
        ("length", 21, "truncated|trailing"),  # declared length off by one either way
        ("mac", 30, "integrity check"),
        ("body", -1, "integrity check"),
    ],
)
def test_byte_flip_message_names_the_failed_check(
    blob: bytes, region: str, index: int, message: str
) -> None:
    damaged = bytearray(blob)
    damaged[index] ^= 0x01
    with pytest.raises(PayloadIntegrityError, match=message):
        decode_db_payload(bytes(damaged))


def test_every_truncation_is_refused(blob: bytes) -> None:
    for size in range(len(blob)):
        with pytest.raises(PayloadIntegrityError):
            decode_db_payload(blob[:size])
    with pytest.raises(PayloadIntegrityError, match="truncated"):
        decode_db_payload(blob[: PREFIX + 3])


def test_trailing_bytes_are_refused(blob: bytes) -> None:
    with pytest.raises(PayloadIntegrityError, match="trailing"):
        decode_db_payload(blob + b"\x00")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, world", "not a rapidfire_state payload"),
        (pickle.dumps({"a": 1}), "not a rapidfire_state payload"),
        (b"RF", "truncated"),
        ("a string", "not str"),
        (None, "not NoneType"),
        (42, "not int"),
        ([1, 2], "not list"),
    ],
)
def test_foreign_input_is_refused(data: Any, message: str) -> None:
    with pytest.raises(PayloadIntegrityError, match=message):
        decode_db_payload(data)


def test_str_of_a_valid_blob_is_refused(blob: bytes) -> None:
    with pytest.raises(PayloadIntegrityError, match="not str"):
        decode_db_payload(blob.decode("latin-1"))


def test_unknown_version_is_refused(blob: bytes) -> None:
    key = file_key()
    with pytest.raises(PayloadIntegrityError, match="version 2 is not supported"):
        decode_db_payload(sign(blob[PREFIX:], key, version=2))


def test_other_key_is_refused(monkeypatch: pytest.MonkeyPatch, blob: bytes) -> None:
    monkeypatch.setenv("RF_PAYLOAD_KEY", "another key")
    with pytest.raises(PayloadIntegrityError, match=r"different key.*RF_PAYLOAD_KEY"):
        decode_db_payload(blob)
    monkeypatch.delenv("RF_PAYLOAD_KEY")
    assert decode_db_payload(blob)["name"] == "run"


def test_other_rf_home_is_another_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, blob: bytes) -> None:
    monkeypatch.setenv("RF_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(PayloadIntegrityError, match="payload.key"):
        decode_db_payload(blob)


def test_verified_blob_that_cannot_unpickle_is_chained() -> None:
    module = types.ModuleType("rf_vanishing_module")

    class Gone:
        pass

    Gone.__module__ = module.__name__
    Gone.__qualname__ = "Gone"
    module.Gone = Gone  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        blob = encode_payload(Gone())
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(PayloadIntegrityError, match="could not be unpickled") as info:
        decode_db_payload(blob)
    assert isinstance(info.value.__cause__, ImportError)
    assert isinstance(info.value, RapidFireError)


# --- nothing is unpickled before the MAC verifies -----------------------------------


def test_malicious_body_would_run_if_signed_with_the_real_key(tmp_path: Path) -> None:
    # Positive control: the payload is live, so the refusals below mean something.
    marker = tmp_path / "pwned-control"
    key = file_key()
    decode_db_payload(sign(malicious_pickle(marker), key))
    assert marker.exists()


def _forgeries(body: bytes, key: bytes) -> dict[str, bytes]:
    key_id = hmac.new(key, b"rapidfire_state payload key id", hashlib.sha256).digest()[:8]
    good_header = HEADER.pack(PAYLOAD_MAGIC, PAYLOAD_VERSION, key_id, len(body))
    return {
        "raw pickle": body,
        "random mac": good_header + os.urandom(32) + body,
        "zero mac": good_header + bytes(32) + body,
        "other key": sign(body, b"attacker key"),
        "other key, our key id": sign(body, b"attacker key")[:6] + key_id + sign(body, b"x")[14:],
        "unknown version": sign(body, key, version=7),
        "magic only": PAYLOAD_MAGIC + body,
        "trailing": sign(body, key) + b"!",
        "short": sign(body, key)[:-1],
    }


def test_forged_blobs_never_unpickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    key = file_key()
    for name, forged in _forgeries(malicious_pickle(marker), key).items():
        with pytest.raises(PayloadIntegrityError):
            decode_db_payload(forged)
        assert not marker.exists(), name


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=400).map(lambda b: PAYLOAD_MAGIC + b),
        st.binary(min_size=16, max_size=400).map(lambda b: PAYLOAD_MAGIC + b"\x00\x01" + b),
    )
)
def test_fuzz_random_bytes_only_raise_integrity_error(data: bytes) -> None:
    with pytest.raises(PayloadIntegrityError):
        decode_db_payload(data)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    extra=st.binary(max_size=8),
)
def test_fuzz_mutated_blobs_only_raise_integrity_error_and_never_unpickle(
    tmp_path: Path, edits: list[tuple[int, int]], cut: int | None, extra: bytes
) -> None:
    marker = tmp_path / "pwned-fuzz"
    valid = encode_payload({"lr": 0.5, "fn": len})
    key = file_key()
    # Valid blob, and the malicious body under a forged (random) MAC.
    evil = bytearray(sign(malicious_pickle(marker), key))
    evil[HEADER.size : PREFIX] = os.urandom(32)
    for original in (valid, bytes(evil)):
        mutated = bytearray(original)
        for index, value in edits:
            mutated[index % len(mutated)] = value
        if cut is not None:
            mutated = mutated[: cut % (len(mutated) + 1)]
        mutated += extra
        if bytes(mutated) == valid:
            assert decode_db_payload(bytes(mutated)) == {"lr": 0.5, "fn": len}
            continue
        with pytest.raises(PayloadIntegrityError):
            decode_db_payload(bytes(mutated))
    assert not marker.exists()


# --- the key file -------------------------------------------------------------------


def test_key_file_is_created_0600_and_reused(rf_home: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        blob = encode_payload({"a": 1})
    finally:
        os.umask(old_umask)
    key_file = rf_home / "payload.key"
    info = key_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 32
    key = key_file.read_bytes()
    serialize._KEY_CACHE.clear()  # force a re-read from disk
    assert decode_db_payload(blob) == {"a": 1}
    encode_payload("again")
    assert key_file.read_bytes() == key
    assert key_file.stat().st_ino == info.st_ino
    assert sorted(p.name for p in rf_home.iterdir()) == ["payload.key"]  # no temp files left


def test_short_key_file_is_a_config_error(rf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rf_home.mkdir(parents=True)
    (rf_home / "payload.key").write_bytes(b"short")
    monkeypatch.setattr(serialize, "_KEY_FILE_SETTLE_SECONDS", 0.05)
    with pytest.raises(ConfigError, match="holds 5 bytes"):
        encode_payload(1)


def _race_for_key(home: str, barrier: Any, results: Any) -> None:
    os.environ["RF_HOME"] = home
    os.environ.pop("RF_PAYLOAD_KEY", None)
    barrier.wait(timeout=60)
    blob = encode_payload({"pid": os.getpid()})
    key, _ = serialize._payload_key()
    results.put((key.hex(), blob))


@pytest.mark.slow
def test_eight_processes_creating_the_key_agree(rf_home: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race_for_key, args=(str(rf_home), barrier, results)) for _ in range(8)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * 8
    keys = {key for key, _ in outcomes}
    assert keys == {(rf_home / "payload.key").read_bytes().hex()}
    assert sorted(decode_db_payload(blob)["pid"] for _, blob in outcomes) == sorted(p.pid for p in procs)
    assert sorted(p.name for p in rf_home.iterdir()) == ["payload.key"]


def test_import_loads_neither_torch_nor_mlflow() -> None:
    code = (
        "import sys, json, rapidfire_state.serialize;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# --- flatten_config -----------------------------------------------------------------


def _json_ok(flat: dict[str, Any]) -> None:
    assert json.loads(json.dumps(flat, allow_nan=False)) == flat


def test_flatten_nested_dicts_and_lists() -> None:
    config = {
        "lr": 1e-3,
        "model": {"name": "gpt2", "dims": [64, 32], "shape": (1, 2), "opt": {"beta": 0.9}},
        "layers": [{"units": 8}, {"units": 4, "act": None}],
        "grid": [[1, 2], [3]],
        "flags": [True, False],
        "empty": {},
        "none": [],
    }
    flat = flatten_config(config)
    assert flat == {
        "lr": 1e-3,
        "model.name": "gpt2",
        "model.dims": [64, 32],
        "model.shape": [1, 2],
        "model.opt.beta": 0.9,
        "layers.0.units": 8,
        "layers.1.units": 4,
        "layers.1.act": None,
        "grid.0": [1, 2],
        "grid.1": [3],
        "flags": [True, False],
        "empty": {},
        "none": [],
    }
    _json_ok(flat)


def test_flatten_non_finite_floats_become_strings() -> None:
    flat = flatten_config({"a": math.nan, "b": math.inf, "c": [-math.inf, 1.5]})
    assert flat == {"a": "nan", "b": "inf", "c": ["-inf", 1.5]}
    _json_ok(flat)


def test_flatten_objects_become_repr() -> None:
    def fn(x: int) -> int:
        return x

    flat = flatten_config({"fn": fn, "cls": Point, "obj": Point(1, [2]), "items": [Point(0, []), 3]})
    assert flat["fn"] == repr(fn)
    assert flat["cls"] == repr(Point)
    assert flat["obj"] == "Point(x=1, y=[2])"
    assert flat["items"] == ["Point(x=0, y=[])", 3]
    _json_ok(flat)


def test_flatten_tensor_becomes_repr() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.tensor([1.0, 2.0])
    flat = flatten_config({"t": tensor})
    assert flat == {"t": repr(tensor)}
    _json_ok(flat)


def test_flatten_enums_keys_sets_and_numpy() -> None:
    from rapidfire_state.constants import RunStatus

    flat = flatten_config(
        {
            "status": RunStatus.ONGOING,
            "color": Color.RED,
            "pair": Color.PAIR,
            "nan": Color.NAN,
            "level": Level.LOW,
            1: "int key",
            None: "none key",
            "set": {3, 1, 2},
        }
    )
    assert flat == {
        "status": "ONGOING",
        "color": "red",
        "pair": repr(Color.PAIR),
        "nan": repr(Color.NAN),
        "level": 1,
        "1": "int key",
        "None": "none key",
        "set": [1, 2, 3],
    }
    assert type(flat["status"]) is str and type(flat["level"]) is int
    _json_ok(flat)
    np = pytest.importorskip("numpy")
    flat = flatten_config({"i": np.int64(3), "f": np.float32(0.5), "n": np.float64("nan"), "b": np.bool_(True)})
    assert flat == {"i": 3, "f": 0.5, "n": "nan", "b": True}
    _json_ok(flat)


def test_flatten_custom_separator() -> None:
    assert flatten_config({"a": {"b": [{"c": 1}]}}, sep="/") == {"a/b/0/c": 1}


@pytest.mark.parametrize("bad", [[1, 2], "a=1", None, 3, (("a", 1),)])
def test_flatten_requires_a_dict(bad: Any) -> None:
    with pytest.raises(ConfigError, match=type(bad).__qualname__):
        flatten_config(bad)


def test_flatten_refuses_colliding_keys() -> None:
    with pytest.raises(ConfigError, match="'a.b'"):
        flatten_config({"a.b": 1, "a": {"b": 2}})
    with pytest.raises(ConfigError, match="'1'"):
        flatten_config({1: "x", "1": "y"})


def test_flatten_refuses_cycles_but_allows_shared_values() -> None:
    shared = {"x": 1}
    assert flatten_config({"a": shared, "b": shared}) == {"a.x": 1, "b.x": 1}
    cyclic: dict[str, Any] = {"a": {}}
    cyclic["a"]["self"] = cyclic
    with pytest.raises(ConfigError, match="cycle"):
        flatten_config(cyclic)


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.builds(Point, st.integers(), st.lists(st.integers(), max_size=2)),
    st.sampled_from([Color.RED, Color.PAIR, Color.NAN, Level.LOW, len, Point]),
)
_keys = st.text(alphabet="abcxyz_", min_size=1, max_size=4)
_configs = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(config=st.dictionaries(_keys, _configs, max_size=5))
def test_fuzz_flatten_is_always_strict_json(config: dict[str, Any]) -> None:
    flat = flatten_config(config)
    _json_ok(flat)
    assert all(isinstance(key, str) for key in flat)
    for value in flat.values():
        assert not isinstance(value, dict) or value == {}
