"""PatchCore's bank search: the HNSW graph against the exact search on a fixed data set."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from uadkit.errors import UadkitError
from uadkit.models.search import BankSearch, nearest


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """Patch-feature-like rows: a few dimensions of variation (as image patches have) bent into `dim` by a fixed
    nonlinear map, in 32 clusters of different spread, plus a little isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(1234)  # the same map and clusters for bank and queries
    centres = torch.randn(32, 8, generator=fixed) * 3
    lift = torch.randn(8, dim, generator=fixed)
    which = torch.randint(32, (n,), generator=g)
    spread = torch.rand(32, 1, generator=fixed) + 0.3
    z = centres[which] + torch.randn(n, 8, generator=g) * spread[which]
    return (torch.tanh(z @ lift / 3) * 4 + 0.05 * torch.randn(n, dim, generator=g)).float()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return clustered(20000, 96, 0), clustered(3000, 96, 1)


def test_hnsw_finds_the_true_nearest_row(data):
    bank, query = data
    exact_d, exact_i = nearest(query, bank)
    d, i = BankSearch("hnsw", ef_search=32)(query, bank)
    recall = float((i == exact_i).float().mean())
    assert recall >= 0.99, recall
    # a found row is a real bank row: its distance is never below the true nearest one, and equals it when found
    assert bool((d >= exact_d - 1e-3).all())
    hit = (i == exact_i)[:, 0]
    assert torch.allclose(d[hit], exact_d[hit], rtol=1e-4, atol=1e-3)
    # a wider search finds more (the trade-off the search_ef key sets)
    _, i_narrow = BankSearch("hnsw", ef_search=2)(query, bank)
    assert float((i_narrow == exact_i).float().mean()) <= recall


def test_hnsw_is_the_same_in_every_build_and_follows_bank_changes(data):
    bank, query = data
    a, b = BankSearch("hnsw"), BankSearch("hnsw")
    da, ia = a(query, bank)
    db, ib = b(query, bank)
    assert torch.equal(ia, ib) and torch.equal(da, db)  # single-threaded build: equal in every process
    bank2 = bank.clone()
    bank2[:] = bank2.flip(0)  # rows reordered in place: the cached graph must not answer for it
    d2, i2 = a(query, bank2)
    # answered from a graph of the new rows: each returned index is a row of bank2 at the returned distance
    assert torch.allclose((query - bank2[i2[:, 0]]).norm(dim=1), d2[:, 0], rtol=1e-4, atol=1e-3)
    assert float((i2 == nearest(query, bank2)[1]).float().mean()) >= 0.99


def test_search_keys_and_missing_package_errors():
    with pytest.raises(UadkitError, match="Model.search.*exact, hnsw"):
        BankSearch("annoy")
    with pytest.raises(UadkitError, match="Model.search_ef"):
        BankSearch("hnsw", ef_search=0)
    code = ("import sys; sys.modules['faiss'] = None\n"
            "from uadkit.models.search import BankSearch\n"
            "from uadkit.errors import UadkitError\n"
            "BankSearch('exact')\n"
            "try:\n    BankSearch('hnsw')\nexcept UadkitError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install faiss-cpu" in out.stdout and "Model.search=exact" in out.stdout


def test_exact_maximum_makes_each_images_largest_distance_exact(data):
    from uadkit.models.search import exact_maximum

    bank, query = data
    emb = query[:2400].reshape(3, 800, -1)
    exact_d, _ = nearest(emb.reshape(-1, emb.shape[-1]), bank)
    exact_d = exact_d[:, 0].reshape(3, 800)
    d, i = BankSearch("hnsw", ef_search=1)(emb.reshape(-1, emb.shape[-1]), bank)  # a poor search: many misses
    d, i = d[:, 0].reshape(3, 800), i[:, 0].reshape(3, 800)
    assert bool((d.amax(1) > exact_d.amax(1) + 1e-3).any())  # the approximate maxima are wrong here
    fixed, fixed_i = exact_maximum(emb, d, i, bank)
    assert torch.allclose(fixed.amax(1), exact_d.amax(1), rtol=1e-5, atol=1e-4)
    top = fixed.argmax(1)
    assert torch.allclose((emb[torch.arange(3), top] - bank[fixed_i[torch.arange(3), top]]).norm(dim=1),
                          exact_d.amax(1), rtol=1e-4, atol=1e-3)
    assert bool((fixed <= d * (1 + 1e-4) + 1e-3).all())  # only ever lowered (to the exact value, up to rounding)


def test_patchcore_image_scores_equal_under_hnsw_and_exact_search(tmp_path):
    """The image score of PatchCore with the default HNSW search equals the exact search's on the same bank."""
    import numpy as np

    from uadkit import create_model
    from uadkit.data.demo import make_demo_dataset
    from uadkit.data.image_io import list_images, load_image, prepare_image

    make_demo_dataset(tmp_path / "d", n_train=16, n_test_good=4)
    det = create_model("PatchCore", input_size=[64, 64])
    det.train(dataset_dir=str(tmp_path / "d"), output=str(tmp_path / "o"), **{"Train.export": False})
    model = det.model
    assert model.search.kind == "hnsw"
    paths = list_images(str(tmp_path / "d" / "test"))
    x = torch.from_numpy(np.stack([prepare_image(load_image(p), (64, 64)) for p in paths]))
    with torch.no_grad():
        amap_h, score_h = model(x)
        model.search = BankSearch("exact")
        amap_e, score_e = model(x)
    assert torch.allclose(score_h, score_e, rtol=1e-5, atol=1e-4)
    assert float((amap_h - amap_e).abs().max()) <= 0.05 * float(amap_e.max())  # maps: a few near misses only
