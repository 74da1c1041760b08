"""Process-group setup for torchrun-compatible multi-process training (DDP).

``torchrun --nproc_per_node N ...`` (or any launcher) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them
through ``init_method="env://"``. Backend: ``nccl`` when the process trains on CUDA, ``gloo``
otherwise. A process without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) runs single-process
and never touches ``torch.distributed``.

Network exposure: when the launcher did not set ``MASTER_ADDR`` (a hand-rolled single-node
launch with ``RANK``/``WORLD_SIZE``/``MASTER_PORT`` only), :func:`init_distributed` uses
``127.0.0.1``, so rank 0's rendezvous store listens on loopback only, not on every interface.
``torchrun`` always sets ``MASTER_ADDR`` itself and its own store binds according to its
flags: for single-node runs prefer ``torchrun --standalone`` or
``torchrun --master_addr 127.0.0.1 --master_port PORT ...`` (static rendezvous), or
``--rdzv-backend c10d --rdzv-endpoint localhost:PORT``; multi-node runs need a reachable
address and should run on a trusted network (the store and gloo/nccl traffic are not
authenticated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from celltwin.errors import ConfigError

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "is_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` in ``[0, world_size)``, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from the environment (idempotent) and pick the device.

    ``device``: ``"auto"`` (CUDA ``cuda:LOCAL_RANK`` when available, else CPU), ``"cpu"``,
    ``"cuda"`` or an explicit ``"cuda:K"``. With ``WORLD_SIZE > 1`` the group is created with
    ``nccl`` on CUDA and ``gloo`` on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        _default_loopback_master()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    elif device == "cuda":
        dev = torch.device(f"cuda:{local}")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def _default_loopback_master() -> None:
    """Single-node defaults for ``env://``: ``MASTER_ADDR=127.0.0.1`` when unset; ``MASTER_PORT`` required."""
    if not os.environ.get("MASTER_ADDR"):
        os.environ["MASTER_ADDR"] = "127.0.0.1"  # loopback: never expose the store on all interfaces
    if not os.environ.get("MASTER_PORT"):
        msg = (
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but MASTER_PORT is not set: launch with torchrun "
            f"(e.g. torchrun --standalone --nproc_per_node N ...) or set MASTER_PORT to a free port"
        )
        raise ConfigError(msg)


def cleanup_distributed() -> None:
    """Destroy the process group if one is active."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all ranks (same keys on every rank, sorted order)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (one tiny all-reduce in DDP)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
