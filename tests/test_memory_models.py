"""PatchCore and PaDiM: one fitting pass, same API/CLI/results as STFPM."""

import json
import os

import numpy as np
import pytest
import torch

from uadkit import create_model
from uadkit.cli import main
from uadkit.errors import UadkitError
from uadkit.models.patchcore import greedy_coreset, nearest


@pytest.fixture(scope="module", params=["PatchCore", "PaDiM"])
def fitted(request, demo_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param))
    rc = main(["-c", f"configs/{request.param}.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={demo_dir}",
               "-o", f"Global.output={out}", "-o", "Model.input_size=[128,128]"])
    assert rc == 0
    return request.param, out


def test_fit_predict_defects_score_higher(fitted, demo_dir):
    name, out = fitted
    res = json.load(open(os.path.join(out, "train_result.json")))
    assert res["model"] == name and res["done_flag"]
    model = create_model(model_dir=os.path.join(out, "best_model"))
    assert model.name == name
    results = list(model.predict(os.path.join(demo_dir, "test"), batch_size=4))
    good = [r["pred_score"] for r in results if "/good/" in r["input_path"]]
    bad = [r["pred_score"] for r in results if "/good/" not in r["input_path"]]
    assert np.mean(bad) > np.mean(good)
    assert all(r["anomaly_map"].shape == (128, 128) for r in results)


def test_save_load_round_trip_identical_scores(fitted, demo_dir, tmp_path):
    name, out = fitted
    a = create_model(model_dir=os.path.join(out, "best_model"))
    a.save(str(tmp_path / "copy"))
    b = create_model(name, model_dir=str(tmp_path / "copy"))
    ra = list(a.predict(os.path.join(demo_dir, "test/stain")))
    rb = list(b.predict(os.path.join(demo_dir, "test/stain")))
    assert [r["raw_score"] for r in ra] == [r["raw_score"] for r in rb]
    assert all(np.array_equal(x["anomaly_map"], y["anomaly_map"]) for x, y in zip(ra, rb))


def test_evaluate_mode_works_for_memory_models(fitted, demo_dir, tmp_path):
    name, out = fitted
    rc = main(["-c", f"configs/{name}.yaml", "-o", "Global.mode=evaluate", "-o", f"Global.dataset_dir={demo_dir}",
               "-o", f"Evaluate.model_dir={out}/best_model", "-o", f"Global.output={tmp_path}"])
    assert rc == 0
    ev = json.load(open(tmp_path / "evaluate_result.json"))
    assert ev["model"] == name and ev["image"]["auroc"] > 0.5 and ev["pixel"]["aupro"] is not None


def _radius(x, chosen):
    return float(torch.cdist(x, x[chosen]).min(1).values.max())


def test_greedy_coreset_size_uniqueness_and_radius_beats_random():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(900, 16, generator=g), torch.randn(100, 16, generator=g) * 0.2 + 6])
    idx = greedy_coreset(x, 50, proj_dim=0)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    rand = torch.randperm(len(x), generator=g)[:50]
    assert _radius(x, idx) <= _radius(x, rand)
    # through a random projection it stays a good k-center solution
    assert _radius(x, greedy_coreset(x, 50, proj_dim=8)) <= _radius(x, rand) * 1.2


def test_nearest_is_exact_and_chunked():
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(300, 8, generator=g), torch.randn(500, 8, generator=g)
    d, i = nearest(q, bank, k=3, chunk=64)
    ref = torch.cdist(q, bank).topk(3, largest=False)
    assert torch.equal(i, ref.indices) and torch.allclose(d, ref.values, atol=1e-4)


def test_patchcore_memory_is_bounded_by_groups(demo_dir, tmp_path):
    m = create_model("PatchCore", input_size=[64, 64], coreset_group=4, coreset_ratio=0.25)
    res = m.train(dataset_dir=demo_dir, output=str(tmp_path), batch_size=4)
    info = res["train"]
    patches_per_image = info["patches"] // info["images"]
    dims = info["memory_bank"][1]
    assert info["memory_bank"][0] == pytest.approx(0.25 * info["patches"], rel=0.05)
    # never more than one group of raw patches plus the reduced bank in memory
    bound = (4 * patches_per_image + info["memory_bank"][0]) * dims * 4 / 1e6
    assert info["peak_feature_mb"] <= bound + 0.01
    assert info["peak_feature_mb"] < info["patches"] * dims * 4 / 1e6


def test_bad_model_settings():
    with pytest.raises(UadkitError, match="coreset_ratio"):
        create_model("PatchCore", coreset_ratio=0)
    with pytest.raises(UadkitError, match="unknown setting 'coreset_ratio'"):
        create_model("PaDiM", coreset_ratio=0.1)


def test_patchcore_bank_is_capped_while_fitting(demo_dir, tmp_path):
    m = create_model("PatchCore", input_size=[64, 64], coreset_group=2, coreset_ratio=0.5, max_bank_size=100)
    info = m.train(dataset_dir=demo_dir, output=str(tmp_path), batch_size=2)["train"]
    dims = info["memory_bank"][1]
    assert info["memory_bank"][0] == 100
    # one group of raw patches (2 images x 64 patches) + at most 2 x cap kept rows, never the whole data
    assert info["peak_feature_mb"] <= (2 * 64 + 2 * 100 + 64) * dims * 4 / 1e6
