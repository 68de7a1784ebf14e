"""The GPU paths (`Global.device=gpu`): every registered model trained, predicted, saved and reloaded on a CUDA
GPU, and the CLI's modes there. The GPU tests are skipped where torch sees no CUDA GPU (CI's machines); run them
on a GPU machine with `pytest tests/test_gpu.py`. The precision switch's bookkeeping runs everywhere."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from uadkit import create_model
from uadkit.cli import main
from uadkit.data.demo import make_demo_dataset
from uadkit.data.image_io import list_images
from uadkit.errors import UadkitError
from uadkit.models import MODELS

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_demo(tmp_path_factory) -> str:
    return make_demo_dataset(tmp_path_factory.mktemp("demo_gpu"), n_train=12, n_test_good=3, n_test_defect=3,
                             size=64, n_val=8)


@needs_gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_trains_on_the_gpu_and_scores_as_on_the_cpu(name, gpu_demo, tmp_path):
    det = create_model(name, input_size=[64, 64], device="gpu")  # run_mode auto: torch on a GPU
    res = det.train(dataset_dir=gpu_demo, output=str(tmp_path / "o"), epochs_iters=2, batch_size=4)
    assert res["done_flag"] and "cuda" in str(next(iter(det.model.state_dict().values())).device)
    test_dir = os.path.join(gpu_demo, "test")
    on_gpu = list(det.predict(test_dir, batch_size=4))
    assert det.scorer() is det.model  # auto picked torch: the exported runtimes run on the CPU
    # the saved folder loads anywhere: the same weights on the CPU give the same scores and decisions
    on_cpu = list(create_model(model_dir=det.model_dir, device="cpu", run_mode="torch").predict(test_dir,
                                                                                                 batch_size=4))
    g = np.array([r["raw_score"] for r in on_gpu])
    c = np.array([r["raw_score"] for r in on_cpu])
    assert np.allclose(g, c, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(c).max()))), (g, c)
    assert [r["pred_label"] for r in on_gpu] == [r["pred_label"] for r in on_cpu]
    assert all(np.allclose(x["anomaly_map"], y["anomaly_map"], atol=1e-3) for x, y in zip(on_gpu, on_cpu))


@needs_gpu
def test_cli_modes_run_on_the_gpu(gpu_demo, tmp_path):
    out = str(tmp_path / "o")
    base = ["-c", "configs/STFPM.yaml", "-o", f"Global.dataset_dir={gpu_demo}", "-o", f"Global.output={out}",
            "-o", "Global.device=gpu:0", "-o", "Model.input_size=[64,64]", "-o", "Train.epochs_iters=2",
            "-o", "Train.batch_size=4"]
    for mode in ("train", "evaluate", "export", "calibrate"):
        assert main([*base, "-o", f"Global.mode={mode}"]) == 0, mode
    ev = json.load(open(os.path.join(out, "evaluate_result.json")))
    assert 0.0 <= ev["image"]["auroc"] <= 1.0 and ev["num_anomalous"] == 6  # 3 of each of the 2 defect kinds
    test_dir = os.path.join(gpu_demo, "test")
    assert main([*base, "-o", "Global.mode=predict", "-o", f"Predict.input={test_dir}", "-o",
                 "Predict.batch_size=4"]) == 0
    summary = json.load(open(os.path.join(out, "predict", "predict_result.json")))
    assert len(summary) == len(list_images(test_dir)) == 9 and all("pred_score" in r for r in summary)
    # resume on the GPU from the last checkpoint
    assert main([*base, "-o", "Global.mode=train", "-o", "Train.epochs_iters=3", "-o",
                 f"Train.resume_path={os.path.join(out, 'checkpoints', 'last')}"]) == 0
    hist = json.load(open(os.path.join(out, "train_result.json")))["train"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]


@needs_gpu
def test_fp32_training_on_the_gpu_follows_the_cpu_and_tf32_is_asked_for_by_name(gpu_demo, tmp_path):
    """Train.precision fp32 (the default) computes in full fp32 on a GPU too. One batch of all 12 training images
    is one step: the epoch's loss is the initial weights' and equals the CPU's to the recorded digit (on an H200:
    equal in fp32, 5e-6 apart in TF32, torch's default for GPU convolutions). Later steps drift apart between
    any two machines, as training amplifies rounding (after one step: 4e-4 in fp32, 7e-3 in TF32)."""
    hist = {}
    for device, precision in (("cpu", "fp32"), ("gpu", "fp32"), ("gpu", "tf32")):
        out = str(tmp_path / f"{device}_{precision}")
        det = create_model("STFPM", input_size=[64, 64], device=device)
        res = det.train(dataset_dir=gpu_demo, output=out, epochs_iters=1, batch_size=12, precision=precision)
        hist[device, precision] = res["train"]["history"][0]["train_loss"]
        assert f"training steps in {precision} (Train.precision {precision})" in open(f"{out}/train.log").read()
    assert hist["gpu", "fp32"] == pytest.approx(hist["cpu", "fp32"], rel=2e-6), hist


@pytest.fixture(scope="module")
def cpu_trained(gpu_demo, tmp_path_factory) -> str:
    det = create_model("STFPM", input_size=[64, 64], device="cpu")
    det.train(dataset_dir=gpu_demo, output=str(tmp_path_factory.mktemp("cpu_trained")), epochs_iters=1, batch_size=4)
    return det.model_dir


@needs_gpu
def test_a_cpu_trained_folder_scores_on_the_gpu_as_on_the_cpu(cpu_trained, gpu_demo):
    test_dir = os.path.join(gpu_demo, "test")
    cpu = [r["raw_score"] for r in create_model(model_dir=cpu_trained, device="cpu", run_mode="torch").predict(
        test_dir, batch_size=4)]
    gpu = create_model(model_dir=cpu_trained, device="gpu:0")
    got = [r["raw_score"] for r in gpu.predict(test_dir, batch_size=4)]
    assert gpu.scorer() is gpu.model and gpu.model.device.type == "cuda"
    assert np.allclose(got, cpu, rtol=1e-4, atol=1e-6), (got, cpu)


@needs_gpu
@pytest.mark.parametrize("run_mode", ["onnxruntime", "openvino"])
def test_exported_runtimes_on_the_gpu_run_there_or_say_what_to_use(run_mode, cpu_trained, gpu_demo):
    pytest.importorskip(run_mode)
    onnxruntime = pytest.importorskip("onnxruntime")

    test_dir = os.path.join(gpu_demo, "test")
    det = create_model(model_dir=cpu_trained, device="gpu", run_mode=run_mode)
    if run_mode == "onnxruntime" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        ref = list(create_model(model_dir=cpu_trained, device="cpu", run_mode="torch").predict(test_dir))
        got = list(det.predict(test_dir))
        assert np.allclose([r["raw_score"] for r in got], [r["raw_score"] for r in ref], rtol=1e-4, atol=1e-6)
        return
    # OpenVINO runs on the CPU here; ONNX Runtime without its CUDA provider names the package
    with pytest.raises(UadkitError, match="run_mode torch") as e:
        list(det.predict(test_dir))
    assert "\n" not in str(e.value)


@needs_gpu
def test_gpu_workers_join_a_group_that_takes_cpu_and_cuda_collectives(monkeypatch):
    """Multi-GPU training sums epoch losses and gathers fitted features as CPU tensors, and DDP averages
    gradients as CUDA ones: the group a worker joins must take both. One GPU here, so one rank."""
    import torch.distributed as dist

    from uadkit.engine.distributed import _free_port, init_from_env

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    ctx = init_from_env({"Global": {"device": "gpu:0", "dist_timeout_s": 60}})
    try:
        assert ctx.device.type == "cuda"
        sums = torch.tensor([1.0, 2.0], dtype=torch.float64)
        dist.all_reduce(sums)  # DistContext.sum's tensor
        parts: list = [None]
        dist.gather_object(torch.ones(2, 3), parts, dst=0)  # gather_in_order's
        grads = torch.ones(3, device=ctx.device)
        dist.all_reduce(grads)  # DDP's
        assert sums.tolist() == [1.0, 2.0] and parts[0].shape == (2, 3) and float(grads.sum()) == 3.0
    finally:
        dist.destroy_process_group()


def test_full_fp32_stays_on_while_any_thread_scores_and_is_restored_after_the_last():
    """The precision flags are process-wide; two overlapping scorers (threads of one service or two
    detectors) must not switch them back under each other or leave them switched. Flags only: runs anywhere."""
    from uadkit.engine.device import _precision_flags, full_fp32

    flags = _precision_flags()
    before = [getattr(obj, name) for obj, name, _ in flags]
    fp32 = [value for _, _, value in flags]
    current = lambda: [getattr(obj, name) for obj, name, _ in flags]  # noqa: E731
    with full_fp32("cpu"):
        assert current() == before  # nothing to do on the CPU
    a, b = full_fp32(torch.device("cuda")), full_fp32("cuda:0")
    a.__enter__()
    assert current() == fp32
    b.__enter__()
    a.__exit__(None, None, None)  # the first one leaves while the second still scores
    assert current() == fp32
    b.__exit__(None, None, None)
    assert current() == before
    with pytest.raises(ValueError), full_fp32("cuda"):  # an error inside still restores them
        raise ValueError
    assert current() == before
