"""TrainerConfig: construction, validation, and the signed round trip."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rapidfire_state import serialize
from rapidfire_state.exceptions import ConfigError, PayloadIntegrityError, RapidFireError
from rapidfire_state.serialize import encode_payload
from rapidfire_state.trainer_config import TrainerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def rf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RF_HOME", str(tmp_path / "rf_home"))
    monkeypatch.delenv("RF_PAYLOAD_KEY", raising=False)
    serialize._KEY_CACHE.clear()
    return tmp_path / "rf_home"


def make(**overrides: Any) -> TrainerConfig:
    fields: dict[str, Any] = {
        "run_id": 5,
        "worker_id": 0,
        "config_leaf": {"lr": 1e-5, "model": {"name": "gpt2"}},
        "experiment_name": "my_exp",
        "chunk_id": 2,
        "epoch": 0,
        "metric_run_id": "abc123",
    }
    fields.update(overrides)
    return TrainerConfig(**fields)


def test_spec_example_constructs_with_defaults() -> None:
    config = make()
    assert (config.run_id, config.worker_id, config.chunk_id, config.epoch) == (5, 0, 2, 0)
    assert config.experiment_name == "my_exp" and config.metric_run_id == "abc123"
    assert (config.total_steps, config.completed_steps, config.num_epochs_completed) == (0, 0, 0)
    assert config.warm_started_from is None and config.cloned_from is None


def test_optional_fields_accepted() -> None:
    config = make(
        metric_run_id=None,
        total_steps=100,
        completed_steps=100,
        num_epochs_completed=3,
        warm_started_from=2,
        cloned_from=3,
    )
    assert config.completed_steps == config.total_steps == 100
    # total_steps == 0 means unknown: any completed_steps is allowed meanwhile.
    assert make(total_steps=0, completed_steps=40).completed_steps == 40


def test_frozen_and_replace_revalidates() -> None:
    config = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epoch = 1  # type: ignore[misc]
    assert dataclasses.replace(config, epoch=1).epoch == 1
    with pytest.raises(ConfigError, match="epoch"):
        dataclasses.replace(config, epoch=-1)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("run_id", 0, "int >= 1"),
        ("run_id", -3, "int >= 1"),
        ("run_id", True, "int >= 1"),
        ("run_id", "5", "int >= 1"),
        ("run_id", 5.0, "int >= 1"),
        ("worker_id", -1, "int >= 0"),
        ("worker_id", None, "int >= 0"),
        ("chunk_id", -1, "int >= 0"),
        ("chunk_id", False, "int >= 0"),
        ("epoch", -1, "int >= 0"),
        ("epoch", 1.5, "int >= 0"),
        ("total_steps", -1, "int >= 0"),
        ("completed_steps", -1, "int >= 0"),
        ("num_epochs_completed", -2, "int >= 0"),
        ("warm_started_from", 0, "None or an int >= 1"),
        ("warm_started_from", "2", "None or an int >= 1"),
        ("cloned_from", True, "None or an int >= 1"),
        ("cloned_from", 5, "another run"),  # equals run_id
        ("warm_started_from", 5, "another run"),
        ("config_leaf", [("lr", 1)], "a dict"),
        ("config_leaf", None, "a dict"),
        ("experiment_name", "", "non-empty string"),
        ("experiment_name", "   ", "non-empty string"),
        ("experiment_name", None, "non-empty string"),
        ("experiment_name", b"exp", "non-empty string"),
        ("metric_run_id", "", "None or a non-empty string"),
        ("metric_run_id", 7, "None or a non-empty string"),
    ],
)
def test_each_invalid_field_names_field_value_and_allowed(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(**{field: value})
    message = str(info.value)
    assert f"TrainerConfig.{field}={value!r}" in message
    assert allowed in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, RapidFireError)


def test_completed_steps_beyond_total_steps() -> None:
    with pytest.raises(ConfigError, match=r"completed_steps=11 exceeds total_steps=10"):
        make(total_steps=10, completed_steps=11)


def test_round_trip_through_bytes() -> None:
    config = make(
        config_leaf={"lr": 2e-5, "schedule": lambda step: 0.5**step, "nested": {"layers": [1, 2]}},
        total_steps=10,
        completed_steps=4,
        cloned_from=1,
    )
    blob = config.to_bytes()
    assert isinstance(blob, bytes)
    decoded = TrainerConfig.from_bytes(blob)
    assert isinstance(decoded, TrainerConfig)
    for field in dataclasses.fields(TrainerConfig):
        if field.name != "config_leaf":
            assert getattr(decoded, field.name) == getattr(config, field.name), field.name
    assert decoded.config_leaf["nested"] == {"layers": [1, 2]}
    assert decoded.config_leaf["schedule"](3) == 0.125
    assert TrainerConfig.from_bytes(memoryview(blob)).run_id == 5


def test_from_bytes_refuses_tampered_blob() -> None:
    blob = bytearray(make().to_bytes())
    blob[-1] ^= 0xFF
    with pytest.raises(PayloadIntegrityError):
        TrainerConfig.from_bytes(bytes(blob))


def test_from_bytes_refuses_another_type() -> None:
    with pytest.raises(PayloadIntegrityError, match="holds a dict, not a TrainerConfig"):
        TrainerConfig.from_bytes(encode_payload({"run_id": 5}))


def test_from_bytes_revalidates_the_decoded_config() -> None:
    # A TrainerConfig whose fields bypassed __post_init__ (as unpickling does).
    broken = object.__new__(TrainerConfig)
    for field in dataclasses.fields(TrainerConfig):
        object.__setattr__(broken, field.name, getattr(make(), field.name))
    object.__setattr__(broken, "run_id", 0)
    with pytest.raises(ConfigError, match="run_id=0"):
        TrainerConfig.from_bytes(encode_payload(broken))


def test_import_loads_neither_torch_nor_mlflow() -> None:
    code = (
        "import sys, json, rapidfire_state.trainer_config;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
