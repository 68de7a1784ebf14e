"""The training engine: the gradient loop for trainable models and `train()`, which runs a model's
training (this loop, or one fit pass from engine/fitting.py), its calibration (engine/calibrate.py), the
atomic save of best_model/ and the run records (engine/records.py).

The loop owns batches, devices, processes, checkpoints and the choice of the best epoch; the model owns its
loss, optimiser and schedule, what it does before and after training and any extra image stream
(models/base.py)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.dataset import model_dataset
from ..data.formats import DatasetIndex, Sample
from ..errors import UadkitError
from ..models import AnomalyModel
from .calibrate import calibrate_model, calibrate_on_samples, collect_scores
from .checkpoint import load_train_state, save_model_dir
from .device import autocast, full_fp32, machine_info, main_device, subnormals_flushed, training_precision
from .distributed import SINGLE, DistContext, synced_batchnorm
from .fitting import FEATURE_CACHE_LIMIT, fit_distributed, image_loader
from .malloc import reuse_freed_memory
from .map_check import GRID, check_alignment, check_good_maps
from .records import seed_everything, setup_logging, write_run_records

__all__ = ["seed_everything", "setup_logging", "train", "train_gradient"]  # records re-exported for callers

log = logging.getLogger("uadkit")
TEACHER_CACHE_LIMIT = 4 * 1024**3  # bytes of cached targets before falling back to recomputing them


def _batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _loader(samples: list[Sample], model: AnomalyModel, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(model_dataset(samples, model), batch_size=batch_size, shuffle=False,
                      num_workers=workers)


def _image_batches(samples: list[Sample], model: AnomalyModel, batch_size: int, workers: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    for images, _ in _loader(samples, model, batch_size, workers):
        yield _channels_last(images.to(device))  # the training layout (only speed depends on it)


class _Loss(torch.nn.Module):
    """training_loss as a forward(), so DistributedDataParallel can see the call and sync gradients."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: list[torch.Tensor] | None,
                extra: torch.Tensor | None) -> torch.Tensor:
        return self.model.training_loss(images, targets, extra)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class _TargetCache:
    """A model's fixed per-image targets (frozen-teacher features) with the image itself as uint8, kept
    after the first epoch while all of them fit TEACHER_CACHE_LIMIT."""

    def __init__(self, enabled: bool, n_images: int) -> None:
        self.items: dict[int, tuple[torch.Tensor, list[torch.Tensor] | None]] | None = {} if enabled else None
        self.n = n_images

    def get(self, ids: list[int], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        if self.items is None or not all(i in self.items for i in ids):
            return None
        images = torch.stack([self.items[i][0] for i in ids]).to(device).float() / 255
        first = self.items[ids[0]][1]
        # in the layout fresh ones have (channels-last): a layout changes float rounding, and a resumed run,
        # which computes its first epoch's targets afresh, must reproduce an uninterrupted one exactly
        return _channels_last(images), [_channels_last(torch.stack([self.items[i][1][k] for i in ids]).to(device))
                                        for k in range(len(first))]

    def batch(self, ids: list[int], ds: Dataset, model: AnomalyModel, device: torch.device
              ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Images `ids` of `ds` and their targets: kept ones, else loaded, computed and kept."""
        hit = self.get(ids, device)
        if hit is not None:
            return hit
        images = _channels_last(torch.stack([ds[i][0] for i in ids]).to(device))
        targets = model.training_targets(images)
        self.put(ids, images, targets)
        return images, targets

    def put(self, ids: list[int], images: torch.Tensor, targets: list[torch.Tensor] | None) -> None:
        if self.items is None or targets is None:
            return
        per_image = sum(x[0].numel() * x.element_size() for x in targets) + images[0].numel()
        if per_image * self.n > TEACHER_CACHE_LIMIT:
            self.items = None
            return
        for j, i in enumerate(ids):
            self.items[i] = ((images[j] * 255).round().to(torch.uint8).cpu(), [x[j].detach().cpu() for x in targets])


def _val_loss(model: AnomalyModel, samples: list[Sample], device: torch.device, batch_size: int,
              ctx: DistContext, cache: _TargetCache, precision: str) -> float | None:
    if not samples:
        return None
    model.eval()
    total, n = 0.0, 0
    mine = ctx.shard(list(range(len(samples))))
    ds = model_dataset([samples[i] for i in mine], model)
    with torch.no_grad():
        for j in range(0, len(mine), batch_size):
            ids = list(range(j, min(j + batch_size, len(mine))))
            # the same images every epoch: their teacher targets are kept too
            images, targets = cache.batch(ids, ds, model, device)
            with autocast(precision, device):  # as training computes it: epochs compare like with like
                loss = model.training_loss(images, targets)
            total += float(loss) * len(images)
            n += len(images)
    total, n = ctx.sum(total, n)
    return total / n


def _resume_mismatch(path: str, saved: dict[str, Any], now: dict[str, Any]) -> str:
    """One line for a checkpoint whose model or optimiser does not fit the configured model."""
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k != "pretrained_path")
    hint = ", ".join(f"Model.{k}={saved[k]!r} there" if k in saved else f"no Model.{k} there" for k in differ)
    hint = hint or "it was saved by an older version"
    return (f"config key 'Train.resume_path': {path} holds a model of another shape than the configured one "
            f"({hint}); resume with the config it was trained with")


def _cpu_state(model: AnomalyModel) -> dict[str, torch.Tensor]:
    return copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})


def train_epochs(train_cfg: dict[str, Any], steps_per_epoch: int) -> int:
    """Whole epochs a run trains: Train.epochs_iters, or Train.step_budget steps rounded up to whole epochs;
    the fewer where both are set (config validation refuses both null). A step budget gives a small data set
    as much training as a large one (EfficientAD at 150 epochs: ~5,400 steps on screw's 288 images, ~1,050
    on 54)."""
    budget = train_cfg.get("step_budget")
    return min(e for e in (train_cfg["epochs_iters"], budget and math.ceil(budget / steps_per_epoch)) if e)


def train_gradient(model: AnomalyModel, index: DatasetIndex, cfg: dict, out: str,
                   device: torch.device, ctx: DistContext = SINGLE) -> dict[str, Any]:
    precision = training_precision(cfg["Train"]["precision"], device)
    log.info("training steps in %s (Train.precision %s)", precision, cfg["Train"]["precision"])
    reuse_freed_memory()  # every step's activations from the heap, not fresh pages (in every process of a job)
    # fp32 on a GPU: TF32 off for the whole run, the teacher's targets and validation included (on an H200 an
    # STFPM step's loss then matched the CPU's to 4e-7 where TF32 was 1 % off after one step). Subnormal floats
    # flushed in this thread (torch's pool does from import on, engine/device.py): they slowed EfficientAD 4x.
    with full_fp32(device) if precision == "fp32" else contextlib.nullcontext(), subnormals_flushed():
        return _gradient_loop(model, index, cfg, out, device, ctx, precision)


def _gradient_loop(model: AnomalyModel, index: DatasetIndex, cfg: dict, out: str, device: torch.device,
                   ctx: DistContext, precision: str) -> dict[str, Any]:
    t = cfg["Train"]
    bs, workers, seed = t["batch_size"], t["num_workers"], cfg["Global"]["seed"]
    steps = math.ceil(len(index.train) / bs)
    epochs = train_epochs(t, steps)
    if t.get("step_budget"):
        log.info("training %d epochs of %d steps (Train.step_budget %d, Train.epochs_iters %s)", epochs, steps,
                 t["step_budget"], t["epochs_iters"])
    if bs < ctx.world:
        raise UadkitError(f"Train.batch_size {bs} is the global batch: it must be >= the {ctx.world} processes")
    # channels-last: on 2 CPU cores an STFPM step (Lite0, batch 8, 256 px) took 0.50 s contiguous and 0.24 s
    # channels-last, its teacher 0.21 vs 0.06 s (depthwise convolutions); EfficientAD's plain ones 0.088 vs
    # 0.082 s. The model stays channels-last after training, as the predictor that calibrates it scores;
    # saving writes the usual layout.
    model.to(device, memory_format=torch.channels_last)
    start, history = 0, []
    best: dict[str, Any] = {"epoch": None, "val_loss": math.inf, "state": None}
    resume = None
    if t["resume_path"]:
        from .checkpoint import load_model_dir

        resumed, _ = load_model_dir(t["resume_path"])
        resume = load_train_state(t["resume_path"])
        try:
            model.load_state_dict(resumed.state_dict())  # copied into the channels-last parameters
        except RuntimeError:
            raise UadkitError(_resume_mismatch(t["resume_path"], resumed.cfg, model.cfg)) from None
    model.on_train_start(lambda: _image_batches(index.train, model, bs, workers, device))
    # after the hook (a model may size its parameters from data); epochs_iters is this run's count, so that a
    # schedule spans the epochs the loop runs
    opt, sched = model.configure_optimizers({**t, "epochs_iters": epochs})
    if resume is not None:
        try:
            opt.load_state_dict(resume["optimizer"])
        except (ValueError, RuntimeError):
            raise UadkitError(_resume_mismatch(t["resume_path"], resumed.cfg, model.cfg)) from None
        if sched is not None and "scheduler" in resume:
            sched.load_state_dict(resume["scheduler"])
        start, history = int(resume["epoch"]), list(resume.get("history", []))
        # the best epoch so far travels with the checkpoint: a resumed run picks the same best as an
        # uninterrupted one
        if resume.get("best_state") is not None:
            best = {"epoch": resume["best_epoch"], "val_loss": float(resume["best_val_loss"]),
                    "state": resume["best_state"]}
        log.info("resumed from %s at epoch %d", t["resume_path"], start)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start):  # keep the shuffling sequence identical to an uninterrupted run
        torch.randperm(len(index.train), generator=gen)
    ds = model_dataset(index.train, model)
    cache = _TargetCache(bool(t.get("cache_teacher")), len(ds))
    val_cache = _TargetCache(bool(t.get("cache_teacher")), len(index.val))
    extra_source = model.extra_batch_source(t)
    loss_fn: torch.nn.Module = _Loss(model)
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device] if device.type == "cuda" else None)
    for epoch in range(start, epochs):
        model.train()
        running, seen = 0.0, 0
        lr_used = opt.param_groups[0]["lr"]
        # the extra stream is seeded per epoch and rank, so resuming at an epoch draws what it would have
        extra_gen = torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + ctx.rank)
        # Every rank draws the same global batches and takes its own slice of each one; a tail batch with
        # fewer images than processes is dropped so every rank always has work (and DDP never waits).
        batches = [ctx.shard(b) for b in _batches(len(ds), bs, True, gen) if len(b) >= ctx.world]
        bar = tqdm(batches, total=min(steps, len(batches)), desc=f"epoch {epoch + 1}/{epochs}",
                   unit="batch", dynamic_ncols=True, disable=None if ctx.is_main else True, leave=False)
        for ids in bar:
            images, targets = cache.batch(ids, ds, model, device)
            extra = extra_source(len(ids), extra_gen).to(device) if extra_source is not None else None
            with autocast(precision, device):  # the teacher's targets above stay fp32
                loss = loss_fn(images, targets, extra)
            if not torch.isfinite(loss):
                raise UadkitError(f"training diverged at epoch {epoch + 1} (loss {float(loss)}); "
                                  "lower Train.learning_rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(ids)
            seen += len(ids)
            bar.set_postfix(loss=f"{running / seen:.4f}")
        bar.close()
        if sched is not None:
            sched.step()
        running, seen = ctx.sum(running, seen)
        train_loss = running / max(seen, 1)
        val_loss = _val_loss(model, index.val, device, bs, ctx, val_cache, precision)
        history.append({"epoch": epoch + 1, "lr": round(lr_used, 6),
                        "train_loss": round(train_loss, 6),
                        "val_loss": None if val_loss is None else round(val_loss, 6)})
        log.info("epoch %d/%d  train_loss %.5f%s", epoch + 1, epochs, train_loss,
                 "" if val_loss is None else f"  val_loss {val_loss:.5f}")
        score = val_loss if val_loss is not None else train_loss
        if score <= best["val_loss"]:
            best = {"epoch": epoch + 1, "val_loss": score, "state": _cpu_state(model)}
        last = epoch + 1 == epochs
        interval = t.get("save_interval") or 0
        if ctx.is_main and (last or (interval and (epoch + 1) % interval == 0)):
            state = {"optimizer": opt.state_dict(), "epoch": epoch + 1, "history": history,
                     "best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "best_state": best["state"],
                     **({"scheduler": sched.state_dict()} if sched is not None else {})}
            save_model_dir(model, os.path.join(out, "checkpoints", "last"), train_state=state)
            if interval and (epoch + 1) % interval == 0:
                save_model_dir(model, os.path.join(out, "checkpoints", f"epoch_{epoch + 1}"), train_state=state)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    # the end hook's statistics (EfficientAD's map quantiles) in full fp32, as scoring computes maps
    with torch.no_grad(), full_fp32(device):
        if ctx.is_main:  # only rank 0 calibrates and saves
            model.on_train_end(lambda: _image_batches(index.val or index.train, model, bs, workers, device))
    return {"history": history, "best_epoch": best["epoch"], "epochs": epochs, "precision": precision}


def _features_fit_in_cache(model: AnomalyModel, index: DatasetIndex, device: torch.device) -> bool:
    """Out-of-fold scoring keeps every image's features: check the size on one image before fitting."""
    with torch.no_grad():
        one = model.to(device).eval().features(model_dataset(index.train[:1], model)[0][0][None].to(device))
    need = one.numel() * one.element_size() * (len(index.train) + len(index.val))
    if need > FEATURE_CACHE_LIMIT:
        log.warning("out-of-fold calibration skipped: the features of %d images need %.1f GB (limit %.1f GB); "
                    "calibrating on the validation split", len(index.train) + len(index.val), need / 1024**3,
                    FEATURE_CACHE_LIMIT / 1024**3)
        return False
    return True


def train(model: AnomalyModel, index: DatasetIndex, cfg: dict, ctx: DistContext = SINGLE) -> dict[str, Any] | None:
    """Train/fit, calibrate, save best_model/; writes train.log, config.yaml and train_result.json.

    With several processes every rank trains; rank 0 alone calibrates and writes; others return None."""
    out = cfg["Global"]["output"]
    setup_logging(out, ctx.is_main)
    if not index.train:
        raise UadkitError(f"Global.dataset_dir '{index.root}': no good training images found")
    seed_everything(cfg["Global"]["seed"])
    device = ctx.device if ctx.active else main_device(cfg["Global"]["device"])
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    log.info("%s on %s (%s): %d train, %d val, %d test images; device %s%s", model.name, index.root, index.type,
             len(index.train), len(index.val), len(index.test), device,
             f" x {ctx.world} processes" if ctx.active else "")
    for note in index.notes:
        log.info(note)
    c = cfg["Train"]["calibration"]
    # One-pass models calibrate on out-of-fold scores of every good image, so the validation goods join the
    # fit (the final model sees all of them); labelled validation anomalies still only report recall.
    # Out-of-fold scores come from the model's own rule on fitted samples, which with tiling are tiles (not
    # images) and ignore the region of interest: then the validation split is scored by the one path instead.
    whole = not model.cfg.get("tiling") and model.cfg.get("roi") is None
    oof = not model.trainable and c["out_of_fold"] and whole and _features_fit_in_cache(model, index, device)
    fit_samples = index.train + ([s for s in index.val if not s.label] if oof else [])
    t0 = time.time()
    feats = None
    if model.trainable:
        with synced_batchnorm(model, ctx):  # N processes normalise as one would
            info = train_gradient(model, index, cfg, out, device, ctx)
    else:
        with full_fp32(device):  # a fit pass extracts features as scoring will
            info, feats = fit_distributed(model, fit_samples, cfg["Train"]["batch_size"], device, ctx,
                                          keep_features=oof)
    fit_s = time.time() - t0
    if not ctx.is_main:
        return None
    with full_fp32(device):  # calibration scores as prediction will (out-of-fold scores do not pass score_images)
        return _calibrate_and_save(model, index, cfg, device, info, feats, oof, fit_samples, fit_s)


def _calibrate_and_save(model: AnomalyModel, index: DatasetIndex, cfg: dict, device: torch.device, info: dict,
                        feats: list[torch.Tensor] | None, oof: bool, fit_samples: list[Sample],
                        fit_s: float) -> dict[str, Any]:
    """Calibrate the fitted model, save best_model/ and write the run records (rank 0)."""
    out = cfg["Global"]["output"]
    c = cfg["Train"]["calibration"]
    t1 = time.time()
    # position-tied models: are the parts where their statistics expect them? (None for other models)
    alignment = check_alignment([s.path for s in index.train], model)
    if oof:
        # scoring is the cost (PatchCore: a full search per image), so at most `out_of_fold_images`,
        # spread evenly over the fitted images
        n_fit, cap = len(fit_samples), c["out_of_fold_images"]
        scored = np.unique(np.linspace(0, n_fit - 1, min(n_fit, cap)).round().astype(int))
        good_s, good_m, good_maps = model.out_of_fold_scores(feats, image_loader(fit_samples, model),
                                                             scored=scored, grid=GRID)
        if feats is not None:
            feats.clear()  # the cached features (up to FEATURE_CACHE_LIMIT), also the caller's reference to them
        bad = [s for s in index.val if s.label]
        bad_s = collect_scores(model, bad, device, cfg["Evaluate"]["batch_size"], "calibrating")[0] if bad else None
        cal = calibrate_model(model, cfg, device, good_s, good_m, bad_s, "out_of_fold",
                              [fit_samples[i] for i in scored])
        map_check = check_good_maps(list(good_maps), model, "out-of-fold maps of the fitted good images",
                                    alignment)
    else:
        cal_samples = index.val or index.train
        if not index.val:
            log.warning("no validation images: calibrating on the training images (thresholds will be optimistic)")
        cal, val_maps = calibrate_on_samples(model, cal_samples, cfg, device, "validation" if index.val else "training")
        # The check needs maps of good images the model did not learn from, and whole maps (Model.roi zeroes
        # the outside, a pattern every image shares)
        if not index.val:
            map_check = check_good_maps(None, model, "no validation images (training images score in-sample)",
                                        alignment)
        elif model.cfg.get("roi") is not None:
            map_check = check_good_maps(None, model, "Model.roi is set (maps are zero outside the region)",
                                        alignment)
        else:
            map_check = check_good_maps(val_maps, model, "the validation split", alignment)
    cal_s = time.time() - t1
    # weights, model.yaml and the exported artefacts are swapped in together: never a graph of another model
    best_dir = save_model_dir(model, os.path.join(out, "best_model"),
                              extra={"trained_on": os.path.abspath(index.root),
                                     "calibration_info": {k: v for k, v in cal.items() if k != "scores"}},
                              export_opset=cfg["Export"]["opset"] if cfg["Train"]["export"] else None)
    exported = os.path.join(best_dir, "inference") if cfg["Train"]["export"] else None
    model.to(device)
    result = {
        "done_flag": True,
        "model": model.name,
        "dataset": {"root": os.path.abspath(index.root), "type": index.type, "train": len(index.train),
                    "val": len(index.val), "test": len(index.test)},
        "fit_seconds": round(fit_s, 2),
        "calibration_seconds": round(cal_s, 2),
        "machine": machine_info(device),
        "calibration": cal,
        "map_check": map_check,
        "summary": model.summary(),
        "train": info,
        "models": {"best_model": best_dir, "inference": exported,
                   "last": os.path.abspath(os.path.join(out, "checkpoints", "last")) if model.trainable else None},
        "config": os.path.abspath(os.path.join(out, "config.yaml")),
        "log": os.path.abspath(os.path.join(out, "train.log")),
    }
    write_run_records(out, cfg, result)
    log.info("done in %.1f s; best model: %s", fit_s, best_dir)
    return result
