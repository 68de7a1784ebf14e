"""Models by name: `create_model("STFPM")`, YAML `Global.model` and the CLI resolve through here."""

from __future__ import annotations

from ..errors import UadkitError
from .base import AnomalyModel
from .efficientad import EfficientAD
from .padim import PaDiM
from .patchcore import PatchCore
from .stfpm import STFPM

MODELS: dict[str, type[AnomalyModel]] = {cls.name: cls for cls in (STFPM, PatchCore, PaDiM, EfficientAD)}


def model_class(name: str) -> type[AnomalyModel]:
    for key, cls in MODELS.items():
        if key.lower() == str(name).lower():
            return cls
    raise UadkitError(f"unknown model '{name}'; expected one of {', '.join(MODELS)}")


def build_model(name: str, model_cfg: dict, pretrained: bool = True) -> AnomalyModel:
    return model_class(name)(model_cfg, pretrained=pretrained)


__all__ = ["AnomalyModel", "MODELS", "build_model", "model_class"]
