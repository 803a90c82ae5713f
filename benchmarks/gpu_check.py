"""The worker path on one GPU, in-process and without Ray, Optuna or pydantic: materialise, bind, score.

Makes a synthetic Llama pair of the requested size (default 7B-shaped, bf16) straight in device
memory — base noise plus a small delta per expert, no files — then measures, in one run:

- materialising a two-segment recipe into the bound buffer, against a device-to-device copy of
  the same F bytes (target: at least 0.5x the copy's speed), with the eager combine and with the
  compiled one-pass kernel (Triton on a GPU; `--kernel`), whose bits must equal the eager ones;
- peak device memory as a multiple of F (target: at most K + 1.3 with K seeds resident);
- seconds to score 64 prompts by answer likelihood, and by greedy generation.

    python benchmarks/gpu_check.py                   # on a GPU: 7B-shaped, K = 2
    python benchmarks/gpu_check.py --params 3M       # anywhere: a smoke run (on the CPU without a GPU)

Only torch, transformers, numpy and safetensors are imported (the `fitness` package's own
`__init__`, which registers pydantic tasks, is bypassed), so it runs where only those are installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if "fitness" not in sys.modules:  # import fitness.lm_binding / lm_scoring without fitness/__init__
    _pkg = types.ModuleType("fitness")
    _pkg.__path__ = [str(REPO_ROOT / "fitness")]  # type: ignore[attr-defined]
    sys.modules["fitness"] = _pkg

import torch  # noqa: E402

from evomerge.fixtures.synthetic_llama import (  # noqa: E402
    _write_side_files, plan_shape, tensor_specs,
)
from evomerge.genomes.basis import Basis, Piece  # noqa: E402
from evomerge.genomes.recipe import Recipe  # noqa: E402
from evomerge.models.layout import from_specs  # noqa: E402
from fitness.lm_binding import bind, build_skeleton, move_buffers, plan_binding  # noqa: E402
from fitness.lm_scoring import answer_likelihood_scores, exact_match_scores, load_tokenizer  # noqa: E402

PROMPTS = [(f"{a}+{b}=", str(a + b)) for a in range(8) for b in range(8)]  # 64 prompts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `repeats` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_seeds(layout, k: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """K flat seeds on the device: shared base noise (norms at 1) plus a per-expert delta, tensor by tensor."""
    gen = torch.Generator(device=device).manual_seed(0)
    seeds = [torch.empty(layout.size, dtype=dtype, device=device) for _ in range(k)]
    for spec in layout.tensors:
        base = torch.randn(spec.numel, generator=gen, device=device, dtype=torch.float32)
        if spec.name.endswith("norm.weight"):
            base.mul_(0.0).add_(1.0)
        else:
            base.mul_(0.02)
        for seed in seeds:
            delta = torch.randn(spec.numel, generator=gen, device=device, dtype=torch.float32).mul_(0.002)
            seed[spec.offset:spec.end].copy_(base + delta)
        del base
    return seeds


def time_kernels(basis: Basis, recipe: Recipe, flat: torch.Tensor, device: torch.device, kernels: str) -> dict:
    """Seconds to materialise with each kernel asked for (`both`: eager and fused), and whether the
    fused kernel compiled and wrote the eager bits; materialise_s is the faster usable one."""
    out: dict = {"materialise_eager_s": None, "materialise_fused_s": None, "fused_available": None,
                 "fused_bits_equal": None, "fused_compile_s": None}
    if kernels in ("both", "eager"):
        basis.kernel = "eager"
        out["materialise_eager_s"] = timed(lambda: basis.materialise(recipe, out=flat), device)
    if kernels in ("both", "fused"):
        want = basis.materialise(recipe, out=torch.empty_like(flat)) if kernels == "both" else None
        basis.kernel = "fused"
        start = time.perf_counter()
        out["fused_available"] = basis.prepare_kernel(flat)  # compiles and checks it on a probe (waits)
        out["fused_compile_s"] = time.perf_counter() - start
        if out["fused_available"]:
            out["materialise_fused_s"] = timed(lambda: basis.materialise(recipe, out=flat), device)
            if want is not None:
                out["fused_bits_equal"] = bool(torch.equal(flat, want))
                del want
    times = [t for t in (out["materialise_eager_s"], out["materialise_fused_s"]) if t is not None]
    out["materialise_s"] = min(times)
    basis.kernel = "eager" if out["materialise_s"] == out["materialise_eager_s"] else "fused"
    return out


def run(params: str, k: int, device: torch.device, batch_size: int, kernels: str = "both") -> dict:
    dtype = torch.bfloat16
    shape = plan_shape(params)
    specs = [(name, dims, "BF16") for name, dims, is_buffer in tensor_specs(shape) if not is_buffer]
    layout = from_specs(specs)
    f_bytes = layout.size * 2
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    seeds = make_seeds(layout, k, device, dtype)
    basis = Basis([Piece(s.offset, s.end, [seed[s.offset:s.end] for seed in seeds]) for s in layout.tensors],
                  layout.size, k)
    basis.layout = layout  # type: ignore[attr-defined]
    make_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_side_files(folder, shape, "bfloat16", chat_template=False)
        start = time.perf_counter()
        model = build_skeleton(folder, dtype)
        plan = plan_binding(model, layout, str(folder))
        flat = torch.empty(layout.size, dtype=dtype, device=device)
        move_buffers(model, device)
        bind(plan, flat)
        bind_seconds = time.perf_counter() - start
        tokenizer = load_tokenizer(str(folder))

    recipe = Recipe(torch.tensor([0, layout.size // 2, layout.size]).numpy(),
                    torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=torch.float64).numpy())
    materialised = time_kernels(basis, recipe, flat, device, kernels)
    materialise = materialised["materialise_s"]
    copy = timed(lambda: flat.copy_(seeds[0]), device)
    basis.materialise(recipe, out=flat)
    likelihood = timed(lambda: answer_likelihood_scores(model, tokenizer, PROMPTS, batch_size=batch_size),
                       device, repeats=1)
    generation = timed(lambda: exact_match_scores(model, tokenizer, PROMPTS, max_new_tokens=8,
                                                  batch_size=batch_size), device, repeats=1)
    hits, logprobs = answer_likelihood_scores(model, tokenizer, PROMPTS, batch_size=batch_size)
    peak = torch.cuda.max_memory_allocated(device) if gpu else None
    start = time.perf_counter()
    basis.prefix_gram(device=device)  # what the driver computes once per run on a GPU node
    sync(device)
    gram_seconds = time.perf_counter() - start
    return {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if gpu else None,
        "params": layout.size, "layers": shape.layers, "F_bytes": f_bytes, "seeds": k,
        "make_seeds_s": make_seconds, "skeleton_and_bind_s": bind_seconds,
        **materialised, "copy_s": copy, "materialise_vs_copy": copy / materialise,
        "peak_device_bytes": peak, "peak_device_F": None if peak is None else peak / f_bytes,
        "peak_target_F": k + 1.3,
        "likelihood_64_s": likelihood, "generate_64_s": generation, "prefix_gram_s": gram_seconds,
        "logprobs_finite": bool(torch.isfinite(torch.from_numpy(logprobs)).all()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="7B", help="model size, e.g. 7B, 1B, 3M (default 7B)")
    parser.add_argument("--seeds", type=int, default=2, help="K: seeds resident on the device (default 2)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kernel", choices=("both", "eager", "fused"), default="both",
                        help="materialising kernels to time (default both: eager and the compiled one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu" and args.params == "7B":
        print("no GPU here: a 7B check needs one; run with --params 3M for a smoke test", file=sys.stderr)
        return 2
    result = run(args.params, args.seeds, device, args.batch_size, args.kernel)
    for key, value in result.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:>22}  {text}")
    if result["peak_device_F"] is not None:
        print(f"materialise at {result['materialise_vs_copy']:.2f}x a device copy (target >= 0.5); peak "
              f"{result['peak_device_F']:.2f} F (target <= {result['peak_target_F']:.1f} F)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
