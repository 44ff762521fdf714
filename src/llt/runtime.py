"""The numeric set-up of a run on its machine: precision, memory format, threads, the CPU's bf16 support,
and the process allocator.

`train.precision=auto` resolves to bf16 autocast + channels-last on CUDA and on CPUs with native bf16
arithmetic (AMX-BF16 or AVX512-BF16, as torch reports them), and to float32 NCHW elsewhere: on a CPU
without native bf16, torch emulates it, which is slower than float32. `fp32` is float32 NCHW on the CPU
(what bit-exact comparisons use). The resolved set-up goes into the run's manifest (`runtime`); a run
continued under another one warns, because its results then stop being bit-equal to an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def cpu_bf16_capability() -> str | None:
    """The CPU's native bf16 instruction set as torch reports it: "amx-bf16", "avx512-bf16", or None.
    LLT_CPU_BF16=0 in the environment reports None (`auto` then means fp32 on this CPU)."""
    if os.environ.get("LLT_CPU_BF16") == "0":
        return None
    cpu = getattr(torch, "cpu", None)
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx-bf16"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512-bf16"
    return None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow), not the
    machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Numerics:
    """How a run computes: autocast dtype (None: float32), memory format, and the facts it was chosen on."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    precision: str            # the resolved precision: "bf16" or "fp32"
    capability: str | None    # CPU: "amx-bf16", "avx512-bf16" or None; CUDA: the device name
    warning: str | None = None

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"


def resolve_numerics(precision: str, device: torch.device, capability: str | None | bool = False) -> Numerics:
    """Resolve train.precision (auto, bf16, fp32) on `device`. `capability` (default: asked of torch) is the
    CPU's native bf16 support; tests pass None to simulate a CPU without it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = precision in ("auto", "bf16")
        return Numerics(torch.bfloat16 if bf16 else None, True, "bf16" if bf16 else "fp32", name)
    cap = cpu_bf16_capability() if capability is False else capability
    if precision == "fp32" or (precision == "auto" and cap is None):
        return Numerics(None, False, "fp32", cap)
    warning = None
    if cap is None:
        warning = ("train.precision=bf16 on a CPU without native bf16 (no AMX-BF16 or AVX512-BF16): torch emulates "
                   "it, usually slower than fp32; train.precision=auto picks fp32 here")
    return Numerics(torch.bfloat16, True, "bf16", cap, warning)


def runtime_facts(numerics: Numerics, device: torch.device) -> dict:
    """What the manifest records about how results were computed (a change breaks bit-equality)."""
    return {"device": str(device), "precision": numerics.precision, "memory_format": numerics.memory_format,
            "torch": torch.__version__, "capability": numerics.capability, "threads": torch.get_num_threads()}


def runtime_changes(recorded: dict | None, now: dict) -> list[str]:
    """'field: before -> now' for every runtime fact that differs from the recorded ones (none recorded:
    nothing to compare)."""
    if not recorded:
        return []
    return [f"{k} {recorded.get(k)} -> {now[k]}" for k in now if recorded.get(k) != now[k]]


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS after every batch (glibc only).

    glibc serves blocks above a few MB with fresh mmap pages and unmaps them when freed, so every
    evaluation or training batch of a CNN page-faults its activations in again: on a 2-core CPU that was
    half of an evaluation's time (system time). Raising the mmap threshold to its maximum (32 MiB) and the
    trim threshold to 1 GiB makes blocks up to 32 MiB reuse heap memory. Returns whether it was applied;
    LLT_NO_MALLOPT=1 turns it off. Numerics are unaffected."""
    if os.environ.get("LLT_NO_MALLOPT") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def default_eval_batch(device: torch.device) -> int:
    """The evaluation batch when train.eval_batch_size=0: 256 on the CPU (measured: larger batches' activations
    exceed the allocator's reuse threshold and page-fault; docs/benchmarks.md), 1024 on CUDA."""
    return 1024 if device.type == "cuda" else 256
