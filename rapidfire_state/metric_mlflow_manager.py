"""Alias of :mod:`rapidfire_state.metric_manager` under the name the original utilities used.

The spec imports ``from rapidfireai.utils.metric_mlflow_manager import MLflowManager``;
``from rapidfire_state.metric_mlflow_manager import MLflowManager`` works the same.
Like the module it re-exports, importing it does not import mlflow.
"""

from __future__ import annotations

from rapidfire_state.metric_manager import (
    MetricInputError,
    MetricLoggingError,
    MetricNotFoundError,
    MLflowManager,
)

__all__ = ["MLflowManager", "MetricLoggingError", "MetricInputError", "MetricNotFoundError"]
