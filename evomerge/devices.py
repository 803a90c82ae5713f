"""Where a worker's model runs and in which dtype: the `device`, `dtype` and `seeds_on` options resolved.

One place decides, so the memory plan, the workers and the tasks agree on what `auto` means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from evomerge.errors import ConfigError
from evomerge.models.safetensors_format import DTYPES as SAFETENSORS_DTYPES

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def majority_dtype(specs: Iterable[tuple[int, str]]) -> torch.dtype:
    """The dtype holding most elements: a bf16 model that keeps a float32 buffer is still bf16."""
    counts: dict[torch.dtype, int] = {}
    for numel, name in specs:
        dt = SAFETENSORS_DTYPES.get(name, torch.float32)  # safetensors names (BF16, F32, ...)
        counts[dt] = counts.get(dt, 0) + numel
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def resolve_dtype(option: str, seeds_dtype: torch.dtype) -> torch.dtype:
    """`auto` is the seeds' own dtype; float64 seeds (tests, numpy) run in float32."""
    if option == "auto":
        return torch.float32 if seeds_dtype == torch.float64 else seeds_dtype
    try:
        return DTYPES[option]
    except KeyError:
        raise ConfigError(f"fitness.options.dtype: {option!r} is not one of auto, float32, bfloat16, "
                          "float16") from None


def resolve_device(option: str, num_gpus: float = 0.0) -> torch.device:
    """`auto`: the GPU Ray assigned this worker (`workers.num_gpus > 0`), else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES for each worker, so its GPU is always `cuda:0` inside it.
    """
    if option == "auto":
        return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(option)
    except (RuntimeError, ValueError):
        raise ConfigError(f"fitness.options.device: {option!r} is not a device; use auto, cpu, cuda "
                          "or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"fitness.options.device: {option!r}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"fitness.options.device is {option!r} but this process sees no CUDA GPU; use "
                          "device: auto (the CPU here), or give the workers GPUs with workers.num_gpus")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"fitness.options.device is {option!r} but only {torch.cuda.device_count()} GPU(s) "
                          "are visible to this worker (Ray shows each worker only its own GPUs: use cuda or auto)")
    return device


def resolve_seeds_on(option: str, device: torch.device, fits_on_device: bool) -> str:
    """Where the seeds live while a worker merges: `device` (resident) or `host` (streamed in chunks)."""
    if device.type == "cpu":
        return "host"  # memory-mapped page cache, shared by the node's workers
    if option == "auto":
        return "device" if fits_on_device else "host"
    if option not in ("device", "host"):
        raise ConfigError(f"fitness.options.seeds_on: {option!r} is not one of auto, device, host")
    return option


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _probe(name: str) -> bool | None:
    fn = getattr(torch.cpu, name, None)  # private probes: absent from some torch builds
    try:
        return bool(fn()) if fn is not None else None
    except Exception:
        return None


def cpu_lacks_native(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` matmuls without instructions of their own (bfloat16 without
    AVX512-BF16 or AMX; float16 without AVX512-FP16 or AMX-FP16), so they are emulated through
    float32 and a 16-bit model scores several times slower than in float32: 3.5x slower measured
    for a 1B bf16 Llama on a 2-core AVX2 machine. False where unsure: a warning, not a guess."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    flags = _cpu_flags()
    if dtype == torch.bfloat16:
        native = [_probe("_is_avx512_bf16_supported"), _probe("_is_amx_tile_supported"),
                  "avx512_bf16" in flags or "amx_bf16" in flags]
    else:
        native = [_probe("_is_amx_fp16_supported"), "avx512_fp16" in flags or "amx_fp16" in flags]
    if not flags and all(v is None for v in native[:-1]):
        return False  # nothing to go by (not Linux, no probes)
    return not any(native)


def slow_cpu_dtype_advice(dtype: torch.dtype) -> str:
    """What the memory plan and a CPU worker say when `cpu_lacks_native(dtype)`."""
    name = str(dtype).replace("torch.", "")
    return (f"this CPU has no native {name} arithmetic ({torch.backends.cpu.get_cpu_capability()}, no "
            f"{'AVX512-BF16/AMX' if dtype == torch.bfloat16 else 'AVX512-FP16/AMX-FP16'}): a {name} model "
            f"scores several times slower here than in float32; set fitness.options.dtype: float32 for "
            f"speed at twice the merge buffer, or run the workers on GPUs (workers.num_gpus)")
