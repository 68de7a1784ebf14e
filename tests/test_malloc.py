"""Gradient training reuses freed memory (engine/malloc.py): after it (CLI or library), a large block freed and
allocated again comes from the process's heap, not from fresh pages the kernel must fault in; a fitted model's
run leaves glibc's defaults. Measured with the process's page faults, in a fresh interpreter each time (the
setting is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

PROBE = r"""
import resource, sys, torch
how, model, data, out = sys.argv[1:]
if how == "cli":
    from uadkit.cli import main
    assert main(["-o", f"Global.model={model}", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={data}",
                 "-o", f"Global.output={out}", "-o", "Model.input_size=[64,64]", "-o", "Train.epochs_iters=1",
                 "-o", "Train.batch_size=4", "-o", "Train.export=false"]) == 0
else:
    from uadkit import create_model
    create_model(model, input_size=[64, 64]).train(dataset_dir=data, output=out, epochs_iters=1, batch_size=4,
                                                   export=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    # 128 MB: over glibc's largest mmap threshold and over what its default trimming leaves free at the heap's
    # top, so by default mapped and unmapped each time
    torch.ones(128 << 18)
from uadkit.engine import malloc
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, malloc._done)
"""

PAGES = 10 * (128 << 20) // os.sysconf("SC_PAGE_SIZE")  # what 10 fresh 128 MB blocks fault in


def _probe(how: str, model: str, data: str, out: str, **env: str) -> tuple[int, str]:
    """(page faults of the large blocks after the run, whether the run switched the allocator: True/False/None)"""
    run = subprocess.run([sys.executable, "-c", PROBE, how, model, data, out], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    faults, switched = run.stdout.split()[-2:]
    return int(faults), switched


@pytest.mark.parametrize("how", ["cli", "library"])
def test_gradient_training_reuses_freed_memory_and_system_opts_out(how, demo_dir, tmp_path):
    on = _probe(how, "STFPM", demo_dir, str(tmp_path / "on"))[0]
    off = _probe(how, "STFPM", demo_dir, str(tmp_path / "off"), UADKIT_MALLOC="system")[0]
    assert off > 0.9 * PAGES, (on, off)  # glibc's default: every block fresh pages
    assert on < 0.2 * PAGES, (on, off)  # reused: about the first block's pages only


def test_a_fitted_model_keeps_glibcs_defaults(demo_dir, tmp_path):
    """PaDiM peaked 1.7 GB higher on screw with the heap keeping its freed blocks: its fit never switches the
    allocator (asked directly: after a fit the heap's own free memory can serve a block without new pages)."""
    assert _probe("cli", "PaDiM", demo_dir, str(tmp_path / "padim"))[1] == "None"
