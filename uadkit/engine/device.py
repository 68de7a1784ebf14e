"""`Global.device` strings (cpu, gpu, gpu:0, gpu:0,1) -> torch devices."""

from __future__ import annotations

import torch

from ..errors import UadkitError


def parse_devices(spec: str) -> list[torch.device]:
    spec = str(spec).strip().lower()
    if spec == "cpu":
        return [torch.device("cpu")]
    kind, _, ids = spec.partition(":")
    if kind not in ("gpu", "cuda"):
        raise UadkitError(f"Global.device: expected cpu, gpu, gpu:0 or gpu:0,1, got {spec!r}")
    if not torch.cuda.is_available():
        raise UadkitError(f"Global.device={spec}: no CUDA GPU is available here; use Global.device=cpu")
    try:
        idx = [int(i) for i in ids.split(",")] if ids else [0]
    except ValueError as e:
        raise UadkitError(f"Global.device: bad GPU list in {spec!r}") from e
    bad = [i for i in idx if i >= torch.cuda.device_count()]
    if bad:
        raise UadkitError(f"Global.device={spec}: GPU {bad[0]} does not exist ({torch.cuda.device_count()} found)")
    return [torch.device(f"cuda:{i}") for i in idx]


def main_device(spec: str) -> torch.device:
    return parse_devices(spec)[0]
