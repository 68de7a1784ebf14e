"""The training engine's contract with models (optimiser, schedule, hooks, extra batches), resume, and every
registered model through train -> save -> load -> ONNX export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from uadkit import create_model
from uadkit.cli import main
from uadkit.config import load_config
from uadkit.data.demo import make_demo_dataset
from uadkit.data.formats import load_index
from uadkit.data.image_io import list_images, load_image, prepare_image
from uadkit.engine.checkpoint import load_model_dir, save_model_dir
from uadkit.engine.export import OnnxModel
from uadkit.engine.trainer import train_gradient
from uadkit.inference.predictor import score_images
from uadkit.models import MODELS, AnomalyModel

TOL = 1e-4  # the export tests' stated tolerance


@pytest.fixture(scope="module")
def val_demo(tmp_path_factory) -> str:
    """Small demo data with a validation/good folder (calibration needs a few good images it did not fit)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo_val"), n_train=12, n_test_good=3, n_test_defect=2,
                             size=64, n_val=8)


class Tiny(AnomalyModel):
    """One trainable number w. Training pulls w to 1; the validation loss is lowest at w = 0.3, so the best
    epoch by validation loss is an early one and later epochs are worse (what resume must remember)."""

    name = "Tiny"
    trainable = True
    train_defaults = {"epochs_iters": 4, "batch_size": 4, "learning_rate": 0.1, "cache_teacher": False}

    def __init__(self, model_cfg: dict[str, Any], pretrained: bool = True) -> None:
        super().__init__(model_cfg)
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("train_mean", torch.zeros(()))
        self.register_buffer("val_max", torch.zeros(()))
        self.calls: list[tuple[str, Any]] = []

    def raw_map(self, images: torch.Tensor) -> torch.Tensor:
        return (images.mean(1, keepdim=True) - self.train_mean).abs() * self.w

    def configure_optimizers(self, train_cfg):
        self.calls.append(("configure_optimizers", float(self.train_mean)))
        opt = torch.optim.SGD([self.w], lr=train_cfg["learning_rate"])
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def on_train_start(self, batches):
        images = torch.cat(list(batches()))
        self.calls.append(("on_train_start", len(images)))
        self.train_mean.fill_(float(images.mean()))

    def on_train_end(self, batches):
        images = torch.cat(list(batches()))
        self.calls.append(("on_train_end", len(images)))
        self.val_max.fill_(float(images.max()))

    def extra_batch_source(self, train_cfg):
        return lambda n, gen: torch.rand(n, 3, 8, 8, generator=gen)

    def training_loss(self, images, targets, extra=None):
        self.calls.append(("extra", None if extra is None else tuple(extra.shape)))
        if self.training:
            return (self.w - 1) ** 2 + 0 * extra.mean()
        return (self.w - 0.3) ** 2


def _tiny_run(monkeypatch, demo: str, out: str, **train: Any) -> tuple[Tiny, dict]:
    monkeypatch.setitem(MODELS, "Tiny", Tiny)
    cfg = load_config(None, ["Global.model=Tiny", "Model.input_size=[32,32]", f"Global.output={out}",
                             *[f"Train.{k}={v}" for k, v in train.items()]])
    model = Tiny(cfg["Model"])
    index = load_index(demo, cfg["Train"]["val_split"], cfg["Global"]["seed"])
    return model, train_gradient(model, index, cfg, out, torch.device("cpu"))


def test_model_owns_optimiser_schedule_hooks_and_extra_batches(monkeypatch, val_demo, tmp_path):
    model, info = _tiny_run(monkeypatch, val_demo, str(tmp_path))
    names = [c[0] for c in model.calls]
    # statistics first, then the optimiser (it may depend on them), training ..., then the end hook
    assert model.calls[0] == ("on_train_start", 12)
    assert model.calls[1] == ("configure_optimizers", pytest.approx(float(model.train_mean)))
    assert model.calls[-1] == ("on_train_end", 8) and names.count("on_train_end") == 1
    assert float(model.train_mean) > 0 and float(model.val_max) > 0  # the hooks' results stay in the model
    extras = [c[1] for c in model.calls if c[0] == "extra"]
    # 3 training batches of 4 with a 4-image extra batch each, then the validation pass without one, per epoch
    assert extras == ([(4, 3, 8, 8)] * 3 + [None] * 2) * 4
    # the model's StepLR, stepped once per epoch, not the default cosine
    assert [h["lr"] for h in info["history"]] == [0.1, 0.05, 0.025, 0.0125]
    assert info["best_epoch"] == 1 and float(model.w) == pytest.approx(1 - 0.8**3, abs=1e-6)


@pytest.mark.parametrize(("train", "epochs"), [
    ({"epochs_iters": None, "step_budget": 7}, 3),   # 12 images in batches of 4: 3 steps an epoch, 7 -> 3 epochs
    ({"epochs_iters": 2, "step_budget": 7}, 2),      # both set: the fewer epochs
    ({"epochs_iters": 10, "step_budget": 4}, 2),
    ({"epochs_iters": 3, "step_budget": None}, 3),   # epochs alone, as before the key
])
def test_a_step_budget_trains_whole_epochs_and_the_fewer_of_both(monkeypatch, val_demo, tmp_path, train, epochs):
    _, info = _tiny_run(monkeypatch, val_demo, str(tmp_path), **{k: "null" if v is None else v
                                                                 for k, v in train.items()})
    assert info["epochs"] == epochs and [h["epoch"] for h in info["history"]] == list(range(1, epochs + 1))


@pytest.mark.parametrize("name", sorted(n for n, c in MODELS.items() if c.trainable))
def test_a_models_cosine_schedule_spans_the_epochs_its_step_budget_gives(name, val_demo, tmp_path):
    out = str(tmp_path / "o")
    assert main(["-o", f"Global.model={name}", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={val_demo}",
                 "-o", f"Global.output={out}", "-o", "Model.input_size=[64,64]", "-o", "Train.batch_size=4",
                 "-o", "Train.epochs_iters=null", "-o", "Train.step_budget=7", "-o", "Train.lr_scheduler=cosine",
                 "-o", "Train.export=false", "-o", "Train.calibration.synthetic_images=0"]) == 0
    run = json.load(open(os.path.join(out, "train_result.json")))["train"]
    lrs = [h["lr"] for h in run["history"]]
    # decayed to zero over the 3 epochs run (cosine: 1, 0.75, 0.25 of the rate), not over a nominal epoch count
    assert run["epochs"] == 3 and lrs == pytest.approx([lrs[0], 0.75 * lrs[0], 0.25 * lrs[0]], rel=1e-4)
    assert "training 3 epochs of 3 steps (Train.step_budget 7" in open(os.path.join(out, "train.log")).read()


def test_resume_under_a_step_budget_reproduces_the_run(monkeypatch, val_demo, tmp_path):
    budget = {"epochs_iters": "null", "step_budget": 10}  # 4 epochs of 3 steps
    _, whole = _tiny_run(monkeypatch, val_demo, str(tmp_path / "a"), save_interval=1, **budget)
    ck = str(tmp_path / "a" / "checkpoints" / "epoch_2")
    _, resumed = _tiny_run(monkeypatch, val_demo, str(tmp_path / "b"), resume_path=ck, **budget)
    assert len(whole["history"]) == 4 and resumed["history"] == whole["history"]
    assert resumed["best_epoch"] == whole["best_epoch"]


class Fading(Tiny):
    """Tiny with weights that get no gradient, some of them subnormal (what Adam's decaying moments leave)."""

    def __init__(self, model_cfg: dict[str, Any], pretrained: bool = True) -> None:
        super().__init__(model_cfg)
        self.dead = torch.nn.Parameter(torch.tensor([1e-39, -3e-39, 1e-30, 0.5]))

    def configure_optimizers(self, train_cfg):
        return torch.optim.Adam([self.w, self.dead], lr=train_cfg["learning_rate"]), None

    def training_loss(self, images, targets, extra=None):
        return super().training_loss(images, targets, extra) + 0 * self.dead.sum()  # a gradient of zeros


def test_cpu_training_steps_leave_no_subnormal_weights(monkeypatch, val_demo, tmp_path):
    # subnormal floats make x86 arithmetic many times slower (an EfficientAD epoch 10.5 -> 50 s): uadkit reads
    # and writes them as zero, so a step leaves weights under the smallest normal float at zero, no other value
    monkeypatch.setitem(MODELS, "Tiny", Fading)
    cfg = load_config(None, ["Global.model=Tiny", "Model.input_size=[32,32]", f"Global.output={tmp_path}"])
    model = Fading(cfg["Model"])
    index = load_index(val_demo, cfg["Train"]["val_split"], cfg["Global"]["seed"])
    train_gradient(model, index, cfg, str(tmp_path), torch.device("cpu"))
    assert model.dead.tolist() == [0.0, 0.0, pytest.approx(1e-30), 0.5]
    assert float(model.w) != 0  # the weight that learns still does
    assert float(torch.tensor([1e-39]) * 1.0) != 0  # this thread keeps IEEE arithmetic after training


_SUBNORMAL_PROBE = """
import sys, threading, torch
import uadkit  # noqa: F401
torch.set_num_threads(2)
x = torch.full((4_000_000,), 1e-39)  # large enough that the multiply is split over both intra-op threads
out = {}
t = threading.Thread(target=lambda: out.setdefault("thread", int((torch.full((8,), 1e-39) * 1.0 != 0).sum())))
t.start(); t.join()
print(int((x * 1.0 != 0).sum()), out["thread"])
"""


@pytest.mark.parametrize(("env", "expected"), [({}, "2000000 8"), ({"UADKIT_DENORMALS": "keep"}, "4000000 8")])
def test_import_starts_torchs_threads_flushing_subnormals_unless_kept(env, expected):
    # torch's second intra-op thread flushes its half of the multiply; the importing thread, and a Python thread
    # started from it, keep IEEE arithmetic (training flushes in its own thread while it runs)
    run = subprocess.run([sys.executable, "-c", _SUBNORMAL_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2", **env})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-2:] == expected.split()


def test_resume_keeps_the_best_epoch_and_reproduces_the_run(monkeypatch, val_demo, tmp_path):
    _, whole = _tiny_run(monkeypatch, val_demo, str(tmp_path / "a"), save_interval=1)
    ck = str(tmp_path / "a" / "checkpoints" / "epoch_2")
    resumed_model, resumed = _tiny_run(monkeypatch, val_demo, str(tmp_path / "b"), resume_path=ck)
    assert resumed["history"] == whole["history"]
    # epoch 1 was best and lies before the resume point: the resumed run still returns its weights
    assert resumed["best_epoch"] == whole["best_epoch"] == 1
    assert float(resumed_model.w) == pytest.approx(1 - 0.8**3, abs=1e-6)


def test_stfpm_resume_reproduces_an_uninterrupted_run(val_demo, tmp_path):
    base = ["-c", "configs/STFPM.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={val_demo}",
            "-o", "Model.input_size=[64,64]", "-o", "Train.batch_size=4", "-o", "Train.epochs_iters=3",
            "-o", "Train.export=false"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(base + ["-o", f"Global.output={a}", "-o", "Train.save_interval=1"]) == 0
    assert main(base + ["-o", f"Global.output={b}", "-o", f"Train.resume_path={a}/checkpoints/epoch_1"]) == 0
    ra, rb = (json.load(open(os.path.join(d, "train_result.json")))["train"] for d in (a, b))
    assert rb["history"] == ra["history"] and rb["best_epoch"] == ra["best_epoch"]
    assert "resumed from" in open(os.path.join(b, "train.log")).read()
    ma, _ = load_model_dir(os.path.join(a, "best_model"))
    mb, _ = load_model_dir(os.path.join(b, "best_model"))
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.mark.parametrize("name", sorted(n for n, c in MODELS.items() if c.trainable))
def test_cached_teacher_targets_change_speed_not_the_run(name, val_demo, tmp_path):
    """Training and validation targets kept from the first epoch train the same model, with the same loss
    history, as recomputing them every step."""
    runs = []
    for cache in (True, False):
        out = str(tmp_path / str(cache))
        assert main(["-o", f"Global.model={name}", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={val_demo}",
                     "-o", f"Global.output={out}", "-o", "Model.input_size=[64,64]", "-o", "Train.batch_size=4",
                     "-o", "Train.epochs_iters=3", "-o", "Train.export=false", "-o", f"Train.cache_teacher={cache}",
                     "-o", "Train.calibration.synthetic_images=0"]) == 0
        history = json.load(open(os.path.join(out, "train_result.json")))["train"]["history"]
        runs.append((history, load_model_dir(os.path.join(out, "best_model"))[0].state_dict()))
    (h1, w1), (h2, w2) = runs
    assert h1 == h2 and all(h["val_loss"] is not None for h in h1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_trains_saves_loads_and_exports(name, val_demo, tmp_path):
    det = create_model(name, input_size=[64, 64], run_mode="torch")
    res = det.train(dataset_dir=val_demo, output=str(tmp_path / "o"), epochs_iters=2, batch_size=4)
    assert res["done_flag"] and res["model"] == name
    # the run says what its fit time was measured on, in its result and in train_result.json
    on_disk = json.load(open(os.path.join(tmp_path, "o", "train_result.json")))
    machine = on_disk["machine"]
    assert machine == res["machine"] and machine["torch"] == torch.__version__
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and machine["cores"] >= 1
    if det.model.trainable:
        assert len(res["train"]["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in res["train"]["history"])
    test_dir, best = os.path.join(val_demo, "test"), det.model_dir
    before = list(det.predict(test_dir, batch_size=4))
    det.save(str(tmp_path / "saved"))
    loaded = create_model(model_dir=str(tmp_path / "saved"), run_mode="torch")
    after = list(loaded.predict(test_dir, batch_size=4))
    # the trained model in memory vs its saved copy: equal up to float summation order (PaDiM's in-memory
    # inverse covariances are laid out differently from the loaded, contiguous ones)
    assert np.allclose([r["raw_score"] for r in before], [r["raw_score"] for r in after], rtol=1e-5, atol=1e-6)
    # two loads of saved copies: bit-identical
    again = list(create_model(model_dir=best, run_mode="torch").predict(test_dir, batch_size=4))
    assert [r["raw_score"] for r in again] == [r["raw_score"] for r in after]
    assert all(np.array_equal(x["anomaly_map"], y["anomaly_map"]) for x, y in zip(again, after))
    # one ONNX graph for the whole scoring path, equal to torch
    model, _ = load_model_dir(best)
    onnx = OnnxModel(best)  # Train.export is on: training wrote the graph
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.scores(x)
    for r, g in zip(ref, onnx.scores(x)):
        assert r.shape == g.shape
        assert torch.allclose(r, g, rtol=TOL, atol=TOL * max(1.0, float(r.abs().max())))
    # the predictor runs a torch model channels-last (speed only): the plain layout's scores, saved as usual
    imgs = [load_image(p) for p in list_images(test_dir)[:3]]
    with torch.no_grad():
        plain = model.scores(torch.from_numpy(np.stack([prepare_image(i, model.input_size) for i in imgs])))[1]
    fast = [s.raw_score for s in score_images(model, imgs, torch.device("cpu"))]
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())  # it was converted
    assert np.allclose(fast, plain.numpy(), rtol=TOL, atol=TOL * 1e-3)
    save_model_dir(model, str(tmp_path / "again"))
    assert load_model_dir(str(tmp_path / "again"))[0].scores(x)[1].tolist() == ref[1].tolist()
    # a folder saved before Model.map_border (the key removed) keeps the clamped border its thresholds were
    # calibrated on: the same map inside the outermost cell centres, another on the border
    meta_path = os.path.join(tmp_path, "again", "model.yaml")
    meta = yaml.safe_load(open(meta_path))
    assert meta["Model"].pop("map_border") == "mean"
    with open(meta_path, "w") as f:
        yaml.safe_dump(meta, f)
    old = load_model_dir(str(tmp_path / "again"))[0]
    assert old.map_border == "clamp"
    with torch.no_grad():
        new_raw, old_raw = model.raw_map(x), old.raw_map(x)
    inner = (..., slice(8, -8), slice(8, -8))  # half the coarsest stride (16) from the edge
    assert torch.allclose(new_raw[inner], old_raw[inner], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(new_raw, old_raw, rtol=1e-5, atol=1e-6)


def test_image_topk_scores_the_mean_of_the_highest_pixels():
    from uadkit import create_model
    from uadkit.errors import UadkitError

    model = create_model("STFPM", input_size=[64, 64]).model.eval()
    assert model.cfg["image_topk"] == 0.001  # the STFPM default
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        amap, score = model(x)
        k = max(1, round(0.001 * 64 * 64))
        assert torch.allclose(score, amap.flatten(1).topk(k, dim=1).values.mean(1))
        model.cfg["image_topk"] = 0.05
        assert torch.allclose(model(x)[1], amap.flatten(1).topk(205, dim=1).values.mean(1))
        model.cfg["image_topk"] = 0  # 0: the map's maximum
        assert torch.allclose(model(x)[1], amap.flatten(1).amax(1))
    with pytest.raises(UadkitError, match="Model.image_topk"):
        create_model("STFPM", input_size=[64, 64], image_topk=1.5).model  # noqa: B018


@pytest.mark.parametrize("name", sorted(n for n, c in MODELS.items() if c.trainable))
def test_bf16_training_steps_change_the_arithmetic_not_the_outcome(name, val_demo, tmp_path):
    """Train.precision=bf16 runs the steps under autocast: the loss history moves in its low digits only, and
    the weights and the saved model stay fp32 (scoring is fp32 whatever trained it). tf32 is a GPU's: a CPU
    trains in fp32 for it, the same history to the digit."""
    runs = {}
    for precision in ("fp32", "tf32", "bf16"):
        out = str(tmp_path / precision)
        assert main(["-o", f"Global.model={name}", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={val_demo}",
                     "-o", f"Global.output={out}", "-o", "Model.input_size=[64,64]", "-o", "Train.batch_size=4",
                     "-o", "Train.epochs_iters=3", "-o", "Train.export=false", "-o", f"Train.precision={precision}",
                     "-o", "Train.calibration.synthetic_images=0"]) == 0
        runs[precision] = json.load(open(os.path.join(out, "train_result.json")))["train"]
        used = "fp32" if precision == "tf32" else precision
        assert runs[precision]["precision"] == used
        assert f"training steps in {used} (Train.precision {precision})" in open(os.path.join(out, "train.log")).read()
        model, _ = load_model_dir(os.path.join(out, "best_model"))
        assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    fp32, bf16 = ([h["train_loss"] for h in runs[p]["history"]] for p in ("fp32", "bf16"))
    assert fp32 != bf16  # the steps did run in bfloat16
    assert np.allclose(bf16, fp32, rtol=0.05)
    assert [h["train_loss"] for h in runs["tf32"]["history"]] == fp32


def test_an_unknown_training_precision_is_one_line_naming_the_key():
    from uadkit.errors import UadkitError

    with pytest.raises(UadkitError, match=r"Train.precision': expected one of fp32, tf32, bf16, auto, got 'fp16'"):
        load_config(None, ["Global.model=EfficientAD", "Train.precision=fp16"])
