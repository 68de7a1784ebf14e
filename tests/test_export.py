"""ONNX export of the full scoring path, and prediction through ONNX Runtime."""

import os

import numpy as np
import pytest
import torch
import yaml

from uadkit import create_model
from uadkit.cli import main
from uadkit.engine.checkpoint import load_model_dir
from uadkit.engine.export import OnnxModel

# Stated tolerance: normalised scores and maps agree to 1e-4; raw values to 1e-4 relative.
TOL = 1e-4


@pytest.fixture(scope="module", params=["STFPM", "PaDiM", "PatchCore"])
def exported(request, demo_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"exp_{request.param}"))
    det = create_model(request.param, input_size=[64, 64])
    det.train(dataset_dir=demo_dir, output=out, epochs_iters=2)  # Train.export is on: exported after training
    return det


def test_training_exports_graph_and_metadata(exported):
    folder = os.path.join(exported.model_dir, "inference")
    info = yaml.safe_load(open(os.path.join(folder, "inference.yml")))
    assert info["model"] == exported.name and info["input_size"] == [64, 64]
    # the graph holds the whole scoring path, or (an approximate search) stops at the patch embedding and the
    # rest runs from the saved head tensors
    split = exported.name == "PatchCore" and exported.model.search.approximate
    assert info["outputs"] == (["embedding"] if split else ["raw_map", "raw_score", "norm_map", "norm_score"])
    assert os.path.isfile(os.path.join(folder, "head.safetensors")) == split
    assert info["calibration"]["image_threshold"] == pytest.approx(float(exported.model.calibration[0]))


def test_a_graph_exported_in_an_older_formulation_is_exported_again_when_loaded(exported, demo_dir, tmp_path,
                                                                                 monkeypatch):
    """A folder whose inference.yml predates the model's graph_version (PaDiM's einsum graph: OpenVINO compiled
    it into 13.5 GB) is exported again when it is loaded, before anything hashes it; results are unchanged. A
    folder that cannot be written keeps its older graph and still predicts."""
    import shutil

    cls = type(exported.model)
    test_dir = os.path.join(demo_dir, "test")
    ref = [r["raw_score"] for r in create_model(model_dir=exported.model_dir, run_mode="torch").predict(
        test_dir, batch_size=4)]

    def stale_copy(name: str):
        folder = shutil.copytree(exported.model_dir, tmp_path / name)
        info = yaml.safe_load(open(folder / "inference" / "inference.yml"))
        assert info["graph_version"] == cls.graph_version
        del info["graph_version"]  # as written before the key existed
        yaml.safe_dump(info, open(folder / "inference" / "inference.yml", "w"))
        return folder, os.path.getmtime(folder / "inference" / "model.onnx")

    folder, stamp = stale_copy("m")
    det = create_model(model_dir=str(folder), run_mode="onnxruntime")
    version = yaml.safe_load(open(folder / "inference" / "inference.yml")).get("graph_version", 1)
    rewritten = os.path.getmtime(folder / "inference" / "model.onnx") != stamp
    assert version == cls.graph_version and rewritten == (cls.graph_version > 1)
    got = [r["raw_score"] for r in det.predict(test_dir, batch_size=4)]
    assert np.allclose(got, ref, rtol=TOL, atol=TOL)
    if cls.graph_version > 1:
        import tempfile

        def refuse(*a, **k):
            raise PermissionError(13, "Read-only file system")

        folder, stamp = stale_copy("read_only")
        monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # what a read-only mount answers
        det = create_model(model_dir=str(folder), run_mode="onnxruntime")
        assert os.path.getmtime(folder / "inference" / "model.onnx") == stamp
        got = [r["raw_score"] for r in det.predict(test_dir, batch_size=4)]
        assert np.allclose(got, ref, rtol=TOL, atol=TOL)


def test_onnxruntime_equals_torch(exported):
    model, _ = load_model_dir(exported.model_dir)
    onnx = OnnxModel(exported.model_dir)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # batch 3: the batch axis is dynamic
    with torch.no_grad():
        ref = model.scores(x)
    got = onnx.scores(x)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        assert torch.allclose(r, g, rtol=TOL, atol=TOL * max(1.0, float(r.abs().max())))


def test_predict_run_mode_onnxruntime_matches_torch(exported, demo_dir):
    a = list(create_model(model_dir=exported.model_dir, run_mode="torch").predict(
        os.path.join(demo_dir, "test"), batch_size=4))
    b = list(create_model(model_dir=exported.model_dir, run_mode="onnxruntime").predict(
        os.path.join(demo_dir, "test"), batch_size=4))
    assert [r["input_path"] for r in a] == [r["input_path"] for r in b]
    assert np.allclose([r["pred_score"] for r in a], [r["pred_score"] for r in b], atol=TOL)
    assert all(np.abs(x["anomaly_map"] - y["anomaly_map"]).max() < 1e-3 for x, y in zip(a, b))


def test_cli_export_mode_rewrites_inference_folder(trained, tmp_path):
    best = os.path.join(trained, "best_model")
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=export", "-o", f"Export.model_dir={best}"])
    assert rc == 0 and os.path.isfile(os.path.join(best, "inference", "model.onnx"))
    assert not [d for d in os.listdir(best) if d.startswith(".")]  # no temp folders left
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=export", "-o", f"Export.model_dir={tmp_path}"])
    assert rc == 2


@pytest.mark.parametrize("run_mode", sorted(__import__("uadkit.runtimes", fromlist=["RUNTIMES"]).RUNTIMES))
def test_every_runtime_equals_torch_and_is_listed(exported, run_mode):
    """Each registered runtime's artefact sits in inference/, is listed in inference.yml, and scores as torch."""
    from uadkit.runtimes import RUNTIMES, load_runtime

    spec = RUNTIMES[run_mode]
    info = yaml.safe_load(open(os.path.join(exported.model_dir, "inference", "inference.yml")))
    if spec.artefact:
        assert info["artefacts"][run_mode] == spec.artefact
        assert os.path.isfile(os.path.join(exported.model_dir, "inference", spec.artefact))
    model, _ = load_model_dir(exported.model_dir)
    rt = load_runtime(run_mode, exported.model_dir, model).to(torch.device("cpu")).eval()
    assert rt.name == exported.name and tuple(rt.input_size) == (64, 64)
    for batch in (1, 3):
        x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model.scores(x)
        for r, g in zip(ref, rt.scores(x)):
            assert r.shape == g.shape
            assert torch.allclose(r, g, rtol=TOL, atol=TOL * max(1.0, float(r.abs().max())))


def test_evaluate_runs_any_runtime_with_equal_metrics(exported, demo_dir, tmp_path):
    from uadkit.runtimes import RUNTIMES

    if exported.name != "PaDiM":  # one model suffices here: every model's runtimes are compared score by score above
        return
    res = {m: exported.evaluate(demo_dir, **{"Evaluate.run_mode": m, "Global.output": str(tmp_path / m)})
           for m in RUNTIMES}
    for m, r in res.items():
        assert r["run_mode"] == m
        assert r["image"]["auroc"] == pytest.approx(res["torch"]["image"]["auroc"], abs=1e-3)
        assert r["pixel"]["auroc"] == pytest.approx(res["torch"]["pixel"]["auroc"], abs=1e-3)


def test_unknown_run_mode_is_a_one_line_config_error(exported):
    from uadkit.errors import UadkitError

    with pytest.raises(UadkitError, match="Predict.run_mode.*torch, onnxruntime, openvino"):
        create_model(model_dir=exported.model_dir, run_mode="tensorrt")


def test_auto_run_mode_picks_the_models_preferred_runtime(exported):
    from uadkit.runtimes import RUNTIMES

    det = create_model(model_dir=exported.model_dir)  # Predict.run_mode defaults to auto
    assert det.cfg["Predict"]["run_mode"] == "auto"
    want = RUNTIMES[exported.model.preferred_runtime]
    scorer = det.scorer()
    assert (scorer is det.model) if want.artefact is None else scorer.path.endswith(want.artefact)
    # on a GPU auto is torch, the one runtime that runs there without extra packages (tests/test_gpu.py runs it)
    from uadkit.runtimes import resolve_run_mode

    assert [resolve_run_mode("auto", exported.model, d).name for d in ("gpu", "gpu:1", "cuda:0", "cpu")] == \
        ["torch", "torch", "torch", exported.model.preferred_runtime]


def test_onnxruntime_gpu_needs_its_cuda_provider():
    """Global.device=gpu with run_mode onnxruntime: the CUDA provider when installed, else a one-line hint.
    (This machine has no GPU: what runs here is the provider choice and the message.)"""
    from uadkit.errors import UadkitError
    from uadkit.runtimes.onnx import providers_for

    assert providers_for(torch.device("cpu"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    got = providers_for(torch.device("cuda:1"), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert got == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(UadkitError, match="pip install onnxruntime-gpu"):
        providers_for(torch.device("cuda:0"), ["CPUExecutionProvider"])
    if not torch.cuda.is_available():
        from uadkit.engine.device import main_device

        with pytest.raises(UadkitError, match="no CUDA GPU is available here; use Global.device=cpu"):
            main_device("gpu")


@pytest.mark.parametrize("run_mode,package", [("openvino", "openvino"), ("onnxruntime", "onnxruntime")])
def test_runtime_without_its_package_says_what_to_install(run_mode, package, tmp_path):
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{package!r}] = None\n"
            "from uadkit.errors import UadkitError\n"
            "from uadkit.runtimes import load_runtime\n"
            f"try:\n    load_runtime({run_mode!r}, {str(tmp_path)!r}, None)\n"
            "except UadkitError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"run_mode {run_mode} needs the {package} package: pip install {package}" in out.stdout
