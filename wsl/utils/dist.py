"""Distributed data parallel helpers: one process per device, launched by ``torchrun``.

``torchrun --nproc_per_node N -m wsl train ...`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the process group
(NCCL on CUDA, gloo on CPU). Without them every helper here degrades to the single-process answer, so
training code calls them unconditionally.

Rank-0-only side effects (files, logs, progress bars) go through :func:`is_main` in one place each;
``print`` is never replaced.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_JOINED = False  # whether this process ever joined a process group (see joined_a_group)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``device`` is the one device this rank trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """World size announced by the launcher (1 when not launched by ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank; before (or after) the process group exists, the launcher's ``RANK``."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the only rank that writes files and logs."""
    return get_rank() == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. An explicit ``cuda``
    without a CUDA build or device is a user mistake, reported as such."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group announced by ``torchrun`` (if any) and pick this rank's device.

    Idempotent: a second call (e.g. a second training run in the same process) reuses the group.
    """
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        global _JOINED
        _JOINED = True
        log.debug("rank %d/%d joined the %s process group on %s", dist.get_rank(), world, backend, dev)
    elif world <= 1 and dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank=get_rank(), local_rank=local_rank, world_size=get_world_size(), device=dev)


def joined_a_group() -> bool:
    """Whether this process ever joined a process group. A process that did should end with
    ``os._exit`` once its output is flushed (what ``wsl``'s command line does): gloo's worker threads
    can still hold tensors when the interpreter is torn down, and releasing them then aborts the
    process (SIGABRT, "terminate called without an active exception") after its work succeeded, or
    after its one error line when a peer died (pytorch/pytorch#179291, #190489)."""
    return _JOINED


def cleanup() -> None:
    """Leave the process group (safe to call when there is none)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; ``t`` itself is left alone)."""
    if not is_initialized():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (ranks may hold different lengths).

    Goes through ``all_gather_object`` on CPU tensors so it works with gloo and NCCL alike; meant for
    validation outputs (scores of a few thousand images), not for per-step traffic.
    """
    if not is_initialized():
        return t
    parts: List[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat([p for p in parts], dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (the object itself when not distributed)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """One picklable object from every rank, in rank order (``[obj]`` when not distributed)."""
    if not is_initialized():
        return [obj]
    out: List[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def log_main(logger: logging.Logger, level: int, msg: str, *args: Any) -> None:
    """Log on rank 0 only: the single place where "only the main process talks" is decided."""
    if is_main():
        logger.log(level, msg, *args)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, but the forward then updates each rank's
    copy with its own batch, so after training the ranks disagree slightly; evaluating (or saving)
    after this call uses rank 0's model everywhere.
    """
    if is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf.data, src=src)
