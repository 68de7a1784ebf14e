"""Are the anomaly maps of good images dominated by fixed places? A check for every model.

Given the raw maps of held-out good images, it measures how much of their spatial variation is the same
in every image, and whether the image border or one small region holds it. Each map is first reduced to a
`GRID` x `GRID` grid and standardised (its own mean 0, spread 1), so the figures do not depend on the
model's units, the image size or an offset.

- `shared_variance`: the share of a map's spatial variance that every good image has in common (an intraclass
  correlation, corrected for the number of images: about 0 when the hot spots move from image to image).
  A per-position model (PaDiM) normalises every position by its own statistics, so on images like its
  training images it has nothing to share; a shared pattern means its Gaussians do not fit, typically because
  the parts are not aligned. Position-free models (PatchCore, STFPM) score parts of the object differently
  by content, so a shared pattern is normal for them and not warned about.
- `border_excess`: how far the border band lies above the rest, in units of a map's spread, averaged over the
  images (every model: a frame in every good image sets the thresholds, e.g. padding or vignetting).
- `hot_region_excess` with `hot_region`: the same for the hottest `HOT_AREA` of the mean map, each image
  measured in the region the other images pick (noise alone gives about 0); `hot_region` is the bounding box
  of that area (x0, y0, x1, y1 as fractions of the image), the whole image when nothing is concentrated. It
  is warned about, naming each part's box, only when the hot cells form at most `MAX_HOT_PARTS` connected
  parts each within `HOT_REGION_MAX_BOX` of the image: scattered hot cells are no region one could mask
  out (figures only).

The maps must be of good images the model was not fitted on (held out): a one-pass model fitted on them
scores them in-sample, which carries its own pattern (measured on aligned generated parts with PaDiM:
shared_variance 0.087 in-sample, a false warning, vs 0.020 held out). Training runs it on every model
(`check_good_maps`, engine/trainer.py): one-pass models on their out-of-fold maps, else on the validation
split; the report goes to train_result.json (`map_check`), each warning to train.log and the console.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

GRID = 64               # maps are compared on a GRID x GRID grid
BORDER = 1 / 16         # border band: this fraction of each side
HOT_AREA = 0.05         # the "small region": this fraction of the image
MIN_IMAGES = 8          # fewer good maps: figures only, no warnings (too noisy to tell)
# Thresholds measured on generated parts (data/demo.py make_part_dataset, 4 seeds x 16 good maps, 128 px):
# PaDiM shared_variance 0.09-0.27 with parts shifted/turned by up to 4 % / 3 degrees, -0.003-0.047 aligned.
SHARED_POSITION_TIED = 0.07
BORDER_EXCESS = 1.0
HOT_REGION_EXCESS = 2.0
# The hottest cells in a few compact parts can be masked (Model.roi); scattered over the image they cannot, and
# such patterns come from the model's own grid as well (EfficientAD on 64 px demo images: 2.7-2.9 spreads)
HOT_REGION_MAX_BOX = 0.25
MAX_HOT_PARTS = 3

log = logging.getLogger("uadkit")


def pool(amap: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) or (B, H, W) maps -> (B, GRID, GRID) float32 on the CPU: what the check keeps per image,
    so held-out maps of hundreds of images stay small (16 KB each)."""
    x = amap if amap.dim() == 4 else amap[:, None]
    return F.adaptive_avg_pool2d(x.float(), GRID)[:, 0].cpu().numpy()


def _grid(maps: Sequence[np.ndarray]) -> np.ndarray:
    """(N, GRID, GRID) standardised maps; constant maps (nothing to compare) are dropped."""
    out = []
    for m in maps:
        a = np.asarray(m, dtype=np.float32)
        if a.ndim == 3:  # (1, H, W) as a model returns it
            a = a[0]
        if a.ndim != 2:
            raise ValueError(f"good_map_report: expected 2-D maps, got shape {a.shape}")
        t = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(a))[None, None], GRID)[0, 0].double()
        sd = float(t.std())
        if sd > 0 and np.isfinite(sd):
            out.append(((t - t.mean()) / sd).numpy())
    return np.stack(out) if out else np.zeros((0, GRID, GRID))


def shared_share(z: np.ndarray) -> float:
    """The share of their variation that (N, ...) standardised fields have in common: each has variance 1 and
    the mean of N independent ones 1/N, so the excess over 1/N, scaled to [.., 1], is the shared part (1: every
    field is the same pattern; an intraclass correlation)."""
    n = len(z)
    return (float(z.mean(0).var()) - 1 / n) / (1 - 1 / n)


def _band(width: float) -> np.ndarray:
    k = max(1, round(GRID * width))
    band = np.zeros((GRID, GRID), bool)
    band[:k] = band[-k:] = True
    band[:, :k] = band[:, -k:] = True
    return band


def hot_boxes(hot: np.ndarray, k: int) -> list[list[float]]:
    """Boxes (x0, y0, x1, y1, fractions of the image) of the hot cells' connected parts, when they are a few
    (`MAX_HOT_PARTS`) compact ones (each box at most `HOT_REGION_MAX_BOX`) a Model.roi could mask; [] when the
    hot cells are scattered (specks under a tenth of the hot area are ignored)."""
    from scipy import ndimage

    labels, count = ndimage.label(hot)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        if (labels[sl] == i).sum() < 0.1 * k:
            continue
        box = [sl[1].start / GRID, sl[0].start / GRID, sl[1].stop / GRID, sl[0].stop / GRID]
        if (box[2] - box[0]) * (box[3] - box[1]) > HOT_REGION_MAX_BOX:
            return []
        boxes.append([round(v, 3) for v in box])
    return boxes if len(boxes) <= MAX_HOT_PARTS else []


def good_map_report(maps: Sequence[np.ndarray], position_tied: bool = False,
                    model_name: str = "the model") -> dict[str, Any]:
    """Figures on the raw anomaly maps of good images (any sizes) and warnings, one string each.

    `position_tied`: the model keeps statistics per map position (`AnomalyModel.position_tied`, PaDiM)."""
    z = _grid(maps)
    n = len(z)
    report: dict[str, Any] = {"images": n, "shared_variance": None, "border_excess": None,
                              "hot_region_excess": None, "hot_region": None, "warnings": []}
    if n < 2:
        return report
    mean = z.mean(0)
    shared = shared_share(z)
    band = _band(BORDER)
    border = float(np.mean([m[band].mean() - m[~band].mean() for m in z]))
    k = max(1, round(HOT_AREA * GRID * GRID))
    hot = np.zeros(GRID * GRID, bool)
    hot[np.argpartition(mean.ravel(), -k)[-k:]] = True
    hot = hot.reshape(GRID, GRID)
    # Leave-one-out: each image's excess in the region picked by the others, so noise alone scores about 0.
    loo = []
    for i in range(n):
        rest = (mean * n - z[i]) / (n - 1)
        sel = np.zeros(GRID * GRID, bool)
        sel[np.argpartition(rest.ravel(), -k)[-k:]] = True
        sel = sel.reshape(GRID, GRID)
        loo.append(z[i][sel].mean() - z[i][~sel].mean())
    hot_excess = float(np.mean(loo))
    ys, xs = np.nonzero(hot)
    region = [round(float(v) / GRID, 3) for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]
    report.update(shared_variance=round(shared, 4), border_excess=round(border, 3),
                  hot_region_excess=round(hot_excess, 3), hot_region=region)
    if n < MIN_IMAGES:
        report["note"] = (f"only {n} held-out good maps: figures only, no warnings (at least {MIN_IMAGES} are "
                          "needed to tell a pattern from noise)")
        return report
    warnings = report["warnings"]
    if position_tied and shared >= SHARED_POSITION_TIED:
        warnings.append(
            f"{model_name}: the anomaly maps of {n} held-out good images share a fixed pattern "
            f"({shared:.0%} of their variation; a per-position model should leave none): its per-position "
            "statistics do not fit these images. Typically the parts are not aligned from image to image "
            "(shifted or turned): use PatchCore (-c configs/PatchCore.yaml), which compares patches wherever "
            "they are. If they are aligned, a noisy background can outweigh the part with too few images: "
            "add training images, or with PaDiM try Model.covariance=oas.")
    alternative = " or use PatchCore" if position_tied else ""
    if border >= BORDER_EXCESS:
        warnings.append(
            f"{model_name}: the good images' anomaly maps are highest along the image border ({border:.1f} "
            f"spreads above the rest on average over {n} images), so the border sets the thresholds and "
            f"defects inside must outscore it: crop the border (Model.roi){alternative}.")
    boxes = hot_boxes(hot, k)
    if hot_excess >= HOT_REGION_EXCESS and boxes:
        where = "; ".join(f"x {x0:.2f}-{x1:.2f}, y {y0:.2f}-{y1:.2f}" for x0, y0, x1, y1 in boxes)
        what = "one region" if len(boxes) == 1 else f"{len(boxes)} regions"
        warnings.append(
            f"{model_name}: the good images' anomaly maps are highest in {what} ({where} of the image; "
            f"{hot_excess:.1f} spreads above the rest over {n} images), so it sets the thresholds: if it is "
            f"not part of what is inspected, mask it out (Model.roi){alternative}.")
    return report


def check_good_maps(maps: Sequence[np.ndarray] | None, model: Any, source: str,
                    alignment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report on a trained model's held-out good maps, for train_result.json; logs its figures, and each
    warning as a WARNING line (train.log and the console). `source` says where the maps come from;
    `maps=None` means there are none held out (the report says why nothing was checked). `alignment`
    (`check_alignment`, position-tied models) joins the report; when it measured the parts aligned, a shared
    pattern is the few-images effect, not a misfit of the part's position: reported as a note."""
    name = getattr(model, "name", "the model")
    if maps is None:
        log.info("map check (%s): skipped, %s", name, source)
        report = {"source": None, "images": 0, "warnings": [], "note": f"not checked: {source}"}
        if alignment is not None:
            report.update(alignment=alignment, warnings=list(alignment["warnings"]))
        return report
    report = {"source": source, **good_map_report(maps, bool(getattr(model, "position_tied", False)), name)}
    if alignment is not None:
        report["alignment"] = alignment
        if alignment_warning(alignment, name) is None and alignment["shift_p90"] is not None \
                and alignment["structure"] >= STRUCTURE_MIN:
            shared = [w for w in report["warnings"] if "share a fixed pattern" in w]
            report["warnings"] = [w for w in report["warnings"] if w not in shared]
            if shared:
                report["note"] = (f"{name}: the good maps share a fixed pattern (shared_variance "
                                  f"{report['shared_variance']}) though the parts are aligned (shift p90 "
                                  f"{alignment['shift_p90']:.1%}): too few images for its per-position statistics "
                                  "(fewer than its feature dims with Model.covariance=fixed). Add training images "
                                  "or try Model.covariance=oas.")
                log.info("map check note: %s", report["note"])
        report["warnings"] += alignment["warnings"]
    if report["shared_variance"] is None:
        report["note"] = f"only {report['images']} held-out good maps: nothing to compare"
    else:
        log.info("map check (%s, %d good maps from %s): shared_variance %.3f, border_excess %.2f, "
                 "hot_region_excess %.2f%s", name, report["images"], source, report["shared_variance"],
                 report["border_excess"], report["hot_region_excess"],
                 f"; {report['note']}" if report.get("note") else "")
    for w in report["warnings"]:
        log.warning("map check warns: %s", w)
    return report


# -- are the parts aligned? ------------------------------------------------------------------------------
# The good-map check above finds a misfit in the maps only while the per-position statistics are poorly
# estimated: with enough images (measured: 200 generated parts shifted by up to 4 %) PaDiM's Gaussians absorb
# the movement (shared_variance -0.002 shifted, -0.002 aligned) and defects where the part's edges move are
# "explained" by the widened spread. So position-tied models also get a direct test on the training images:
# how far each one is shifted against their median (cross-correlation of ALIGN_SIZE grey images).
ALIGN_SIZE = 128
ALIGN_IMAGES = 64
# Shifts only mean something where the images show one object: `structure` is the share of the standardised
# grey images' variation they have in common (an intraclass correlation, as `shared_variance`, so it does not
# drift with the number of images): generated parts 0.61-0.82, mvtec_screw 0.32, generated fabric -0.01.
STRUCTURE_MIN = 0.15
# Warn above this 90th-percentile shift, a fraction of the image side: half a stride-8 feature cell at 256 px.
# Measured p90: aligned generated parts 0.0, shifted by up to 1 % 0.011, by up to 4 % 0.039; mvtec_screw
# (screws turned and moved freely) 0.083.
SHIFT_MAX = 0.015


def _grey(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    g = np.asarray(Image.fromarray(image).convert("L").resize((ALIGN_SIZE, ALIGN_SIZE), Image.BILINEAR),
                   np.float64)
    g = g - g.mean()
    return g / (g.std() or 1.0)


def part_alignment(images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Shifts of RGB uint8 images against their median image (fractions of the image side) and the share of
    their variation the images have in common (`structure`); see the constants above."""
    if len(images) < MIN_IMAGES:
        return {"images": len(images), "shift_p90": None, "shift_max": None, "structure": None}
    grey = np.stack([_grey(im) for im in images])
    structure = shared_share(grey)
    median = np.median(grey, 0)
    window = np.outer(np.hanning(ALIGN_SIZE), np.hanning(ALIGN_SIZE))  # no wrap-around edge in the FFT
    ref = np.conj(np.fft.fft2(median * window))
    half = ALIGN_SIZE // 2
    shifts = []
    for g in grey:
        corr = np.fft.ifft2(np.fft.fft2(g * window) * ref).real
        y, x = np.unravel_index(int(np.argmax(corr)), corr.shape)
        shifts.append(float(np.hypot((y + half) % ALIGN_SIZE - half, (x + half) % ALIGN_SIZE - half)) / ALIGN_SIZE)
    return {"images": len(images), "shift_p90": round(float(np.percentile(shifts, 90)), 4),
            "shift_max": round(float(max(shifts)), 4), "structure": round(float(structure), 3)}


def alignment_warning(report: dict[str, Any], model_name: str) -> str | None:
    """A warning for a position-tied model when its training parts are measurably not aligned."""
    if report["shift_p90"] is None or report["structure"] < STRUCTURE_MIN or report["shift_p90"] < SHIFT_MAX:
        return None
    return (f"{model_name}: the training images are not aligned: 10% of them sit {report['shift_p90']:.1%} of the "
            f"image side or more away from the others (up to {report['shift_max']:.1%}); its per-position "
            "statistics widen to cover the movement, so defects where the part moves can go unseen. Align the "
            "images (fixture, crop), or use PatchCore (-c configs/PatchCore.yaml), which compares patches "
            "wherever they are.")


def check_alignment(paths: Sequence[str], model: Any) -> dict[str, Any] | None:
    """For a position-tied model: the alignment figures of up to ALIGN_IMAGES of its training images (spread
    over the list), with a warning when they move; None for other models (nothing to check)."""
    if not getattr(model, "position_tied", False) or not paths:
        return None
    from ..data.image_io import load_image

    step = max(1, len(paths) // ALIGN_IMAGES)
    report = part_alignment([load_image(p) for p in list(paths)[::step][:ALIGN_IMAGES]])
    log.info("alignment check (%s, %d training images): shift p90 %s, structure %s", model.name, report["images"],
             report["shift_p90"], report["structure"])
    warning = alignment_warning(report, model.name)
    report["warnings"] = [warning] if warning else []  # logged with the map check's warnings
    return report
