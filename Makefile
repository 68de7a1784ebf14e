# make demo : set up .venv, make a demo dataset, train STFPM on it, evaluate, predict (offline, CPU)
# make test : set up .venv with test extras and run the test suite
.PHONY: demo test lint setup setup-test

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh test

demo: setup
	.venv/bin/uadkit -c configs/STFPM.yaml -o Global.mode=demo -o Global.output=output/demo -o Train.epochs_iters=10

# one pytest-xdist worker per core (each on one thread, tests/conftest.py): 16.3 -> 10.5 min on 2 AVX2 cores
test: setup-test
	.venv/bin/python -m pytest -q -n auto

lint: setup-test
	.venv/bin/ruff check uadkit tests benchmarks
