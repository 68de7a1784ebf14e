"""run_mode torch: the model itself (any device torch supports)."""

from __future__ import annotations

from typing import Any

from ..errors import UadkitError
from .base import RuntimeSpec


def _load(model_dir: str | None, model: Any, device: str):
    if model is None:
        from ..engine.checkpoint import load_model_dir

        if not model_dir:
            raise UadkitError("run_mode torch: no model given and no model_dir to load one from")
        model, _ = load_model_dir(model_dir)
    return model


TORCH = RuntimeSpec("torch", _load)
