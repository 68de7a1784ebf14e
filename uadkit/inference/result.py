"""Result objects: what one prediction says, printable, drawable and saveable (PaddleX-style API).

JSON layout (`save_to_json` / `.json`): scalars as values; `pred_mask` as run-length encoding
{"size": [h, w], "counts": [...]} over the row-major flattened mask, starting with a run of zeros;
`anomaly_map` (normalised, original image size) as a float16 `.npy` file beside the JSON, referenced by
name. `decode_rle` turns the mask back into an array.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.image_io import atomic_path, save_image_atomic, write_text_atomic
from ..visualize import overlay


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.astype(bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE: counts must be non-negative and sum to {h}x{w} = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(h, w).astype(np.uint8)


class AnomalyResult(dict):
    """One image's prediction. Keys: input_path, pred_score, pred_label, threshold, raw_score,
    anomaly_map (float32 HxW in [0, 1], original size), pred_mask (uint8 HxW, 1 = defect)."""

    def __init__(self, image: np.ndarray | None = None, stem: str | None = None, **fields: Any) -> None:
        super().__init__(**fields)
        self._image = image
        self._stem = stem

    @property
    def stem(self) -> str:
        """Base name of saved files: unique among the results of one predict call."""
        return self._stem or Path(str(self["input_path"])).stem or "image"

    def _scalars(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if k not in ("anomaly_map", "pred_mask")}

    def _summary(self) -> dict[str, Any]:
        out = self._scalars()
        m, a = self["pred_mask"], self["anomaly_map"]
        out["anomaly_map"] = {"shape": list(a.shape), "min": round(float(a.min()), 4),
                              "max": round(float(a.max()), 4), "mean": round(float(a.mean()), 4)}
        out["pred_mask"] = {"shape": list(m.shape), "defect_pixels": int(m.sum()),
                            "defect_fraction": round(float(m.mean()), 6)}
        return out

    @property
    def json(self) -> dict[str, Any]:
        out = self._scalars()
        out["pred_mask"] = encode_rle(self["pred_mask"])
        return {"res": out}

    def print(self, json_format: bool = False, indent: int = 2) -> None:
        s = self._summary()
        if json_format:
            print(json.dumps({"res": s}, indent=indent))
            return
        print(f"{s['input_path']}: {s['pred_label']}  score {s['pred_score']:.4f} (threshold {s['threshold']:.2f}, "
              f"raw {s['raw_score']:.5g})")
        a, m = s["anomaly_map"], s["pred_mask"]
        print(f"  anomaly_map {a['shape'][1]}x{a['shape'][0]}  min {a['min']:.3f}  max {a['max']:.3f}  "
              f"mean {a['mean']:.3f}")
        print(f"  pred_mask   {m['defect_pixels']} defect pixels ({100 * m['defect_fraction']:.2f}%)")

    def save_to_json(self, path: str | os.PathLike) -> str:
        """Write to `path` (a .json file, or a folder: <stem>_res.json inside it); returns the file."""
        path = str(path)
        if os.path.isdir(path) or path.endswith(os.sep) or not path.lower().endswith(".json"):
            path = os.path.join(path, f"{self.stem}_res.json")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        map_name = f"{Path(path).stem}_anomaly_map.npy"
        with atomic_path(os.path.join(folder, map_name)) as tmp, open(tmp, "wb") as f:
            np.save(f, self["anomaly_map"].astype(np.float16))
        data = self.json
        data["res"]["anomaly_map"] = {"file": map_name, "dtype": "float16", "shape": list(self["anomaly_map"].shape)}
        write_text_atomic(path, json.dumps(data, indent=2))
        return path

    def overlay_image(self):
        text = f"{self['pred_label']} {self['pred_score']:.3f}"
        return overlay(self._image, self["anomaly_map"], self["pred_mask"], text)

    def save_to_img(self, folder: str | os.PathLike) -> list[str]:
        """Write <stem>_overlay.png (heatmap + defect contour + score) and <stem>_mask.png (0/255)."""
        folder = str(folder)
        if self._image is None:
            raise ValueError("this result carries no image to draw on")
        ov = os.path.join(folder, f"{self.stem}_overlay.png")
        mk = os.path.join(folder, f"{self.stem}_mask.png")
        save_image_atomic(ov, self.overlay_image())
        save_image_atomic(mk, (self["pred_mask"] * 255).astype(np.uint8))
        return [ov, mk]
