"""Alias of :mod:`rapidfire_state.automl_utils`.

The original code imports ``from rapidfireai.automl import get_runs``; this
module keeps that spelling working as ``from rapidfire_state.automl import ...``.
"""

from __future__ import annotations

from rapidfire_state.automl_utils import (
    AutoMLAlgorithm,
    GridSearch,
    List,
    ParamSpec,
    RandomSearch,
    Range,
    get_flattened_config_leaf,
    get_runs,
)

__all__ = [
    "ParamSpec",
    "List",
    "Range",
    "AutoMLAlgorithm",
    "GridSearch",
    "RandomSearch",
    "get_runs",
    "get_flattened_config_leaf",
]
