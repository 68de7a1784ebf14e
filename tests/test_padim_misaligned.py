"""PaDiM on dark parts that sit a little differently in every image (issue 15), and the good-map check.

The data: make_part_dataset, a dark perforated part on a dark noisy background, shifted by up to 4 % and
turned by up to 3 degrees, with small cuts / scratches / rust spots; 40 training images at 128 px, fewer than
PaDiM's 100 feature dims. Most models here are fitted directly (features -> fit -> score_images), without the
training engine's calibration; the `test_training_*` tests run the real training (CLI) and read the check
from train_result.json and train.log.
"""

import json
import os
import re

import numpy as np
import pytest
import torch

from uadkit import create_model, metrics
from uadkit.cli import main
from uadkit.data.demo import make_part_dataset
from uadkit.data.formats import DatasetIndex, load_index
from uadkit.data.image_io import load_image, load_mask, prepare_image
from uadkit.engine.map_check import MIN_IMAGES, SHARED_POSITION_TIED, SHIFT_MAX, STRUCTURE_MIN, good_map_report
from uadkit.errors import UadkitError
from uadkit.inference.predictor import score_images
from uadkit.models import AnomalyModel
from uadkit.models.padim import oas_shrink

# The stated bar, seed 0 (measured: old fixed 0.01 * I floor 0.909, Model.covariance=oas 0.964; seeds 1-3:
# fixed 0.956 / 0.969 / 0.945, oas 0.972 / 0.977 / 0.970).
PIXEL_AUROC_BAR = 0.94
CPU = torch.device("cpu")


def _data(root, shift: float, rotate: float) -> str:
    return make_part_dataset(root, n_train=40, n_test_good=8, n_test_defect=6, n_val=12, shift=shift,
                             rotate=rotate, seed=0)


def _fit(dataset: str, **model_cfg) -> tuple[AnomalyModel, DatasetIndex]:
    model = create_model("PaDiM", input_size=[128, 128], **model_cfg).model.eval()
    index = load_index(dataset)
    batches = (torch.from_numpy(np.stack([prepare_image(load_image(s.path), model.input_size)
                                          for s in index.train[i:i + 8]])) for i in range(0, len(index.train), 8))
    with torch.no_grad():
        model.fit(model.features(x) for x in batches)
    return model, index


def _val_maps(model: AnomalyModel, index: DatasetIndex) -> list[np.ndarray]:
    """Raw maps of the held-out good validation images at their own size."""
    return [s.raw_map for s in score_images(model, [load_image(s.path) for s in index.val], CPU)]


def _pixel_auroc(model: AnomalyModel, index: DatasetIndex) -> float:
    images = [load_image(s.path) for s in index.test]
    maps = [s.raw_map for s in score_images(model, images, CPU)]
    masks = [load_mask(s.mask, im.shape[:2]) if s.mask else np.zeros(im.shape[:2], bool)
             for s, im in zip(index.test, images)]
    return metrics.auroc(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory) -> str:
    return _data(tmp_path_factory.mktemp("parts_mis"), 0.04, 3.0)


@pytest.fixture(scope="module")
def padim_oas(misaligned):
    return _fit(misaligned, covariance="oas")


@pytest.fixture(scope="module")
def padim_fixed(misaligned):
    return _fit(misaligned, covariance="fixed")


def test_padim_oas_finds_small_defects_on_misaligned_dark_parts(padim_oas):
    assert _pixel_auroc(*padim_oas) >= PIXEL_AUROC_BAR


def test_fixed_covariance_floor_misses_them(padim_fixed):
    """The default (the paper's 0.01 * I floor) on the same data: below the bar."""
    assert _pixel_auroc(*padim_fixed) < PIXEL_AUROC_BAR


@pytest.mark.parametrize("which", ["padim_oas", "padim_fixed"])
def test_map_check_warns_on_misaligned_parts_with_padim(which, request):
    rep = good_map_report(_val_maps(*request.getfixturevalue(which)), position_tied=True, model_name="PaDiM")
    assert rep["images"] == 12 and len(rep["warnings"]) == 1, rep
    assert "PatchCore" in rep["warnings"][0] and "aligned" in rep["warnings"][0]


def _train(dataset: str, out, model: str, *opts: str) -> tuple[dict, str]:
    """A real training run (CLI) at 128 px; returns train_result.json's map_check and train.log."""
    assert main(["-c", f"configs/{model}.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={dataset}",
                 "-o", f"Global.output={out}", "-o", "Model.input_size=[128,128]", "-o", "Train.export=false",
                 "-o", "Train.calibration.synthetic_images=0", *[x for o in opts for x in ("-o", o)]]) == 0
    result = json.load(open(os.path.join(out, "train_result.json")))
    return result["map_check"], open(os.path.join(out, "train.log")).read()


def _warning_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING map check warns: " in line]


# Two checks meet here. The training images' alignment (phase of their cross-correlation with the median
# image) warns for PaDiM whatever its covariance. The shared pattern of held-out maps warns with
# Model.covariance=oas (misaligned 0.19, aligned -0.01); with the default fixed floor and 52 images (< 100 dims)
# the floor's own bias is a shared pattern on aligned parts too (0.49 aligned, 0.36 misaligned), which the
# alignment figures then turn into a note (add images / try oas), not a misalignment warning.
@pytest.mark.parametrize("covariance,out_of_fold", [("fixed", True), ("oas", True), ("oas", False)])
def test_training_warns_on_misaligned_parts_with_padim(misaligned, tmp_path, covariance, out_of_fold):
    """One-pass training checks the out-of-fold maps of every fitted good image (52), or without out-of-fold
    calibration the validation split's maps (12), and the training images' alignment; train_result.json and
    train.log carry the warnings."""
    rep, log = _train(misaligned, tmp_path, "PaDiM", f"Model.covariance={covariance}",
                      f"Train.calibration.out_of_fold={str(out_of_fold).lower()}")
    assert rep["source"] == ("out-of-fold maps of the fitted good images" if out_of_fold else "the validation split")
    assert rep["images"] == (52 if out_of_fold else 12)
    align = rep["alignment"]
    assert align["images"] == 40 and align["shift_p90"] >= SHIFT_MAX and align["structure"] >= STRUCTURE_MIN
    not_aligned = [w for w in rep["warnings"] if "training images are not aligned" in w]
    assert len(not_aligned) == 1 and "PaDiM" in not_aligned[0] and "PatchCore" in not_aligned[0], rep
    if covariance == "oas":  # and its maps share the pattern the movement leaves
        assert rep["shared_variance"] >= SHARED_POSITION_TIED and len(rep["warnings"]) == 2, rep
    lines = _warning_lines(log)
    assert len(lines) == len(rep["warnings"]) and all("PaDiM" in line and "PatchCore" in line for line in lines)
    assert "map check (PaDiM" in log and "shared_variance" in log and "alignment check (PaDiM" in log


@pytest.mark.parametrize("covariance", ["fixed", "oas"])
def test_training_silent_on_aligned_parts_with_padim(tmp_path, covariance):
    rep, log = _train(_data(tmp_path / "data", 0.0, 0.0), tmp_path / "out", "PaDiM", f"Model.covariance={covariance}")
    assert rep["images"] == 52 and rep["warnings"] == [] and rep["alignment"]["shift_p90"] == 0, rep
    assert _warning_lines(log) == [] and "map check (PaDiM" in log
    if covariance == "oas":
        assert rep["shared_variance"] < SHARED_POSITION_TIED / 2, rep
    else:  # the floor's pattern with fewer images than dims: said, as a note
        assert rep["shared_variance"] >= SHARED_POSITION_TIED and "too few images" in rep["note"], rep


def test_part_alignment_figures_on_generated_data(tmp_path):
    """Shifts against the median image: 0 on aligned parts, above SHIFT_MAX on parts moved by up to 4 %; a
    texture has no structure to align (its "shifts" are noise, never warned)."""
    from uadkit.data.demo import make_demo_dataset
    from uadkit.data.image_io import list_images
    from uadkit.engine.map_check import alignment_warning, part_alignment

    def figures(root):
        return part_alignment([load_image(p) for p in list_images(os.path.join(root, "train", "good"))])

    aligned = figures(make_part_dataset(tmp_path / "a", n_train=16, n_test_good=0, n_test_defect=0, shift=0,
                                        rotate=0))
    moved = figures(make_part_dataset(tmp_path / "m", n_train=16, n_test_good=0, n_test_defect=0))
    fabric = figures(make_demo_dataset(tmp_path / "f", n_train=16, n_test_good=0, n_test_defect=0, size=128))
    assert aligned["shift_p90"] == 0 and aligned["structure"] >= STRUCTURE_MIN
    assert moved["shift_p90"] >= SHIFT_MAX and moved["structure"] >= STRUCTURE_MIN
    assert fabric["structure"] < STRUCTURE_MIN
    assert alignment_warning(aligned, "PaDiM") is None and alignment_warning(fabric, "PaDiM") is None
    assert "not aligned" in alignment_warning(moved, "PaDiM")
    assert part_alignment([load_image(p) for p in list_images(os.path.join(tmp_path, "a", "train", "good"))][:3]
                          )["shift_p90"] is None  # too few images: no figures


def test_training_silent_on_misaligned_parts_with_patchcore(misaligned, tmp_path):
    """PatchCore compares patches wherever they are: the same data, no warning (a shared pattern is normal
    for a position-free model and is reported, not warned about)."""
    rep, log = _train(misaligned, tmp_path, "PatchCore")
    assert rep["images"] == 52 and rep["shared_variance"] is not None and rep["warnings"] == [], rep
    assert _warning_lines(log) == []


def test_training_checks_validation_maps_of_gradient_models(tmp_path):
    """Gradient-trained models are checked on the validation split's maps (one epoch at 64 px: the wiring)."""
    from uadkit.data.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "d", n_train=6, n_test_good=1, n_test_defect=1, size=64, n_val=MIN_IMAGES)
    rep, _ = _train(demo, tmp_path / "out", "STFPM", "Train.epochs_iters=1", "Model.input_size=[64,64]")
    assert rep["source"] == "the validation split" and rep["images"] == MIN_IMAGES
    assert rep["border_excess"] is not None and isinstance(rep["warnings"], list)


def test_training_without_held_out_maps_says_so(tmp_path):
    """No validation images: a gradient model's maps of its own training images would be in-sample, so there
    is no check, and train_result.json says why; under MIN_IMAGES maps there are figures but no warnings."""
    from uadkit.data.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "d", n_train=6, n_test_good=1, n_test_defect=1, size=64)
    rep, _ = _train(demo, tmp_path / "stfpm", "STFPM", "Train.epochs_iters=1", "Model.input_size=[64,64]",
                    "Train.val_split=0")
    assert rep["images"] == 0 and rep["source"] is None and "no validation images" in rep["note"]
    rep, _ = _train(demo, tmp_path / "padim", "PaDiM", "Model.input_size=[64,64]", "Train.val_split=0")
    assert rep["images"] == 6 and rep["shared_variance"] is not None and rep["warnings"] == []
    assert "no warnings" in rep["note"]


def test_map_check_silent_on_fabric_demo_with_default_padim(tmp_path):
    """Aligned by nature, and more images than dims: the default fixed floor fits (with 24 images it does not:
    shared_variance 0.48, warned, the same floor bias as on the parts)."""
    from uadkit.data.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path, n_train=120, n_test_good=0, n_test_defect=1, size=128, n_val=12)
    rep = good_map_report(_val_maps(*_fit(demo)), position_tied=True)
    assert rep["images"] == 12 and rep["warnings"] == [], rep


def test_map_check_needs_enough_images_and_2d_maps():
    g = np.random.default_rng(0)
    same = g.random((40, 40))
    rep = good_map_report([same + 0.01 * g.random((40, 40)) for _ in range(MIN_IMAGES - 1)], position_tied=True)
    assert rep["shared_variance"] > 0.9 and rep["warnings"] == []  # measured, but too few images to warn
    assert good_map_report([np.ones((8, 8))] * 10)["images"] == 0  # constant maps carry no pattern
    with pytest.raises(ValueError, match="2-D"):
        good_map_report([np.zeros(5)])


def test_oas_shrink_matches_scikit_learn():
    from sklearn.covariance import OAS

    g = np.random.default_rng(0)
    for n, d in ((10, 30), (300, 100)):
        x = g.normal(size=(n, d)) @ g.normal(size=(d, d))
        emp = torch.from_numpy(np.cov(x.T, bias=True))[None].clone()
        assert np.allclose(oas_shrink(emp, n)[0].numpy(), OAS().fit(x).covariance_, rtol=1e-10, atol=1e-10)


def test_bad_covariance_setting():
    with pytest.raises(UadkitError, match="Model.covariance"):
        _ = create_model("PaDiM", covariance="ledoit").model


def test_map_check_position_free_model_warns_only_on_a_fixed_hot_spot(tmp_path):
    """PatchCore on the fabric: silent on plain good images; when every validation image carries the same
    foreign mark (a label stuck at one place) the one-region warning fires and names where it is; with marks
    at two far-apart places it does not warn with a box that covers the image (figures only)."""
    from uadkit.data.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path, n_train=16, n_test_good=0, n_test_defect=1, size=128, n_val=12)
    det = create_model("PatchCore", input_size=[128, 128])
    model = det.model.eval()
    index = load_index(demo)
    with torch.no_grad():
        model.fit(model.features(torch.from_numpy(np.stack(
            [prepare_image(load_image(s.path), model.input_size) for s in index.train[i:i + 8]])))
            for i in range(0, len(index.train), 8))
    plain = good_map_report(_val_maps(model, index), model_name="PatchCore")
    assert plain["warnings"] == [], plain
    marked = []
    for s in index.val:
        im = load_image(s.path).copy()
        im[90:104, 16:30] = (20, 120, 220)  # x 0.12-0.23, y 0.70-0.81 of the image
        marked.append(im)
    rep = good_map_report([r.raw_map for r in score_images(model, marked, CPU)], model_name="PatchCore")
    assert len(rep["warnings"]) == 1 and "one region" in rep["warnings"][0], rep
    x0, y0, x1, y1 = rep["hot_region"]
    assert x0 < 0.23 and x1 > 0.12 and y0 < 0.81 and y1 > 0.70
    assert "PatchCore" not in rep["warnings"][0].split(":", 1)[1]  # no advice to use the model it is
    # the same marks at two far-apart places: the warning names the two regions, not one box around
    # (nearly) the whole image
    for im in marked:
        im[8:22, 100:114] = (20, 120, 220)  # x 0.78-0.89, y 0.06-0.17
    rep = good_map_report([r.raw_map for r in score_images(model, marked, CPU)], model_name="PatchCore")
    x0, y0, x1, y1 = rep["hot_region"]
    assert (x1 - x0) * (y1 - y0) > 0.25, rep
    assert len(rep["warnings"]) == 1 and "2 regions" in rep["warnings"][0], rep
    boxes = [tuple(map(float, b)) for b in re.findall(r"x ([\d.]+)-([\d.]+), y ([\d.]+)-([\d.]+)", rep["warnings"][0])]
    for mx0, mx1, my0, my1 in ((0.12, 0.23, 0.70, 0.81), (0.78, 0.89, 0.06, 0.17)):  # each mark has its box
        assert any(bx0 < mx1 and bx1 > mx0 and by0 < my1 and by1 > my0 for bx0, bx1, by0, by1 in boxes), boxes
