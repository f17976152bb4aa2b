"""The `TrainConfig` a run was trained with, read back from its `config.json`.

`atl train` writes `config.json` next to `model.keras`; evaluation and export read it so
they use exactly the dataset (and its seed, size, splits) the model was trained and
tested on, unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


def train_config_from(values: dict[str, Any]):
    """`TrainConfig` from a mapping of its field names (JSON/YAML lists become tuples);
    keys that are not fields are ignored."""
    from atl_keras.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kept = {k: v for k, v in values.items() if k in fields}
    for key in ("ks", "unseen_classes"):
        if isinstance(kept.get(key), list):
            kept[key] = tuple(kept[key])
    return TrainConfig(**kept)


def load_run_config(model_path: str, overrides: dict[str, Any] | None = None):
    """`TrainConfig` from the `config.json` beside `model_path` (defaults when absent),
    updated with the non-None values of `overrides`."""
    values: dict[str, Any] = {}
    saved = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if os.path.exists(saved):
        with open(saved, encoding="utf-8") as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError(f"{saved} does not hold a TrainConfig mapping.")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return train_config_from(values)
