"""Device and precision selection, seeding, and the torchrun (distributed) glue."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import lru_cache

from vitcli.errors import VitcliError


def pick_device(name: str):
    """auto -> cuda, then mps, then cpu; an explicit device that is missing is an error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info().local_rank if dist_info().world_size > 1 else 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VitcliError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
        idx = int(name[5:]) if ":" in name else (dist_info().local_rank if dist_info().world_size > 1 else 0)
        if idx >= torch.cuda.device_count():
            raise VitcliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", idx)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise VitcliError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    return torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix multiplies run about twice as fast as fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(name: str, device) -> tuple[str, str]:
    """(precision, why) where precision is fp32 | bf16 | fp16."""
    import torch

    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise VitcliError("'train.precision' fp16 is not supported on CPU; use bf16 or fp32")
        return name, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA GPU with bf16 support"
        return "fp16", "CUDA GPU without bf16: fp16 with a grad scaler"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16", "CPU with AVX-512 BF16/AMX"
    return "fp32", f"no fast half precision on {device.type}"


def autocast(device, precision: str):
    """The autocast context for the chosen precision (a no-op for fp32)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All random states as tensors and plain values (loads with weights_only=True)."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
    return info
