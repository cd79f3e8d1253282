"""Process-group setup for plain ``python`` and ``torchrun`` launches."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, local rank, world size and its device."""

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


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise ``torch.distributed`` when launched by torchrun (``WORLD_SIZE`` set).

    nccl on CUDA, gloo on CPU. ``device="auto"`` picks CUDA when available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None,
                                **_restart_store(rank, world, timeout))
        log.info("initialised %s process group: rank %d of %d", backend, rank, world)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def _restart_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """After a torchrun restart, the process group's store under a prefix of its own (as keyword arguments
    for ``init_process_group``; empty otherwise).

    torchrun keeps the store it hosts across worker restarts, and the process group writes its keys (the
    workers' gloo/nccl addresses, barrier counters) under the same names each time: a restarted worker
    could read a dead worker's address (connection refused) or a stale barrier count (a hang).
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"asit/attempt_{restart}", agent_store), "rank": rank, "world_size": world}


def cleanup_distributed() -> None:
    """Destroy the process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
