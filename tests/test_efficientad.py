"""EfficientAD's two branches: the student alone by default, the autoencoder trained and mixed in on request."""

from __future__ import annotations

import copy

import pytest
import torch

from uadkit import create_model
from uadkit.data.demo import make_demo_dataset
from uadkit.engine.checkpoint import load_model_dir
from uadkit.engine.export import OnnxModel
from uadkit.errors import UadkitError

TOL = 1e-4  # the export tests' stated tolerance


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return make_demo_dataset(tmp_path_factory.mktemp("ead_demo"), n_train=12, n_test_good=3, n_test_defect=2,
                             size=64, n_val=8)


def _x() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_autoencoder_is_off_by_default_and_then_neither_trained_nor_scored(demo, tmp_path):
    def trained(epochs: int):
        det = create_model("EfficientAD", input_size=[64, 64], run_mode="torch")
        det.train(dataset_dir=demo, output=str(tmp_path / f"e{epochs}"), epochs_iters=epochs, batch_size=4)
        return load_model_dir(det.model_dir)[0]

    one, model = trained(1), trained(2)  # same seed: same initial weights
    assert model.cfg["ae_weight"] == 0
    assert not torch.equal(one.students[0][0].weight, model.students[0][0].weight)  # the student learned on
    assert all(torch.equal(a, b) for a, b in zip(one.autoencoder.state_dict().values(),
                                                 model.autoencoder.state_dict().values()))  # it did not
    x = _x()
    with torch.no_grad():
        ref = model.scores(x)
        for p in model.autoencoder.parameters():  # scramble it: the scores must not move
            p.add_(torch.randn_like(p))
        assert all(torch.equal(a, b) for a, b in zip(ref, model.scores(x)))


def test_a_folder_saved_with_the_students_unused_autoencoder_half_loads_and_scores_the_same(demo, tmp_path):
    """Without the autoencoder the student predicts the teacher only; folders saved before held a second, unused
    half of its output channels (and named their one student `student`), and must load with the same scores."""
    import shutil

    from safetensors.torch import load_file, save_file

    det = create_model("EfficientAD", input_size=[64, 64], run_mode="torch")
    det.train(dataset_dir=demo, output=str(tmp_path / "o"), epochs_iters=1, batch_size=4)
    model = load_model_dir(det.model_dir)[0]
    assert model.students[0][-1].out_channels == model.channels  # no autoencoder half
    old = shutil.copytree(det.model_dir, tmp_path / "old")
    state = load_file(str(old / "model.safetensors"))
    # the old layout: one student called `student`, with twice the output channels
    for key in [k for k in state if k.startswith("students.0.")]:
        state["student." + key[len("students.0."):]] = state.pop(key)
    w, b = state["student.10.weight"], state["student.10.bias"]
    state["student.10.weight"] = torch.cat([w, torch.randn_like(w)]).contiguous()
    state["student.10.bias"] = torch.cat([b, torch.randn_like(b)]).contiguous()
    save_file(state, str(old / "model.safetensors"))
    loaded = load_model_dir(str(old))[0]
    x = _x()
    with torch.no_grad():
        assert all(torch.equal(a, c) for a, c in zip(model.scores(x), loaded.scores(x)))
    with_ae = create_model("EfficientAD", input_size=[64, 64], ae_weight=0.5).model
    assert with_ae.students[0][-1].out_channels == 2 * with_ae.channels


def test_weighted_autoencoder_trains_mixes_in_and_exports(demo, tmp_path):
    det = create_model("EfficientAD", input_size=[64, 64], run_mode="torch", ae_weight=0.5)
    det.train(dataset_dir=demo, output=str(tmp_path / "o"), epochs_iters=2, batch_size=4)
    model, _ = load_model_dir(det.model_dir)
    assert model.cfg["ae_weight"] == 0.5
    one = create_model("EfficientAD", input_size=[64, 64], run_mode="torch", ae_weight=0.5)
    one.train(dataset_dir=demo, output=str(tmp_path / "e1"), epochs_iters=1, batch_size=4)
    assert not torch.equal(load_model_dir(one.model_dir)[0].autoencoder.encoder[0].weight,
                           model.autoencoder.encoder[0].weight)  # the autoencoder learned on
    x = _x()
    with torch.no_grad():
        ref = model.scores(x)
        only_student = copy.deepcopy(model)
        only_student.cfg["ae_weight"] = 0.0
        assert not torch.allclose(ref[0], only_student.scores(x)[0])  # the autoencoder's map is in the result
    for r, g in zip(ref, OnnxModel(det.model_dir).scores(x)):  # and in the one exported graph
        assert torch.allclose(r, g, rtol=TOL, atol=TOL * max(1.0, float(r.abs().max())))


def test_penalty_stream_is_drawn_and_trained_on_only_on_request(demo, tmp_path):
    """Off by default (measured neutral, README); on request each batch brings penalty images whose student
    output (pushed towards zero) is part of the loss."""
    from uadkit.models.efficientad import penalty_images

    def trained(penalty: bool):
        det = create_model("EfficientAD", input_size=[64, 64], run_mode="torch", penalty=penalty)
        det.train(dataset_dir=demo, output=str(tmp_path / str(penalty)), epochs_iters=2, batch_size=4,
                  **{"Train.export": False})
        return load_model_dir(det.model_dir)[0]

    assert create_model("EfficientAD").model.cfg["penalty"] is False  # the default
    off, on = trained(False), trained(True)
    assert off.cfg["penalty"] is False and on.cfg["penalty"] is True
    assert off.extra_batch_source(off.cfg) is None
    assert not torch.equal(off.students[0][0].weight, on.students[0][0].weight)  # same seed: only the stream differs
    x, extra = _x(), penalty_images(2, (64, 64), torch.Generator().manual_seed(5))
    with torch.no_grad():
        energy = sum(float(s[:, :on.channels].pow(2).mean()) for s in on._student(extra, on.feature_size(x)))
        added = float(on.training_loss(x, None, extra) - on.training_loss(x, None, None))
        assert added == pytest.approx(energy, rel=1e-3)
        assert torch.equal(off.training_loss(x, None, extra), off.training_loss(x, None, None))


@pytest.mark.parametrize("ae_weight,shared_stem", [(0.0, 0), (0.5, 0), (0.0, 3)])
def test_several_students_learn_apart_and_their_maps_are_averaged_in_the_exported_graph(demo, tmp_path, ae_weight,
                                                                                         shared_stem):
    det = create_model("EfficientAD", input_size=[64, 64], run_mode="torch", students=3, ae_weight=ae_weight,
                       shared_stem=shared_stem)
    det.train(dataset_dir=demo, output=str(tmp_path / "o"), epochs_iters=2, batch_size=4)
    model, _ = load_model_dir(det.model_dir)
    assert len(model.students) == 3 and model.cfg["students"] == 3
    # with a shared stem the students' own layers start at the stem's output (stride 8), not at the image
    assert model.students[0][0].in_channels == (model.cfg["student_width"] if shared_stem else 3)
    assert len(list(model.stem.parameters())) == 2 * shared_stem
    a, b = (s[0].weight for s in model.students[:2])
    assert not torch.equal(a, b)  # each from its own initial weights
    x = _x()
    with torch.no_grad():
        st, ae = model._maps(x)
        copies = []
        for j in range(3):  # each student alone, in a copy holding only it
            copies.append(copy.deepcopy(model))
            copies[-1].students = torch.nn.ModuleList([model.students[j]])
        solos = [c._maps(x) for c in copies]
        assert torch.allclose(st, sum(m[0] for m in solos) / 3, atol=1e-6)
        assert (ae is None) == (not ae_weight)
        if ae is not None:
            assert torch.allclose(ae, sum(m[1] for m in solos) / 3, atol=1e-6)
        if not ae_weight:  # the loss is the solo losses' sum: each student learns as it would alone
            assert float(model.training_loss(x, None)) == pytest.approx(
                sum(float(c.training_loss(x, None)) for c in copies), rel=1e-5)
        ref = model.scores(x)
    for r, g in zip(ref, OnnxModel(det.model_dir).scores(x)):
        assert torch.allclose(r, g, rtol=TOL, atol=TOL * max(1.0, float(r.abs().max())))


def test_student_sees_as_far_as_its_teacher():
    """The student must see the whole patch its teacher describes, or it cannot predict it on good images."""
    model = create_model("EfficientAD", input_size=[256, 256]).model.eval()

    def reach(f) -> int:  # columns of the input that move the output's centre pixel
        x = torch.rand(1, 3, 256, 256, requires_grad=True)
        out = f(x)
        out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
        cols = x.grad.abs().sum((0, 1, 2)).nonzero()
        return int(cols.max() - cols.min() + 1)

    teacher = reach(lambda x: model.teacher(x)[-1])
    student = reach(lambda x: model.students[0](model.stem(x)))
    assert student >= 0.9 * teacher, (student, teacher)


@pytest.mark.parametrize("key,value", [("ae_weight", 1.5), ("image_topk", 1.0), ("hard_quantile", 0.2),
                                       ("students", 0), ("shared_stem", 6)])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(UadkitError, match=f"Model.{key}"):
        create_model("EfficientAD", input_size=[64, 64], **{key: value}).model  # noqa: B018


def test_a_teacher_stage_deeper_than_the_student_is_refused_in_one_line(demo, tmp_path):
    det = create_model("EfficientAD", input_size=[64, 64], layers=["stage3", "stage4"])
    assert det.model.channels == 120  # it builds (and a folder saved with such a teacher loads): training refuses
    with pytest.raises(UadkitError, match=r"'Model.layers': stage4 has stride 16.*default stage2, stage3") as e:
        det.train(dataset_dir=demo, output=str(tmp_path / "o"), epochs_iters=1, batch_size=4)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o" / "best_model").exists()


def test_resuming_a_checkpoint_of_another_shape_is_one_line_naming_the_difference(demo, tmp_path, capsys):
    from uadkit.cli import main

    base = ["-c", "configs/EfficientAD.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={demo}",
            "-o", "Model.input_size=[64,64]", "-o", "Train.epochs_iters=1", "-o", "Train.export=false"]
    one = str(tmp_path / "one")
    assert main(base + ["-o", f"Global.output={one}", "-o", "Model.students=1"]) == 0
    capsys.readouterr()
    rc = main(base + ["-o", f"Global.output={tmp_path / 'two'}", "-o", f"Train.resume_path={one}/checkpoints/last"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after the run's opening log line
    assert "Train.resume_path" in last and "Model.students=1 there" in last
    # with the config it was trained with, it resumes
    assert main(base + ["-o", f"Global.output={tmp_path / 'three'}", "-o", "Model.students=1",
                        "-o", "Train.epochs_iters=2", "-o", f"Train.resume_path={one}/checkpoints/last"]) == 0
