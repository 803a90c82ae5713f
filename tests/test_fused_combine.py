"""The materialising arithmetic, and the compiled kernel that must write the same bits."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from evomerge.genomes import fused_combine
from evomerge.genomes.basis import Basis, Piece, _combine
from evomerge.genomes.fused_combine import FUSED_MIN_SIZE, fused_kernel, wants_fused
from evomerge.genomes.recipe import Recipe


@pytest.fixture(autouse=True)
def fresh_kernels():
    fused_combine.reset()
    yield
    fused_combine.reset()


def _bf16_basis(k: int, sizes: tuple[int, ...] = (1000, 37, 2500), seed: int = 0) -> Basis:
    gen = torch.Generator().manual_seed(seed)
    pieces, start = [], 0
    for n in sizes:
        pieces.append(Piece(start, start + n, [(torch.randn(n, generator=gen) * 2).to(torch.bfloat16)
                                               for _ in range(k)]))
        start += n
    return Basis(pieces, start, k)


def _recipe(size: int) -> Recipe:
    # zero, lone-one, negative and non-unit coefficients, and a split inside a piece
    return Recipe(np.array([0, 600, 1037, 2000, size]),
                  np.array([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0], [0.0, -0.4, 1.3], [0.25, 0.5, 0.125]]))


def test_each_product_is_rounded_to_float32_then_summed_in_order():
    """Hand-worked in numpy float32 (no fused multiply-add): fl(fl(c0*a) + fl(c1*b)) + fl(c2*c)."""
    gen = torch.Generator().manual_seed(1)
    sources = [(torch.randn(5001, generator=gen) * 4).to(torch.bfloat16) for _ in range(3)]
    row = [0.1, -0.7, 0.3]
    f32 = [s.to(torch.float32).numpy() for s in sources]
    c = [np.float32(x) for x in row]
    want = ((f32[0] * c[0]) + (f32[1] * c[1])) + (f32[2] * c[2])
    assert want.dtype == np.float32
    out = torch.empty(5001, dtype=torch.bfloat16)
    _combine(out, sources, np.array(row), torch.empty(1000), step=1 << 18)  # 500-element halves
    assert torch.equal(out, torch.from_numpy(want).to(torch.bfloat16))
    out32 = torch.empty(5001, dtype=torch.float32)
    _combine(out32, sources, np.array(row), torch.empty(64))
    assert torch.equal(out32, torch.from_numpy(want))


def test_a_lone_one_copies_bits_and_zeros_are_left_out():
    a = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    b = torch.tensor([float("inf"), 0.0, 1.0], dtype=torch.bfloat16)  # never multiplied by its zero
    out = torch.empty(3, dtype=torch.bfloat16)
    _combine(out, [a, b], np.array([1.0, 0.0]))
    assert torch.equal(out, a)
    _combine(out, [a, b], np.array([0.0, 0.0]))
    assert torch.equal(out, torch.zeros(3, dtype=torch.bfloat16))


def test_auto_uses_the_kernel_only_for_large_merges_and_names_the_option():
    assert not wants_fused("auto", FUSED_MIN_SIZE - 1) and wants_fused("auto", FUSED_MIN_SIZE)
    assert wants_fused("fused", 10) and not wants_fused("eager", 10 * FUSED_MIN_SIZE)
    with pytest.raises(ValueError, match="fitness.options.kernel: 'fast'"):
        wants_fused("fast", 10)


def test_no_compiler_falls_back_to_the_eager_bits_with_one_warning(monkeypatch, caplog):
    basis = _bf16_basis(3)
    recipe = _recipe(basis.size)
    want = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    calls = []

    def no_compiler(fn, **kwargs):
        calls.append(fn)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    basis.kernel = "fused"
    with caplog.at_level(logging.WARNING, logger="evomerge.genomes.fused_combine"):
        got = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
        basis.materialise(recipe, out=got)
    assert torch.equal(got, want)
    # one try per source count the recipe uses (3, 2 and 2 active: two keys), remembered after
    assert len(calls) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("No working C++ compiler" in w and "kernel: eager" in w for w in warnings)


def test_a_kernel_that_rounds_differently_is_not_used(monkeypatch, caplog):
    def off_by_a_bit(fn, **kwargs):
        def run(out, coeffs, *sources):
            fn(out, coeffs, *sources)
            out.view(torch.int16).add_(1)  # one unit in the last place
        return run

    monkeypatch.setattr(torch, "compile", off_by_a_bit)
    with caplog.at_level(logging.WARNING, logger="evomerge.genomes.fused_combine"):
        kernel = fused_kernel([torch.bfloat16] * 2, torch.bfloat16, torch.device("cpu"), _eager_ref)
    assert kernel is None and "rounds differently" in caplog.text


def _eager_ref(out, sources, row):
    from evomerge.genomes.basis import _eager

    _eager(out, sources, row)


def test_the_compiled_kernel_writes_the_eager_bits():
    """A real torch.compile (a C++ compiler is on CI's machine): bf16 seeds, a float32 buffer
    piece among them, and rows of 1, 2 and 3 active seeds."""
    basis = _bf16_basis(3)
    basis.pieces[1].views = [v.to(torch.float32) for v in basis.pieces[1].views]  # a float32 buffer
    recipe = _recipe(basis.size)
    want = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    basis.kernel = "fused"
    assert basis.prepare_kernel(want)
    got = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    assert torch.equal(got, want)
    assert fused_combine._kernels and all(k is not None for k in fused_combine._kernels.values())


@pytest.mark.slow
def test_the_compiled_kernel_writes_the_eager_bits_in_float32_and_float16():
    for dtype in (torch.float32, torch.float16):
        basis = _bf16_basis(3, seed=2)
        for piece in basis.pieces:
            piece.views = [v.to(dtype) for v in piece.views]
        recipe = _recipe(basis.size)
        want = basis.materialise(recipe, out=torch.empty(basis.size, dtype=dtype))
        basis.kernel = "fused"
        got = basis.materialise(recipe, out=torch.empty(basis.size, dtype=dtype))
        assert torch.equal(got, want), dtype


def test_auto_runs_eagerly_while_the_kernel_compiles_then_uses_it(monkeypatch):
    """`kernel: auto` never waits for the compiler: the first merges are eager (the same bits), and
    the kernel is used once its thread is done. The compiler is held until the test lets it go."""
    release, used = threading.Event(), []

    def held_compiler(fn, **kwargs):
        assert release.wait(60)

        def run(out, coeffs, *sources):
            used.append(len(sources))
            fn(out, coeffs, *sources)
        return run

    monkeypatch.setattr(torch, "compile", held_compiler)
    monkeypatch.setattr(fused_combine, "FUSED_MIN_SIZE", 1)
    basis = _bf16_basis(3)
    recipe = _recipe(basis.size)
    want = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))  # eager
    basis.kernel = "auto"
    assert not basis.prepare_kernel(want)  # started, not ready
    got = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    assert torch.equal(got, want) and used == [] and not fused_combine.wait_for_kernels(timeout=0.01)
    release.set()
    assert fused_combine.wait_for_kernels(timeout=60)
    got = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    assert torch.equal(got, want)
    assert sorted(set(used)) == [2, 3]  # the recipe's rows of 2 and 3 active seeds ran compiled


def test_a_kernel_compiled_on_a_thread_runs_beside_eager_work():
    """A real torch.compile on its thread while this thread materialises eagerly."""
    basis = _bf16_basis(2, seed=3)
    recipe = Recipe(np.array([0, 1500, basis.size]), np.array([[0.3, 0.7], [-0.5, 1.25]]))
    want = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    kernel = fused_kernel([torch.bfloat16] * 2, torch.bfloat16, torch.device("cpu"), _eager_ref, wait=False)
    for _ in range(20):  # eager merges meanwhile, on this thread (basis.kernel is still eager)
        eager = basis.materialise_span(recipe, 0, basis.size, torch.empty(basis.size, dtype=torch.bfloat16))
        assert torch.equal(eager, want)
    assert fused_combine.wait_for_kernels(timeout=300)
    assert kernel is None and fused_combine._kernels[((torch.bfloat16,) * 2, torch.bfloat16, "cpu", None)] is not None
    basis.kernel = "fused"
    got = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    assert torch.equal(got, want)
