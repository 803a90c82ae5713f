"""A one-pass combine kernel for large merges, compiled by torch, that writes the eager bits.

The eager combine (`basis._combine`) makes about five passes over a float32 scratch per chunk
(upcast, scale, upcast, scale-add, round), so on a CPU it runs at about 0.3x a plain copy of the
same bytes, and on a GPU it also moves the scratch through device memory. `torch.compile` fuses
the same arithmetic into one pass that reads each seed once and writes the output once (0.6x a
copy measured on this 2-core CPU). It needs a C++ compiler (CPU) or Triton (GPU) on the worker
and costs about 20 s the first time on a machine (3 s from the on-disk cache later), so:

* it is used only for merges of at least `FUSED_MIN_SIZE` parameters (`kernel: auto`), where it
  pays for itself within one materialisation, or when asked for (`kernel: fused`);
* each (number of sources, dtypes, device) it compiles for is first checked against the eager
  combine on a probe vector; where it fails to compile or writes one bit differently it is not
  used, with one warning, and the eager combine runs instead. So the kernel never changes a
  search's numbers: the scores, replays and exports are the same with it or without it;
* under `kernel: auto` it compiles on a thread, and the eager combine runs until it is ready:
  a worker scores its first children while the compiler works (on a GPU node the compiler uses
  the CPU the evaluation leaves idle). `kernel: fused` waits for it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

FUSED_MIN_SIZE = 1 << 26  # 67M parameters: a 1B model's materialisation pays for the compile
KERNELS = ("auto", "fused", "eager")
PROBE_SIZE = 4099  # odd: the compiled loop's vector body and its scalar tail are both checked

_lock = threading.Lock()
_kernels: dict[tuple, Callable[..., None] | None] = {}
_compiling: dict[tuple, threading.Thread] = {}  # kernels being compiled and checked on a thread


def _fused(out: torch.Tensor, coeffs: torch.Tensor, *sources: torch.Tensor) -> None:
    """The eager combine's arithmetic, term by term: each product rounded to float32, then summed
    in source order, and rounded once to the output's dtype."""
    acc = sources[0].float() * coeffs[0]
    for i in range(1, len(sources)):
        acc = acc + sources[i].float() * coeffs[i]
    out.copy_(acc)


def wants_fused(kernel: str, size: int) -> bool:
    """Whether a basis of `size` parameters uses the compiled kernel under option `kernel`."""
    if kernel not in KERNELS:
        raise ValueError(f"fitness.options.kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    return kernel == "fused" or (kernel == "auto" and size >= FUSED_MIN_SIZE)


def fused_kernel(source_dtypes: Sequence[torch.dtype], out_dtype: torch.dtype, device: torch.device,
                 eager: Callable[[torch.Tensor, list[torch.Tensor], Sequence[float]], None],
                 wait: bool = True) -> Callable[..., None] | None:
    """The compiled kernel for these sources and output, checked against `eager`; None where the
    eager combine must run (no compiler, or other bits). Compiled and checked once per process,
    on a thread: `wait=False` returns None until that thread is done, instead of waiting."""
    key = (tuple(source_dtypes), out_dtype, device.type, device.index)
    with _lock:
        if key in _kernels:
            return _kernels[key]
        thread = _compiling.get(key)
        if thread is None:
            thread = threading.Thread(target=_compile, args=(key, tuple(source_dtypes), out_dtype, device, eager),
                                      name="fused-kernel-compile", daemon=True)
            _compiling[key] = thread
            thread.start()
    if not wait:
        return None
    thread.join()
    with _lock:
        return _kernels.get(key)


def _compile(key: tuple, source_dtypes: Sequence[torch.dtype], out_dtype: torch.dtype, device: torch.device,
             eager: Callable[[torch.Tensor, list[torch.Tensor], Sequence[float]], None]) -> None:
    try:
        kernel = _checked(source_dtypes, out_dtype, device, eager)
    except Exception as exc:  # the probe itself failed: the eager combine runs, as for no compiler
        log.warning("materialise: checking the fused kernel failed (%s); using the eager combine",
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        kernel = None
    with _lock:
        _kernels[key] = kernel
        _compiling.pop(key, None)


def wait_for_kernels(timeout: float | None = None) -> bool:
    """Wait for the kernels compiling on threads; whether none is still compiling (benchmarks, tests)."""
    with _lock:
        threads = list(_compiling.values())
    for thread in threads:
        thread.join(timeout)
    return not any(thread.is_alive() for thread in threads)


def _checked(source_dtypes: Sequence[torch.dtype], out_dtype: torch.dtype, device: torch.device,
             eager: Callable[[torch.Tensor, list[torch.Tensor], Sequence[float]], None]
             ) -> Callable[..., None] | None:
    what = f"{len(source_dtypes)} sources {', '.join(str(d) for d in source_dtypes)} -> {out_dtype} on {device}"
    gen = torch.Generator().manual_seed(len(source_dtypes))
    sources = [(torch.randn(PROBE_SIZE, generator=gen) * 3).to(device=device, dtype=d) for d in source_dtypes]
    row = (torch.rand(len(source_dtypes), generator=gen, dtype=torch.float64) * 2 - 0.5).tolist()
    expected = torch.empty(PROBE_SIZE, dtype=out_dtype, device=device)
    eager(expected, sources, row)
    try:
        kernel = torch.compile(_fused, dynamic=True)
        got = torch.empty_like(expected)
        kernel(got, torch.tensor(row, dtype=torch.float32, device=device), *sources)
    except Exception as exc:  # no compiler, no Triton, an unsupported dtype: the eager combine runs
        log.warning("materialise: the fused kernel is not available for %s (%s); using the eager combine "
                    "(set fitness.options.kernel: eager to skip trying)", what, str(exc).splitlines()[0][:200])
        return None
    if not torch.equal(got, expected):
        log.warning("materialise: the fused kernel for %s rounds differently from the eager combine; "
                    "using the eager combine", what)
        return None
    return kernel


def reset() -> None:
    """Forget compiled kernels (tests)."""
    wait_for_kernels()
    with _lock:
        _kernels.clear()
