"""High-resolution inspection: tiling (Model.tiling) and regions of interest (Model.roi), through real models."""

import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from uadkit import create_model
from uadkit.cli import main
from uadkit.config import load_config
from uadkit.data.dataset import ImageDataset
from uadkit.data.demo import make_demo_dataset
from uadkit.data.formats import load_index
from uadkit.data.image_io import list_images, load_image, prepare_image
from uadkit.data.tiling import Stitcher, roi_mask, stitch, tile_boxes
from uadkit.errors import UadkitError
from uadkit.inference.predictor import score_images

TILING = {"tile_size": [96, 96], "stride": [64, 64]}  # 150 px images: 150 is not a multiple of 64
SIZE = 150


@pytest.fixture(scope="module")
def hires(tmp_path_factory) -> str:
    return make_demo_dataset(tmp_path_factory.mktemp("hires"), n_train=8, n_test_good=2, n_test_defect=2,
                             size=SIZE, n_val=6)


@pytest.fixture(scope="module")
def tiled(hires, tmp_path_factory):
    det = create_model("PatchCore", input_size=[64, 64], tiling=TILING)
    det.train(dataset_dir=hires, output=str(tmp_path_factory.mktemp("tiled")))
    return det


# -- geometry ----------------------------------------------------------------------------------------------
def test_tiles_cover_an_image_that_is_not_a_multiple_of_the_stride_to_its_edges():
    boxes = tile_boxes((150, 205), TILING)
    covered = np.zeros((150, 205), int)
    for y0, x0, y1, x1 in boxes:
        assert (y1 - y0, x1 - x0) == (96, 96) and y0 >= 0 and x0 >= 0 and y1 <= 150 and x1 <= 205
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert sorted({b[0] for b in boxes}) == [0, 54] and sorted({b[1] for b in boxes}) == [0, 64, 109]


def test_stitching_is_exact_and_overlaps_average():
    boxes = tile_boxes((150, 205), TILING)
    const = stitch((150, 205), boxes, [np.full((96, 96), 0.37, np.float32) for _ in boxes])
    assert np.allclose(const, 0.37, atol=1e-7)
    s = Stitcher((4, 6))
    s.add((0, 0, 4, 4), np.full((4, 4), 1.0, np.float32))
    s.add((0, 2, 4, 6), np.full((4, 4), 3.0, np.float32))
    out = s.result()
    assert np.allclose(out[:, :2], 1) and np.allclose(out[:, 2:4], 2) and np.allclose(out[:, 4:], 3)


def test_training_sees_every_tile_of_each_good_image(hires):
    train = load_index(hires, 0.0, 0).train
    ds = ImageDataset(train, (64, 64), TILING)
    assert len(ds) == len(train) * 4 and ds[5][0].shape == (3, 64, 64)
    y0, x0, y1, x1 = ds.items[3][1]
    tile = load_image(train[0].path)[y0:y1, x0:x1]
    assert (y0, x0) == (54, 54)
    assert np.allclose(ds[3][0].numpy(), prepare_image(tile, (64, 64)), atol=1e-6)


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, key", [
    ("{tile_size: [96, 96], stride: [0, 64]}", "Model.tiling.stride"),
    ("{tile_size: [96, 96], stride: [128, 64]}", "Model.tiling.stride"),
    ("{tile_size: [96], stride: [64, 64]}", "Model.tiling.tile_size"),
    ("{tile: [96, 96]}", "Model.tiling"),
])
def test_bad_tiling_keys_are_one_line_errors(value, key):
    with pytest.raises(UadkitError) as e:
        load_config("configs/PatchCore.yaml", [f"Model.tiling={value}"])
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_padim_with_tiling_is_a_config_error():
    with pytest.raises(UadkitError, match="'Model.tiling': PaDiM keeps statistics per position"):
        load_config("configs/PaDiM.yaml", ["Model.tiling={tile_size: [96, 96], stride: [96, 96]}"])


def test_cli_bad_tiling_exits_2(capsys):
    assert main(["-c", "configs/PatchCore.yaml", "-o", "Model.tiling={tile_size: [96, 96], stride: [0, 0]}"]) == 2
    assert "Model.tiling.stride" in capsys.readouterr().err


def test_tile_larger_than_the_image_fails_that_image_only(tiled, hires, tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((80, 200, 3), np.uint8)).save(small)
    model = create_model(model_dir=tiled.model_dir, run_mode="torch")
    with pytest.raises(UadkitError, match=r"'Model.tiling.tile_size': the tile 96x96 .* larger than the image 80x200"):
        list(model.predict(str(small)))
    good = os.path.join(hires, "test", "good", "000.png")
    assert [r["input_path"] for r in model.predict([str(small), good])] == [good]


# -- a tiled model end to end ------------------------------------------------------------------------------
def test_tiled_model_saves_loads_and_exports_with_equal_results(tiled, hires):
    meta = yaml.safe_load(open(os.path.join(tiled.model_dir, "model.yaml")))
    info = yaml.safe_load(open(os.path.join(tiled.model_dir, "inference", "inference.yml")))
    assert meta["Model"]["tiling"] == TILING and info["Model"]["tiling"] == TILING
    runs = {m: list(create_model(model_dir=tiled.model_dir, run_mode=m).predict(os.path.join(hires, "test"),
                                                                               batch_size=2))
            for m in ("torch", "onnxruntime", "openvino")}
    ref = runs["torch"]
    assert ref[0]["anomaly_map"].shape == (SIZE, SIZE)
    for m, res in runs.items():
        assert [r["input_path"] for r in res] == [r["input_path"] for r in ref]
        assert np.allclose([r["pred_score"] for r in res], [r["pred_score"] for r in ref], atol=1e-4), m
        assert max(np.abs(a["anomaly_map"] - b["anomaly_map"]).max() for a, b in zip(res, ref)) < 1e-3, m
    # defects outscore good images: the stitched maps still find them
    good = [r["pred_score"] for r in ref if "good" in r["input_path"]]
    bad = [r["pred_score"] for r in ref if "good" not in r["input_path"]]
    assert min(bad) > max(good)


# -- regions of interest -----------------------------------------------------------------------------------
def test_roi_mask_from_rectangles_clips_to_the_image():
    m = roi_mask([[10, 5, 30, 20], [140, 140, 400, 400]], (150, 150))
    assert m[5:20, 10:30].all() and m[140:, 140:].all() and m.sum() == 15 * 20 + 100


def test_roi_zeroes_the_map_outside_and_nothing_outside_flags(hires, tmp_path):
    roi = np.zeros((SIZE, SIZE), np.uint8)
    roi[:, : SIZE // 2] = 255  # inspect the left half only
    Image.fromarray(roi).save(tmp_path / "roi.png")
    det = create_model("PatchCore", input_size=[64, 64], roi=str(tmp_path / "roi.png"))
    det.train(dataset_dir=hires, output=str(tmp_path / "out"))
    meta = yaml.safe_load(open(os.path.join(det.model_dir, "model.yaml")))
    assert set(meta["Model"]["roi"]) == {"size", "counts"}  # stored as its RLE: the mask file is not needed later
    os.remove(tmp_path / "roi.png")

    good = load_image(os.path.join(hires, "test", "good", "000.png"))
    outside, inside = good.copy(), good.copy()
    outside[60:90, 100:130] = (20, 200, 40)  # a loud green patch in the right half
    inside[60:90, 20:50] = (20, 200, 40)
    for run_mode in ("torch", "onnxruntime"):
        model = create_model(model_dir=det.model_dir, run_mode=run_mode)
        r_good, r_out, r_in = model.predict([good, outside, inside])
        # outside the region is blanked before the model: the patch there changes nothing at all
        assert r_out["pred_score"] == r_good["pred_score"]
        assert np.array_equal(r_out["anomaly_map"], r_good["anomaly_map"])
        assert r_in["pred_label"] == "anomalous" and r_in["pred_score"] > r_good["pred_score"], run_mode
        for r in (r_good, r_out, r_in):
            assert not r["anomaly_map"][:, SIZE // 2:].any() and not r["pred_mask"][:, SIZE // 2:].any()
        assert r_in["pred_mask"][60:90, 20:50].any()


@pytest.mark.parametrize("tiling", [None, TILING])
def test_roi_keeps_the_models_top_k_image_score(hires, tmp_path, tiling):
    """A model whose image score is a top-k mean (Model.image_topk) keeps that rule inside a region: a region
    covering the whole image gives the same scores as no region (the maximum would be higher); in a smaller
    region k still counts the image's (or a tile's) pixels; models saved before the rule keep the maximum."""
    # PaddleX's mean loss and student: after one epoch its map's maximum stands clear of the top-k mean (the
    # precondition below); the hard loss's or the slimmer student's first epoch leaves a flatter map (0.454
    # against 1.04 x 0.444), and what is tested here is the region rule
    det = create_model("STFPM", input_size=[64, 64], image_topk=0.05, hard_quantile=0.0, student_inner=1.0,
                       shared_blocks=0, epochs_iters=1, batch_size=8, tiling=tiling,
                       **{"Train.export": False, "Train.calibration.synthetic_images": 0})
    det.train(dataset_dir=hires, output=str(tmp_path))
    model = det.model.eval()
    images = [load_image(p) for p in list_images(os.path.join(hires, "test"))]
    plain = score_images(model, images, torch.device("cpu"))
    model.cfg["roi"] = [[0, 0, SIZE, SIZE]]
    whole = score_images(model, images, torch.device("cpu"))
    for p, w in zip(plain, whole):
        if not tiling:  # tiled, a region scores the stitched map (overlaps averaged), not each tile's own
            assert p.raw_map.max() > p.raw_score * 1.04  # so the maximum would not pass (rel 0.03 below)
            assert w.raw_score == pytest.approx(p.raw_score, rel=0.03)  # the map at image size vs at 64 px
            assert w.norm_score == pytest.approx(p.norm_score, abs=0.03)
    model.cfg["roi"] = [[0, 0, SIZE // 2, SIZE]]  # the left half
    area = 96 * 96 if tiling else SIZE * SIZE
    for h in score_images(model, images, torch.device("cpu")):
        inside = h.raw_map[:, : SIZE // 2].ravel()
        assert h.raw_score == pytest.approx(np.sort(inside)[-round(0.05 * area):].mean(), rel=1e-5)
    model.cfg["roi_score"] = "max"  # what a model saved before Model.roi_score was calibrated with
    for h in score_images(model, images, torch.device("cpu")):
        assert h.raw_score == pytest.approx(float(h.raw_map[:, : SIZE // 2].max()), rel=1e-6)
    del model.cfg["roi_score"]  # a saved model without the key
    assert [h.raw_score for h in score_images(model, images, torch.device("cpu"))] == pytest.approx(
        [float(h.raw_map[:, : SIZE // 2].max()) for h in score_images(model, images, torch.device("cpu"))])


# -- check_dataset -----------------------------------------------------------------------------------------
def test_check_dataset_reports_sizes_and_warns_of_defects_too_small_at_input_size(hires, tmp_path, capsys):
    from uadkit.data.check import defect_sizes

    index = load_index(hires, 0.0, 0)
    plain = defect_sizes(index, {"input_size": [32, 32], "tiling": None})
    tiles = defect_sizes(index, {"input_size": [32, 32], "tiling": {"tile_size": [48, 48], "stride": [48, 48]}})
    assert plain["defects"] == tiles["defects"] > 0 and plain["below_4px"] > 0 and "warning" in plain
    assert tiles["median"] == pytest.approx(plain["median"] * SIZE / 48, rel=1e-3)  # tiles keep them larger
    assert tiles["below_4px"] < plain["below_4px"]
    tiny = defect_sizes(index, {"input_size": [8, 8], "tiling": {"tile_size": [48, 48], "stride": [48, 48]}})
    assert "use smaller Model.tiling tiles" in tiny["warning"]  # already tiled: the hint says what is left
    rc = main(["-c", "configs/PatchCore.yaml", "-o", "Global.mode=check_dataset", "-o", f"Global.dataset_dir={hires}",
               "-o", f"Global.output={tmp_path}", "-o", "Model.input_size=[32,32]"])
    out = capsys.readouterr().out
    assert rc == 0 and f"image sizes: {SIZE}x{SIZE} to {SIZE}x{SIZE}" in out and "use Model.tiling" in out


def test_tiled_stfpm_trains_saves_loads_exports_and_onnx_equals_torch(hires, tmp_path):
    det = create_model("STFPM", input_size=[64, 64], tiling=TILING, epochs_iters=1, batch_size=8,
                       **{"Train.export": False, "Train.calibration.synthetic_images": 0})
    det.train(dataset_dir=hires, output=str(tmp_path))
    assert not os.path.exists(os.path.join(det.model_dir, "inference"))
    loaded = create_model(model_dir=det.model_dir, run_mode="torch")
    assert loaded.model.cfg["tiling"] == TILING
    loaded.export()
    info = yaml.safe_load(open(os.path.join(det.model_dir, "inference", "inference.yml")))
    assert info["Model"]["tiling"] == TILING
    # one image that is not a multiple of the stride either way: edge-aligned tiles on both axes
    image = load_image(os.path.join(hires, "test", "scratch", "000.png"))
    image = np.concatenate([image, image[:, :55]], 1)  # 150 x 205
    [ref] = loaded.predict(image)
    [onnx] = create_model(model_dir=det.model_dir, run_mode="onnxruntime").predict(image)
    assert ref["anomaly_map"].shape == onnx["anomaly_map"].shape == (150, 205)
    assert onnx["pred_score"] == pytest.approx(ref["pred_score"], abs=1e-4)
    assert np.abs(onnx["anomaly_map"] - ref["anomaly_map"]).max() < 1e-3
    assert onnx["pred_label"] == ref["pred_label"]


def test_service_answers_a_tiled_model_with_a_map_at_the_original_size(tiled, hires, tmp_path):
    import io

    from live_server import b64, live_server, post

    image = load_image(os.path.join(hires, "test", "stain", "001.png"))
    image = np.concatenate([image, image[:, :55]], 1)  # 150 x 205: tiles edge-aligned on the width
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    [local] = create_model(model_dir=tiled.model_dir).predict(image)
    with live_server(tiled.model_dir, tmp_path) as (base, _, _):
        status, body = post(base, {"image": b64(buf.getvalue())})
    assert status == 200 and body["errorCode"] == 0, body
    res = body["result"]
    assert res["size"] == res["imageSize"] == [150, 205] and len(res["labelMap"]) == 150 * 205
    assert res["labelMap"] == local["pred_mask"].ravel().tolist()
    assert res["score"] == pytest.approx(local["pred_score"], abs=1e-6) and res["label"] == local["pred_label"]


def test_tiles_find_small_defects_that_resizing_misses(tmp_path):
    """512 px cloth with 10-14 px defects: resized to 128 px a knot (finer weave, same mean colour) is gone;
    tiles of 128 px at full resolution find it, and localise every kind far better (pixel AUROC, AUPRO)."""
    import torch

    from uadkit.data.demo import make_highres_dataset
    from uadkit.data.image_io import load_mask
    from uadkit.inference.predictor import score_images
    from uadkit.metrics import aupro, auroc

    root = make_highres_dataset(tmp_path / "hr", size=512, n_train=4, n_test_good=2, n_test_defect=2,
                                defect_px=(10, 14), seed=1)
    paths = list_images(os.path.join(root, "test"))
    kinds = [os.path.basename(os.path.dirname(p)) for p in paths]
    images = [load_image(p) for p in paths]
    masks = [np.zeros((512, 512), bool) if k == "good" else
             load_mask(os.path.join(root, "ground_truth", k, os.path.basename(p)[:-4] + "_mask.png")) > 0
             for k, p in zip(kinds, paths)]
    common = {"input_size": [128, 128], "val_split": 0.25, "Train.export": False,
              "Train.calibration.synthetic_images": 0}
    found = {}
    for name, extra in (("resize", {}), ("tiles", {"tiling": {"tile_size": [128, 128], "stride": [128, 128]}})):
        det = create_model("PatchCore", **common, **extra)
        det.train(dataset_dir=root, output=str(tmp_path / name))
        maps = [s.raw_map for s in score_images(det.model, images, torch.device("cpu"))]
        good_max = max(m.max() for m, k in zip(maps, kinds) if k == "good")
        labels = np.concatenate([m.ravel() for m in masks])
        found[name] = {"pixel_auroc": auroc(labels, np.concatenate([m.ravel() for m in maps])),
                       "aupro": aupro(masks, maps),
                       "knots": [float(m[d].max() / good_max) for m, d, k in zip(maps, masks, kinds) if k == "knot"]}
    tiles, resize = found["tiles"], found["resize"]
    assert tiles["pixel_auroc"] > 0.95 and tiles["pixel_auroc"] > resize["pixel_auroc"] + 0.1, found
    assert tiles["aupro"] > resize["aupro"] + 0.2, found
    # each knot: above every good image's map with tiles, below the good images' peak when resized
    assert min(tiles["knots"]) > 1.05 and max(resize["knots"]) < 0.95, found
