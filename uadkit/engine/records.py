"""Run records: the uadkit log (console + train.log on rank 0), seeding, and the files a run leaves
behind (config.yaml, train_result.json), written only once the model is saved."""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any

import numpy as np
import torch

from ..config import dump_config
from ..data.image_io import write_text_atomic

log = logging.getLogger("uadkit")


def setup_logging(output: str | None, main_process: bool = True) -> None:
    # Only rank 0 logs progress and writes train.log: N processes must not print N copies.
    log.setLevel(logging.INFO if main_process else logging.WARNING)
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("[uadkit] %(message)s"))
        log.addHandler(sh)
    if output and main_process:
        os.makedirs(output, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output, "train.log"), encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_run_records(out: str, cfg: dict, result: dict[str, Any]) -> None:
    # Written with the model, not before: a failed run leaves the previous config and results in place.
    write_text_atomic(os.path.join(out, "config.yaml"), dump_config(cfg))
    write_text_atomic(os.path.join(out, "train_result.json"), json.dumps(result, indent=2))
