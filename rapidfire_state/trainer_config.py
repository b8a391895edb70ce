"""``TrainerConfig``: everything a worker needs to build a trainer for one run and chunk.

Imports only leaves (``exceptions``, ``serialize``, ``validation``); never torch or mlflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rapidfire_state.exceptions import ConfigError, PayloadIntegrityError
from rapidfire_state.serialize import decode_db_payload, encode_payload
from rapidfire_state.validation import check_int, check_name, check_positive_int

__all__ = ["TrainerConfig"]


@dataclass(frozen=True)
class TrainerConfig:
    """All the information ``create_trainer_instance()`` needs for one run and chunk.

    Frozen: a TrainerConfig is a snapshot handed from controller to worker, so a
    changed value is a new config, made with ``dataclasses.replace(config, ...)``
    (which validates again).  ``config_leaf`` itself is a plain dict and stays
    mutable; it is the user's run configuration (model, optimiser, lambdas...).

    Every field is validated on construction; a bad value raises ``ConfigError``
    naming the field, the value and what is allowed.
    """

    run_id: int
    worker_id: int
    config_leaf: dict[str, Any]
    experiment_name: str
    chunk_id: int
    epoch: int
    metric_run_id: str | None
    total_steps: int = 0
    completed_steps: int = 0
    num_epochs_completed: int = 0
    warm_started_from: int | None = None
    cloned_from: int | None = None

    def __post_init__(self) -> None:
        check_positive_int("TrainerConfig.run_id", self.run_id)
        check_int("TrainerConfig.worker_id", self.worker_id)
        check_int("TrainerConfig.chunk_id", self.chunk_id)
        check_int("TrainerConfig.epoch", self.epoch)
        check_int("TrainerConfig.total_steps", self.total_steps)
        check_int("TrainerConfig.completed_steps", self.completed_steps)
        check_int("TrainerConfig.num_epochs_completed", self.num_epochs_completed)
        # total_steps == 0 means "not known yet" (set after the first chunk), so the
        # bound applies only once it is known.
        if self.total_steps > 0 and self.completed_steps > self.total_steps:
            raise ConfigError(
                f"TrainerConfig.completed_steps={self.completed_steps!r} exceeds "
                f"total_steps={self.total_steps!r}; allowed: 0..total_steps "
                "(or any value >= 0 while total_steps is 0, i.e. unknown)"
            )
        if not isinstance(self.config_leaf, dict):
            raise ConfigError(
                f"TrainerConfig.config_leaf={self.config_leaf!r:.200} is a "
                f"{type(self.config_leaf).__qualname__}; allowed: a dict"
            )
        check_name("TrainerConfig.experiment_name", self.experiment_name)
        check_name("TrainerConfig.metric_run_id", self.metric_run_id, optional=True, allow_blank=True)
        for name in ("warm_started_from", "cloned_from"):
            value = getattr(self, name)
            if check_positive_int(f"TrainerConfig.{name}", value, optional=True) is None:
                continue
            if value == self.run_id:
                raise ConfigError(
                    f"TrainerConfig.{name}={value!r} equals run_id; allowed: None or "
                    "the id of another run"
                )

    def to_bytes(self) -> bytes:
        """Serialize to a signed payload (see :mod:`rapidfire_state.serialize`)."""
        return encode_payload(self)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> TrainerConfig:
        """Decode a payload made by :meth:`to_bytes`, verifying its signature and type.

        Raises ``PayloadIntegrityError`` when the blob does not verify or holds
        something other than a TrainerConfig, and ``ConfigError`` when it holds
        one whose fields no longer validate.
        """
        obj = decode_db_payload(data)
        if not isinstance(obj, cls):
            raise PayloadIntegrityError(
                f"payload holds a {type(obj).__qualname__}, not a {cls.__qualname__}"
            )
        # Unpickling restores fields without running __post_init__; replace() runs
        # it, so a payload written by an older, laxer version is checked too.
        return dataclasses.replace(obj)
