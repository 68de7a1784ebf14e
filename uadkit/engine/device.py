"""`Global.device` strings (cpu, gpu, gpu:0, gpu:0,1) -> torch devices; full fp32 while scoring on a GPU;
`Train.precision` -> the arithmetic of training steps."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import UadkitError


def _flushing() -> bool:
    return float(torch.tensor([1e-39]) * 1.0) == 0.0  # a one-element op runs in the calling thread


def _kept() -> bool:
    return os.environ.get("UADKIT_DENORMALS", "").strip().lower() == "keep"


def flush_subnormals() -> bool:
    """Start torch's intra-op threads with float numbers below the smallest normal one (1.2e-38) read and
    written as zero, leaving the calling thread as it was; `import uadkit` calls it, before torch's first
    parallel operation, since threads inherit the mode they start with (a pool that had already started keeps
    its mode). Returns False where the CPU cannot or with UADKIT_DENORMALS=keep. Training sets it in its own
    thread too, for its duration (`subnormals_flushed`).

    Why: Adam's moments of weights that stop getting gradients (ReLU channels that never fire) decay
    geometrically towards zero, the weights follow, and x86 computes with subnormal numbers many times slower:
    EfficientAD with four students on screw went from 10.5 to 50 s an epoch within six epochs, from epoch 37 (0
    subnormal weights at epoch 36, 17,820 at 43). Set at training time, it covers only the calling thread (half
    of a two-thread multiply flushed, and that four-student run slowed from epoch 43 instead). Zeroing subnormal
    weights and optimiser state after every step did not cure it either: the default pair still went from 5.5
    to 19 s an epoch from epoch 40. The calling thread keeps IEEE arithmetic outside training: other code in the
    process may rely on it (hypothesis refuses to run without it)."""
    if _kept():
        return False
    before = _flushing()
    if not torch.set_flush_denormal(True):
        return False
    torch.empty(1 << 17).fill_(0.0)  # a parallel operation: torch's pool starts now, in this mode
    torch.set_flush_denormal(before)
    return True


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Subnormal floats read and written as zero in this thread while inside (training), as before after."""
    if _kept():
        yield
        return
    before = _flushing()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def parse_devices(spec: str) -> list[torch.device]:
    spec = str(spec).strip().lower()
    if spec == "cpu":
        return [torch.device("cpu")]
    kind, _, ids = spec.partition(":")
    if kind not in ("gpu", "cuda"):
        raise UadkitError(f"Global.device: expected cpu, gpu, gpu:0 or gpu:0,1, got {spec!r}")
    if not torch.cuda.is_available():
        raise UadkitError(f"Global.device={spec}: no CUDA GPU is available here; use Global.device=cpu")
    try:
        idx = [int(i) for i in ids.split(",")] if ids else [0]
    except ValueError as e:
        raise UadkitError(f"Global.device: bad GPU list in {spec!r}") from e
    bad = [i for i in idx if i >= torch.cuda.device_count()]
    if bad:
        raise UadkitError(f"Global.device={spec}: GPU {bad[0]} does not exist ({torch.cuda.device_count()} found)")
    return [torch.device(f"cuda:{i}") for i in idx]


def main_device(spec: str) -> torch.device:
    return parse_devices(spec)[0]


_fp32_lock = threading.Lock()
_fp32_users = 0
_fp32_saved: list[tuple[Any, str, Any]] = []


def _precision_flags() -> list[tuple[Any, str, Any]]:
    """(object, attribute, full-fp32 value) for GPU convolutions and matrix products. The legacy switches keep
    every getter of torch's flags working while they are set; torch >= 2.9 refuses to read them once its newer
    per-operator API has been used with different values, and then that API is used instead."""
    b = torch.backends
    legacy = [(b.cudnn, "allow_tf32", False), (b.cuda.matmul, "allow_tf32", False)]
    try:
        for obj, name, _ in legacy:
            getattr(obj, name)
        return legacy
    except RuntimeError:  # "a mix of the legacy and new APIs"
        return [(b.cudnn.conv, "fp32_precision", "ieee"), (b.cuda.matmul, "fp32_precision", "ieee")]


@contextlib.contextmanager
def full_fp32(device: torch.device | str) -> Iterator[None]:
    """Scoring on a GPU in full fp32, not TF32 (torch's default for convolutions): the calibrated thresholds
    then mean the same on a GPU as on the CPU and in the exported runtimes (on an H100 TF32 moved normalised
    scores by up to 0.0055, fp32 by 3e-6). The flags are process-wide: they stay set while any thread is
    inside and are restored when the last one leaves. Training steps run inside too unless `Train.precision`
    asks for tf32 or bf16."""
    global _fp32_users, _fp32_saved
    if torch.device(device).type != "cuda":
        yield
        return
    with _fp32_lock:
        if _fp32_users == 0:
            flags = _precision_flags()
            _fp32_saved = [(obj, name, getattr(obj, name)) for obj, name, _ in flags]
            for obj, name, value in flags:
                setattr(obj, name, value)
        _fp32_users += 1
    try:
        yield
    finally:
        with _fp32_lock:
            _fp32_users -= 1
            if _fp32_users == 0:
                for obj, name, value in reversed(_fp32_saved):
                    setattr(obj, name, value)


PRECISIONS = ("fp32", "tf32", "bf16", "auto")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates it,
    slower than fp32."""
    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a fit time or an images/s figure depends on, kept with it (train_result.json, benchmarks): an
    EfficientAD epoch on screw took 16.6-17 s on a 2-core AVX2 EPYC against 5.2-5.5 s on the 2-core machine
    of the same morning; a step is convolutions, which run at the CPU's widest vector instructions."""
    info: dict[str, Any] = {"cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "native_bf16": native_bf16(),
                            "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def training_precision(precision: str, device: torch.device) -> str:
    """`Train.precision` -> fp32 | tf32 | bf16. fp32 is full fp32 on a GPU too, so a step computes what the
    CPU's does up to rounding (later steps amplify rounding on any two machines); tf32 (torch's default for GPU
    convolutions) is fp32 on a CPU, which has no TF32. auto: bf16 on a CPU that has it in hardware, tf32 on a
    GPU, fp32 elsewhere (bf16 on a GPU is unmeasured, so it is asked for by name). EfficientAD's step on 2 bf16
    cores: 131 -> 61 ms, but each of four students came out 0.012-0.025 image AUROC weaker (README): opt-in."""
    gpu = device.type == "cuda"
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16() else "tf32" if gpu else "fp32"
    return "fp32" if precision == "tf32" and not gpu else precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for a training step: convolutions in bfloat16 under fp32 master weights (torch's
    autocast keeps losses, norms and reductions in fp32); a no-op for fp32 and tf32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
