"""Device and precision selection, attention path, seeding and RNG state (torchrun glue: distributed.py)."""

from __future__ import annotations

import os
import random
from functools import lru_cache

from vitcli.errors import VitcliError, shown

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_device_args(device: str, precision: str | None = None) -> None:
    """--device / --precision spelled right (before any work; no torch import)."""
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise VitcliError(f"--device {shown(device)} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if precision is not None and precision not in PRECISIONS:
        raise VitcliError(f"--precision {shown(precision)} is not valid; use one of {', '.join(PRECISIONS)}")


def pick_device(name: str):
    """auto -> cuda, then mps, then cpu; an explicit device that is missing is an error."""
    import torch

    from vitcli.distributed import dist_info

    check_device_args(name)
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

    check_device_args("auto", name)
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


# Below this many multiply-adds per step in the linear layers, bf16 autocast on a CPU costs more in casts than
# it saves. Measured on 2 AVX-512 BF16 cores, bf16 / fp32 step speed: 0.84x at 7 M, 0.74-0.93x at 27 M,
# 1.05-1.09x at 53 M, 1.22-1.59x at 100-110 M, 1.2-1.9x from 200 M up (e.g. 1.9x for a 32 px ViT-Ti/4).
CPU_BF16_MIN_MACS = 100e6


def linear_macs_per_image(model, img_size: int) -> float:
    """Multiply-adds of every nn.Linear in one forward pass of one image (hooks on a batch-1 eval forward)."""
    import torch

    total = [0.0]

    def hook(mod, inputs, output):
        total[0] += inputs[0].numel() / mod.in_features * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()  # no dropout: the global RNG streams stay untouched
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


def refine_auto_precision(precision: str, why: str, model, device, img_size: int, batch_size: int
                          ) -> tuple[str, str]:
    """`train.precision: auto` on a CPU: keep bf16 only when the model does enough matrix work per step."""
    if precision != "bf16" or device.type != "cpu":
        return precision, why
    macs = linear_macs_per_image(model, img_size) * batch_size
    if macs < CPU_BF16_MIN_MACS:
        return "fp32", (f"auto: {macs / 1e6:.0f} M multiply-adds per step is too little work for bf16 to pay off "
                        f"on a CPU (needs >= {CPU_BF16_MIN_MACS / 1e6:.0f} M)")
    return precision, why


def pick_attention(device, precision: str) -> tuple[bool, str]:
    """(fused, why): fused SDPA, except for bf16 on a CPU, where PyTorch's flash-attention backward is slower
    than the explicit softmax path (1.3x per step for ViT-Ti/16 at 224 px, 1.6x for a 32 px ViT-Ti/4)."""
    if device.type == "cpu" and precision == "bf16":
        return False, "explicit softmax (faster than the CPU flash-attention backward in bf16)"
    return True, "fused scaled_dot_product_attention"


def set_fused_attention(model, fused: bool) -> int:
    """Set `fused_attn` on every attention module (vitcli's and timm's ViTs have it); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = fused
            n += 1
    return n


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


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
