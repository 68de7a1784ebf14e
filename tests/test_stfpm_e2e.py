"""STFPM end to end on generated data: CLI train/evaluate/predict, the Python API, results on disk."""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from uadkit import create_model
from uadkit.cli import main
from uadkit.data.image_io import load_image, prepare_image
from uadkit.engine.checkpoint import load_model_dir
from uadkit.errors import UadkitError
from uadkit.inference.result import decode_rle
from uadkit.models.stfpm import stage_distances


def test_train_outputs(trained):
    res = json.load(open(os.path.join(trained, "train_result.json")))
    assert res["done_flag"] is True and res["model"] == "STFPM"
    assert len(res["train"]["history"]) == 6
    losses = [h["train_loss"] for h in res["train"]["history"]]
    assert losses[-1] < losses[0]  # the student learns
    lrs = [h["lr"] for h in res["train"]["history"]]
    assert lrs[0] == 0.4 and all(a > b for a, b in zip(lrs, lrs[1:]))  # cosine decay
    cfg = yaml.safe_load(open(os.path.join(trained, "config.yaml")))
    assert cfg["Train"]["epochs_iters"] == 6 and cfg["Model"]["input_size"] == [128, 128]
    log = open(os.path.join(trained, "train.log")).read()
    assert "epoch 6/6" in log and "calibration" in log
    meta = yaml.safe_load(open(os.path.join(trained, "best_model", "model.yaml")))
    assert meta["model"] == "STFPM" and meta["calibration"]["calibrated"] is True
    assert meta["Model"]["layers"] == ["stage2", "stage3", "stage5"]
    assert os.path.isfile(os.path.join(trained, "checkpoints", "last", "train_state.pt"))


def test_cli_predict_writes_parseable_results_and_defects_score_higher(trained, demo_dir, tmp_path):
    out = str(tmp_path / "pred")
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Global.output={out}",
               "-o", f"Predict.model_dir={trained}/best_model", "-o", f"Predict.input={demo_dir}/test"])
    assert rc == 0
    summary = json.load(open(os.path.join(out, "predict", "predict_result.json")))
    assert len(summary) == 4 + 2 * 3
    good = [s["pred_score"] for s in summary if "/good/" in s["input_path"]]
    bad = [s["pred_score"] for s in summary if "/good/" not in s["input_path"]]
    assert np.mean(bad) > np.mean(good)
    for s in summary:
        stem = os.path.relpath(os.path.splitext(s["input_path"])[0], f"{demo_dir}/test").replace(os.sep, "_")
        assert 0.0 <= s["pred_score"] <= 1.0
        assert s["pred_label"] == ("anomalous" if s["pred_score"] >= 0.5 else "normal")
        assert os.path.isfile(os.path.join(out, "predict", f"{stem}_overlay.png"))
    # one set of files per input even where file names repeat across folders (good/000, scratch/000, ...)
    assert len([f for f in os.listdir(os.path.join(out, "predict")) if f.endswith("_overlay.png")]) == len(summary)
    # a per-image JSON with a mask that decodes to the image size and a map file beside it
    one = json.load(open(os.path.join(out, "predict", "stain_000_res.json")))["res"]
    assert one["input_path"].endswith(os.path.join("stain", "000.png"))
    assert decode_rle(one["pred_mask"]).shape == (128, 128)
    amap = np.load(os.path.join(out, "predict", one["anomaly_map"]["file"]))
    assert amap.shape == (128, 128) and 0 <= amap.min() and amap.max() <= 1


def test_cli_evaluate_reports_metrics(trained, demo_dir, tmp_path):
    out = str(tmp_path / "ev")
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=evaluate", "-o", f"Global.output={out}",
               "-o", f"Global.dataset_dir={demo_dir}", "-o", f"Evaluate.model_dir={trained}/best_model"])
    assert rc == 0
    ev = json.load(open(os.path.join(out, "evaluate_result.json")))
    assert ev["num_images"] == 10 and ev["num_anomalous"] == 6
    assert ev["image"]["auroc"] > 0.5 and ev["pixel"]["auroc"] > 0.5
    assert set(ev["per_defect"]) == {"scratch", "stain"}
    assert Image.open(ev["artifacts"]["score_histogram"]).size == (720, 420)
    assert all(os.path.isfile(p) for p in ev["artifacts"]["worst_cases"])


def test_api_predict_inputs_and_original_size(trained, demo_dir, tmp_path):
    model = create_model("STFPM", model_dir=os.path.join(trained, "best_model"))
    img = load_image(os.path.join(demo_dir, "test/stain/000.png"))
    big = np.asarray(Image.fromarray(img).resize((200, 150)))  # not the model's input size
    results = list(model.predict([big, os.path.join(demo_dir, "test/good")], batch_size=3))
    assert len(results) == 1 + 4
    r = results[0]
    assert r["input_path"] == "array_0"
    assert r["anomaly_map"].shape == (150, 200) and r["pred_mask"].shape == (150, 200)
    assert set(np.unique(r["pred_mask"])) <= {0, 1}
    r.print(json_format=False)
    r.print(json_format=True)
    saved = r.save_to_img(tmp_path / "img")
    assert Image.open(saved[0]).size == (200, 150)
    assert set(np.unique(np.asarray(Image.open(saved[1])))) <= {0, 255}
    path = r.save_to_json(tmp_path / "res.json")
    data = json.load(open(path))["res"]
    assert data["pred_label"] == r["pred_label"] and data["pred_score"] == r["pred_score"]
    assert (decode_rle(data["pred_mask"]) == r["pred_mask"]).all()
    assert r.json["res"]["pred_score"] == r["pred_score"]
    # batch size does not change scores
    one_by_one = [x["pred_score"] for x in model.predict(os.path.join(demo_dir, "test/good"), batch_size=1)]
    assert one_by_one == pytest.approx([x["pred_score"] for x in results[1:]], abs=1e-5)


def test_api_predict_from_http_url(trained, demo_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=demo_dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/test/scratch/001.png"
        model = create_model(model_dir=os.path.join(trained, "best_model"))
        [r] = list(model.predict(url))
        [local] = list(model.predict(os.path.join(demo_dir, "test/scratch/001.png")))
        assert r["input_path"] == url and r["pred_score"] == pytest.approx(local["pred_score"])
        with pytest.raises(UadkitError, match="could not be downloaded"):
            list(model.predict(f"http://127.0.0.1:{server.server_address[1]}/missing.png"))
    finally:
        server.shutdown()


def test_api_train_save_load_round_trip(demo_dir, tmp_path):
    model = create_model("STFPM", input_size=[96, 96])
    with pytest.raises(UadkitError, match="not trained"):
        list(model.predict(os.path.join(demo_dir, "test/good/000.png")))
    res = model.train(dataset_dir=demo_dir, epochs_iters=2, batch_size=8, output=str(tmp_path / "o"))
    assert res["done_flag"]
    a = [r["pred_score"] for r in model.predict(os.path.join(demo_dir, "test"))]
    model.save(str(tmp_path / "saved"))
    b = [r["pred_score"] for r in create_model(model_dir=str(tmp_path / "saved")).predict(
        os.path.join(demo_dir, "test"))]
    assert a == b


def test_saved_model_is_self_contained_and_save_is_atomic(trained, tmp_path, monkeypatch):
    import uadkit.backbones as bb
    import uadkit.engine.checkpoint as ck

    def no_weights():
        raise AssertionError("loading a saved model must not read ImageNet weights")

    monkeypatch.setattr(bb, "BACKBONES", {k: v.__class__(**{**v.__dict__, "weights": no_weights})
                                          for k, v in bb.BACKBONES.items()})
    model, meta = ck.load_model_dir(os.path.join(trained, "best_model"))
    assert meta["uadkit_version"] and bool(model.is_calibrated)
    # an interrupted save leaves the previous model directory as it was and no temp folders behind
    target = str(tmp_path / "best_model")
    ck.save_model_dir(model, target)
    before = open(os.path.join(target, "model.safetensors"), "rb").read()

    def crash(state, path):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_model_dir(model, target)
    assert open(os.path.join(target, "model.safetensors"), "rb").read() == before
    assert os.listdir(tmp_path) == ["best_model"]


def _run_cli(*args):
    return subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, timeout=300)


def test_bad_inputs_exit_nonzero_with_one_line_and_keep_outputs(trained, demo_dir, tmp_path, capsys):
    best = os.path.join(trained, "best_model")
    before = {f: os.path.getmtime(os.path.join(best, f)) for f in os.listdir(best)}
    # the installed entry point's own exit status, in a process of its own
    r = _run_cli("-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Predict.model_dir={best}",
                 "-o", f"Predict.input={tmp_path}/missing.png", "-o", f"Global.output={tmp_path}/p")
    assert r.returncode == 2 and "missing.png" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    def fails(*args: str) -> str:
        """The same `main` in this process (no interpreter start each time): status 2, the message, no traceback."""
        capsys.readouterr()
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("uadkit: error: ") and "Traceback" not in err, err
        return err

    assert "not a uadkit model" in fails("-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o",
                                         f"Predict.model_dir={tmp_path}", "-o", f"Predict.input={demo_dir}/test/good")
    assert "Train.epochs" in fails("-c", "configs/STFPM.yaml", "-o", "Train.epochs=3")
    (tmp_path / "emptyds" / "train" / "good").mkdir(parents=True)
    assert "good training images" in fails("-c", "configs/STFPM.yaml", "-o", f"Global.dataset_dir={tmp_path}/emptyds",
                                           "-o", f"Global.output={trained}")
    # a corrupt training image: the dataset check names it and training does not start
    bad = tmp_path / "badds"
    for i in range(3):
        (bad / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad / "train" / "good" / f"{i}.png")
    (bad / "train" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert "broken.png" in fails("-c", "configs/STFPM.yaml", "-o", f"Global.dataset_dir={bad}",
                                 "-o", f"Global.output={trained}")
    after = {f: os.path.getmtime(os.path.join(best, f)) for f in os.listdir(best)}
    assert before == after  # the earlier trained model is untouched


def test_untrained_and_wrong_model_dir_errors(tmp_path):
    with pytest.raises(UadkitError, match="does not exist"):
        create_model(model_dir=str(tmp_path / "nope"))
    with pytest.raises(UadkitError, match="unknown model"):
        create_model("NoSuchModel")


def test_same_seed_same_training(demo_dir, tmp_path):
    runs = [create_model("STFPM", input_size=[64, 64]).train(dataset_dir=demo_dir, output=str(tmp_path / str(i)),
                                                             epochs_iters=2, seed=7, export=False)
            for i in range(2)]
    assert runs[0]["train"]["history"] == runs[1]["train"]["history"]
    assert runs[0]["calibration"]["image_threshold"] == runs[1]["calibration"]["image_threshold"]


def test_score_layers_combine_only_the_named_stages_and_travel_with_the_folder(demo_dir, tmp_path):
    det = create_model("STFPM", input_size=[96, 96], score_layers=["stage3", "stage5"], run_mode="torch")
    det.train(dataset_dir=demo_dir, epochs_iters=2, batch_size=8, output=str(tmp_path / "o"))
    det.save(str(tmp_path / "saved"))
    model, _ = load_model_dir(str(tmp_path / "saved"))
    assert model.cfg["layers"] == ["stage2", "stage3", "stage5"] and model.cfg["score_layers"] == ["stage3", "stage5"]
    x = torch.from_numpy(prepare_image(load_image(os.path.join(demo_dir, "test/good/000.png")), (96, 96)))[None]
    with torch.no_grad():
        d = [F.interpolate(m, size=(96, 96), mode="bilinear", align_corners=False)
             for m in stage_distances(*model.teacher_student(x))]
        got = model.raw_map(x)
    # the named stages' product, without the first stage (inside the outermost stride-16 cell centres, where
    # Model.map_border does not reach)
    inner = (..., slice(8, -8), slice(8, -8))
    torch.testing.assert_close(got[inner], (d[1] * d[2])[inner])
    assert not torch.allclose(got[inner], (d[0] * d[1] * d[2])[inner])
    image = os.path.join(demo_dir, "test")
    loaded = create_model(model_dir=str(tmp_path / "saved"), run_mode="torch")
    assert [r["pred_score"] for r in det.predict(image)] == [r["pred_score"] for r in loaded.predict(image)]
    exported = create_model(model_dir=str(tmp_path / "o" / "best_model"), run_mode="onnxruntime")  # one graph
    # runtimes agree to float noise (test_export's 1e-4; this one read 1.2e-5 once the student got slimmer)
    np.testing.assert_allclose([r["pred_score"] for r in exported.predict(image)],
                               [r["pred_score"] for r in det.predict(image)], atol=1e-4)


@pytest.mark.parametrize("bad", [["stage4"], [], "stage3"])
def test_score_layers_outside_the_trained_stages_is_one_line_naming_the_key(bad):
    with pytest.raises(UadkitError, match=r"^config key 'Model.score_layers': expected null or a list of stages "
                                          r"from Model.layers \(stage2, stage3, stage5\)") as e:
        create_model("STFPM", score_layers=bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("q", [0.0, 0.9])
def test_hard_quantile_loss_is_the_mean_of_each_images_worst_matched_positions(q):
    det = create_model("STFPM", input_size=[64, 64], hard_quantile=q)
    model = det.model
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = stage_distances(*model.teacher_student(x))
        want = 0.0
        for m in d:
            flat = m.flatten(1)
            n = flat.shape[1] if not q else max(1, int(flat.shape[1] * (1 - q)))
            # each image's own highest distances, found by sorting (not by the model's top-k)
            want += float(torch.sort(flat, dim=1, descending=True).values[:, :n].mean())
        got = float(model.training_loss(x, None))
    assert got == pytest.approx(want, rel=1e-5)
    if q:  # the worst-matched positions only: more than the plain mean it replaces
        assert got > float(sum(m.mean() for m in d)) + 1e-3


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_hard_quantile_outside_0_1_is_one_line_naming_the_key(bad):
    with pytest.raises(UadkitError, match=r"^config key 'Model.hard_quantile': expected a value in \[0, 1\)") as e:
        create_model("STFPM", hard_quantile=bad).model  # noqa: B018
    assert "\n" not in str(e.value)


def _inner_widths(extractor) -> list[int]:
    return [b._depthwise_conv.out_channels for b in extractor.trunk._blocks]


def test_a_half_width_student_matches_every_teacher_stage_and_saves_and_loads(demo_dir, tmp_path):
    det = create_model("STFPM", input_size=[64, 64], student_inner=0.5, shared_blocks=0, epochs_iters=1)
    det.train(dataset_dir=demo_dir, output=str(tmp_path))
    model = det.model
    teacher, student = _inner_widths(model.teacher), _inner_widths(model.student)
    # blocks that expand (all but the first) do so 3x instead of 6x; the first keeps its width
    assert student[0] == teacher[0] and all(2 * s == t for s, t in zip(student[1:], teacher[1:]))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loaded, _ = load_model_dir(str(tmp_path / "best_model"))
    assert loaded.cfg["student_inner"] == 0.5 and _inner_widths(loaded.student) == student
    with torch.no_grad():
        assert [f.shape for f in model.student(x)] == [f.shape for f in model.teacher(x)]
        torch.testing.assert_close(loaded.smoothed_map(x), model.eval().smoothed_map(x))


def test_a_folder_saved_before_student_inner_keeps_the_teachers_architecture(demo_dir, tmp_path):
    # trained with the teacher's architecture and padding, then its model.yaml written as before the keys existed
    det = create_model("STFPM", input_size=[64, 64], student_inner=1.0, shared_blocks=0, epochs_iters=1)
    det.train(dataset_dir=demo_dir, output=str(tmp_path))
    meta_path = tmp_path / "best_model" / "model.yaml"
    meta = yaml.safe_load(open(meta_path))
    assert meta["Model"].pop("student_inner") == 1.0
    assert meta["Model"].pop("student_padding") == "teacher"
    meta["Model"]["shared_blocks"] = 0  # written as 0 and then without the key: the same architecture
    assert not any(getattr(m, "frozen", False) for m in det.model.student.modules())
    meta["Model"].pop("shared_blocks")
    meta_path.write_text(yaml.safe_dump(meta))
    model, _ = load_model_dir(str(tmp_path / "best_model"))
    assert _inner_widths(model.student) == _inner_widths(model.teacher)
    assert not any(getattr(m, "symmetric", False) for m in [*model.student.modules(), *model.teacher.modules()])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.smoothed_map(x), det.model.eval().smoothed_map(x))


@pytest.mark.parametrize("size", [64, 67])
def test_an_evenly_padded_student_matches_every_teacher_stage_and_saves_and_loads(demo_dir, tmp_path, size):
    det = create_model("STFPM", input_size=[64, 64], student_padding="symmetric", shared_blocks=0,
                       epochs_iters=1)
    det.train(dataset_dir=demo_dir, output=str(tmp_path))
    model = det.model.eval()
    pads = [m.symmetric for m in model.student.modules() if hasattr(m, "symmetric")]
    assert pads and all(pads) and not any(m.symmetric for m in model.teacher.modules() if hasattr(m, "symmetric"))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))  # odd sizes too
    loaded, _ = load_model_dir(str(tmp_path / "best_model"))
    assert loaded.cfg["student_padding"] == "symmetric"
    with torch.no_grad():
        assert [f.shape for f in model.student(x)] == [f.shape for f in model.teacher(x)]
        torch.testing.assert_close(loaded.smoothed_map(x), model.smoothed_map(x))
        # the padding is what the key says: the same weights padded as the teacher compute other features
        for m in loaded.student.modules():
            if hasattr(m, "symmetric"):
                m.symmetric = False
        assert not torch.allclose(loaded.student(x)[0], model.student(x)[0])


def test_student_padding_other_than_teacher_or_symmetric_is_one_line_naming_the_key():
    with pytest.raises(UadkitError, match=r"^config key 'Model.student_padding': expected teacher or symmetric, "
                                          r"got 'same'$"):
        create_model("STFPM", student_padding="same").model  # noqa: B018


@pytest.mark.parametrize("bad", [0, 1.5, "half", True])
def test_student_inner_outside_0_1_is_one_line_naming_the_key(bad):
    with pytest.raises(UadkitError, match=r"^config key 'Model.student_inner': expected ") as e:
        create_model("STFPM", student_inner=bad).model  # noqa: B018
    assert "\n" not in str(e.value)


def test_a_student_starting_from_the_teachers_first_blocks_learns_only_the_rest(demo_dir, tmp_path):
    det = create_model("STFPM", input_size=[64, 64], student_inner=0.5, shared_blocks=2, epochs_iters=2)
    before = {k: v.clone() for k, v in det.model.state_dict().items()}
    det.train(dataset_dir=demo_dir, output=str(tmp_path))
    model = det.model.eval()
    student, teacher = model.student.trunk, model.teacher.trunk
    shared = teacher.leading_modules(2)
    assert shared == ["_conv_stem", "_bn0", "_blocks.0", "_blocks.1"]
    # the student holds no copy of the shared modules: the teacher computes them once for both, and training
    # changed neither their weights nor their BatchNorm statistics; the student's own blocks learned
    assert not any(k.startswith(tuple(f"trunk.{n}." for n in shared)) for k in model.student.state_dict())
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, before[f"teacher.{k}"], rtol=0, atol=0)
    assert 2 * student._blocks[2]._depthwise_conv.out_channels == teacher._blocks[2]._depthwise_conv.out_channels
    assert not torch.equal(student._blocks[2]._project_conv.weight,
                           before["student.trunk._blocks.2._project_conv.weight"])
    # the maps are the student's stages computed from the teacher's own block-2 output, run module by module
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = (x - model.teacher.mean) / model.teacher.std
        y = torch.nn.functional.relu6(teacher._bn0(teacher._conv_stem(y)))
        y = teacher._blocks[1](teacher._blocks[0](y))
        expected = stage_distances(model.teacher(x), model.student(y))
        for got, want in zip(model.coarse_maps(x), expected, strict=True):
            torch.testing.assert_close(got, want)
    loaded, _ = load_model_dir(str(tmp_path / "best_model"))
    assert loaded.cfg["shared_blocks"] == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.smoothed_map(x), model.smoothed_map(x))
        # the stride-4 stage still differs from the teacher's: its last block is the student's own
        assert not torch.allclose(loaded.student(y)[0], loaded.teacher(x)[0])
    # folders saved while the student kept its own frozen copies of the shared modules load with equal maps
    weights = tmp_path / "best_model" / "model.safetensors"
    state = load_file(str(weights))
    copies = {f"student.trunk.{k}": v.contiguous().clone() for k, v in teacher.state_dict().items()
              if k.startswith(tuple(f"{n}." for n in shared))}
    assert copies
    save_file({**state, **copies}, str(weights))
    old, _ = load_model_dir(str(tmp_path / "best_model"))
    with torch.no_grad():
        torch.testing.assert_close(old.smoothed_map(x), model.smoothed_map(x))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "one"])
def test_shared_blocks_other_than_a_whole_number_is_one_line_naming_the_key(bad):
    # wrong types are the config schema's one line ("expected int"), a negative count this model's own
    with pytest.raises(UadkitError, match=r"^config key 'Model.shared_blocks': expected (int|a whole number >= 0)"
                       ) as e:
        create_model("STFPM", shared_blocks=bad).model  # noqa: B018
    assert "\n" not in str(e.value)


def test_shared_blocks_that_would_compute_a_whole_stage_is_one_line_with_the_limit():
    # Lite0's stride-4 stage ends at block 2: sharing 3 blocks would leave that stage nothing to learn
    with pytest.raises(UadkitError, match=r"^config key 'Model.shared_blocks': expected 0 to 2 for "
                                          r"efficientnet_lite0 .*got 3$"):
        create_model("STFPM", shared_blocks=3).model  # noqa: B018
    # with the stride-8 stage first (Model.layers), more blocks may be shared
    assert create_model("STFPM", layers=["stage3", "stage5"], shared_blocks=3).model.cfg["shared_blocks"] == 3
