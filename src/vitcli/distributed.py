"""torchrun glue: joining the process group, summing counters over ranks, agreeing to stop, and checking that
every rank ends with the same weights. Every function is a no-op in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

from vitcli.errors import VitcliError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def dist_info() -> DistInfo:
    """Rank information from torchrun's environment variables."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def weights_digest(state_dict: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict: equal digests = equal weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def init_distributed(device) -> DistInfo:
    """Join the process group when started by torchrun: nccl on CUDA, gloo otherwise."""
    import torch.distributed as dist

    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        import atexit

        # leave the group before interpreter teardown: exiting with live gloo threads aborts the process
        # ("terminate called without an active exception", SIGABRT) and torchrun reports the run as failed
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return info


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce_sums(values: list[float], device) -> list[float]:
    """Element-wise sums over ranks (float64)."""
    import torch
    import torch.distributed as dist

    if not _active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device) -> float:
    """The largest value over ranks (e.g. the slowest step time, so every rank fits the same plan)."""
    import torch
    import torch.distributed as dist

    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: int, device) -> int:
    """The largest flag of any rank: a stop asked for in one process stops all of them at the same batch."""
    import torch
    import torch.distributed as dist

    if not _active():
        return flag
    t = torch.tensor([flag], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_buffers(module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics): each rank's last forward updated its own."""
    import torch.distributed as dist

    if _active():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier() -> None:
    import torch.distributed as dist

    if _active():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's value (anything picklable) on every rank."""
    import torch.distributed as dist

    if not _active():
        return value
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def leave() -> None:
    """Every rank waits for the others to finish (rank 0 writes the report and summary), then leaves the group.

    A rank that exits while its peer is still working tears down gloo's threads under live traffic and aborts
    ("terminate called without an active exception", SIGABRT), which torchrun reports as a failed run."""
    import torch.distributed as dist

    if _active():
        dist.barrier()
        dist.destroy_process_group()


def check_replicas(state_dict: dict[str, Any], world: int) -> str:
    """Every process must end with the same weights; returns the shared sha256."""
    import torch.distributed as dist

    digest = weights_digest(state_dict)
    if not _active():
        return digest
    digests: list = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise VitcliError(f"the {world} processes ended with different weights (sha256 per rank: "
                          f"{', '.join(d[:12] for d in digests)}); please report this")
    return digest
