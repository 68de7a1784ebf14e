import os

import pytest

from uadkit.cli import main
from uadkit.data.demo import make_demo_dataset

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


def pytest_configure(config) -> None:
    # `make test` runs one pytest-xdist worker per core: each computes on one thread (and so do the processes
    # it starts), so the workers together use the cores once instead of each asking torch for all of them
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


SMALL = ["-o", "Model.input_size=[128,128]", "-o", "Train.batch_size=4", "-o", "Train.epochs_iters=6"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_test_good=4, n_test_defect=3, size=128)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_dir) -> str:
    """Output folder of a real STFPM training run through the CLI (shared: training is the slow part)."""
    out = str(tmp_path_factory.mktemp("train_out"))
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={demo_dir}",
               "-o", f"Global.output={out}", *SMALL])
    assert rc == 0
    return out


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the session (Debian's package); skipped only where it is not installed."""
    from pg_server import pg_bin, postgres_server

    if pg_bin() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install Debian's postgresql (scripts/setup.sh test does)")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql; scripts/setup.sh test installs it)")
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server, request):
    """A fresh, empty database on the session's PostgreSQL server."""
    import re
    import uuid

    from pg_server import create_database

    name = re.sub(r"\W", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    return create_database(pg_server, name)
