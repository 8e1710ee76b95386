"""Multi-process evaluation under ``torchrun``: one rank per device, metrics reduced.

``torchrun --nproc_per_node N -m spikekernels.evaluate ...`` sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; ``setup`` then joins the process group (NCCL when the ranks run on CUDA
devices, gloo on CPU) and puts rank ``r`` on ``cuda:LOCAL_RANK`` (or the CPU). Every rank
keeps its model, SNN and neuron state on its own device.

Sharding (``shard``): rank ``r`` of ``W`` takes indices ``r, r + W, r + 2W, ...``: every
image exactly once, no padding (unlike ``DistributedSampler``'s default, which repeats images
to even the shards out). Metrics are integer counts reduced with ``all_reduce`` (sum, or max
for per-sample constants), so the merged figures equal a single-process run's whenever each
sample's computation does not depend on the batch it sits in (always in exact mode; in float
mode BLAS may round a batch's matmuls differently at another batch size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup", "shard"]


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # this run created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cuda" if self.backend == "nccl" else "cpu")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (returned on ``t``'s device)."""
        if not self.distributed:
            return t
        c = self._comm(t).clone()
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        return c.to(t.device)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        c = self._comm(t).clone()
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
        return c.to(t.device)

    def sum_ints(self, values: list[int]) -> list[int]:
        return self.sum(torch.tensor(values, dtype=torch.int64)).tolist() if values else []

    def max_ints(self, values: list[int]) -> list[int]:
        return self.max(torch.tensor(values, dtype=torch.int64)).tolist() if values else []

    def max_float(self, value: float) -> float:
        return float(self.max(torch.tensor([value], dtype=torch.float64))[0])

    def gather_lists(self, items: list) -> list:
        """The concatenation of every rank's ``items`` (picklable), in rank order."""
        if not self.distributed:
            return list(items)
        out: list = [None] * self.world
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's ``module`` (same architecture)."""
        if not self.distributed:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            c = self._comm(t.detach())
            c = c.clone() if c.data_ptr() == t.data_ptr() else c
            dist.broadcast(c, src=0)
            with torch.no_grad():
                t.copy_(c.to(t.device))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _pick_device(name: str | None, local_rank: int) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:  # "gpu", "cuda:x", 3: torch's own message
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(device)
    return device


def setup(device: str | None = None) -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); else one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    else:
        backend = dist.get_backend()
    return DistContext(rank, world, dev, backend, owns)


def shard(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s indices of ``range(n)``: ``rank::world`` (no duplicates, no padding)."""
    return list(range(rank, n, world))
