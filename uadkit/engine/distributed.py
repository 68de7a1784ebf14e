"""Several processes on PyTorch's own engine (torch.distributed): gloo on CPU; on GPUs nccl for CUDA tensors and
gloo for CPU ones.

- `Global.num_processes=N` on CPU, or `Global.device=gpu:0,1`, makes the CLI/API spawn one worker per
  process/device on this machine (rendezvous on 127.0.0.1, a free port).
- Under `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR in the environment) each process joins that group
  instead, so the same command scales to several machines.
A crashed worker ends the whole job with an error naming the rank; collectives time out after
`Global.dist_timeout_s` rather than hang.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..errors import UadkitError
from .device import parse_devices


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, ids: list[int]) -> list[int]:
        """This rank's part of a list of sample indices (every world-th, starting at rank)."""
        return ids[self.rank::self.world]

    def sum(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather_in_order(self, part: torch.Tensor | None, n_total: int) -> torch.Tensor | None:
        """Inverse of `shard`: rows from every rank back in the original sample order, on rank 0.

        A rank whose share is empty (a last batch with fewer samples than ranks) sends None."""
        if not self.active:
            return part
        parts: list[Any] = [None] * self.world if self.is_main else None
        dist.gather_object(None if part is None else part.cpu(), parts, dst=0)
        if not self.is_main:
            return None
        first = next(p for p in parts if p is not None)
        out = torch.empty((n_total, *first.shape[1:]), dtype=first.dtype)
        for r, p in enumerate(parts):
            if p is not None:
                out[r::self.world] = p
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = DistContext()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: each process's gradient is the sum of every process's (torch's
    own, torch.distributed.nn.functional.all_reduce, is deprecated without an autograd successor)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _SyncedBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch, over every process.

    torch's SyncBatchNorm runs on GPUs only; on CPU each of N processes would normalise by its own 1/N of the
    batch, and a loss that picks each image's worst positions (STFPM's) then follows other positions than one
    process would. Two differentiable all-reduces per layer (the sum and count, then the squared deviations from
    the global mean) make N processes compute what one does, up to the order of float sums."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims, dtype = [0, 2, 3], x.dtype
        x = x.float()  # statistics in fp32, as torch's BatchNorm keeps them under autocast
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])]))
        count = total[-1]
        mean = total[:-1] / count
        centred = x - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (count / (count - 1).clamp(min=1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(dtype)


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, ctx: DistContext) -> Iterator[None]:
    """While training on several processes, every trainable BatchNorm2d of `model` uses the global batch's
    statistics. The modules change class in place (parameters, buffers and the optimiser's references stay)
    and change back afterwards, so what is saved and exported is plain BatchNorm."""
    swapped = [m for m in model.modules() if type(m) is nn.BatchNorm2d
               and any(p.requires_grad for p in m.parameters())] if ctx.active else []  # not frozen teachers
    for m in swapped:
        m.__class__ = _SyncedBatchNorm
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = nn.BatchNorm2d


def requested_world(cfg: dict) -> int:
    devices = str(cfg["Global"]["device"])
    if devices.startswith(("gpu", "cuda")) and "," in devices:
        return len(devices.split(":", 1)[1].split(","))
    return int(cfg["Global"]["num_processes"]) if devices == "cpu" else 1


def in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(cfg: dict) -> DistContext:
    """Join the process group torchrun (or our spawner) described in the environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    devices = parse_devices(cfg["Global"]["device"])
    gpu = devices[0].type == "cuda"
    device = devices[local % len(devices)] if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # on GPUs, NCCL for CUDA tensors (DDP's gradients) and gloo for CPU ones (the epoch's loss sums, fitted
        # features gathered in order): a plain NCCL group refuses CPU tensors
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg["Global"]["dist_timeout_s"]))
        # A group still alive at interpreter shutdown can abort the process (gloo's threads meet a half torn-down
        # interpreter: "terminate called without an active exception", SIGABRT). Under torchrun nobody else
        # destroys it, so do it while the interpreter is whole; a no-op where the spawned worker already did.
        atexit.register(_destroy_group)
    if not gpu:
        # N processes share the cores: give each its slice rather than N x all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return DistContext(rank, world, device)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[[dict, DistContext], Any], cfg: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    ctx = init_from_env(cfg)
    # fault injection, to test that a worker that dies (RANK) or raises (RANK:raise) stops the job
    fault = os.environ.get("UADKIT_FAULT_RANK", "").split(":")
    if fault[0] == str(rank) and len(fault) == 1:
        os._exit(3)
    try:
        if fault == [str(rank), "raise"]:
            raise RuntimeError("injected fault")
        fn(cfg, ctx)
    except UadkitError:
        raise
    except Exception as e:  # keep the traceback: the parent only sees the message
        raise RuntimeError(f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
    finally:
        _destroy_group()


def spawn(fn: Callable[[dict, DistContext], Any], cfg: dict, world: int) -> None:
    """Run fn(cfg, ctx) in `world` local processes; any worker failing stops them all."""
    parse_devices(cfg["Global"]["device"])  # a device that is not there: one line here, not N failing workers
    procs = mp.start_processes(_worker, args=(world, _free_port(), fn, cfg), nprocs=world, join=False,
                               start_method="spawn")
    try:
        while not procs.join():
            pass
    except mp.ProcessRaisedException as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith(("RuntimeError: rank", "uadkit.errors.UadkitError"))),
                   lines[-1] if lines else str(e))
        raise UadkitError(f"a worker process failed (rank {e.error_index}), job stopped: {why}") from e
    except mp.ProcessExitedException as e:
        raise UadkitError(f"a worker process died (exit code {e.exit_code}, rank {e.error_index}); "
                          "job stopped") from e
    finally:
        # torch leaves a failed worker's traceback file in the temp folder after reading it
        for path in procs.error_files:
            with contextlib.suppress(OSError):
                os.remove(path)
