"""Materialising into the seeds' dtype: float32 arithmetic per chunk, one rounding, seeds bit-exact."""

from __future__ import annotations

import numpy as np
import torch

from evomerge.genomes import basis as basis_mod
from evomerge.genomes.basis import Basis, Piece
from evomerge.genomes.recipe import Recipe


def _bf16_basis(values: list[list[float]]) -> Basis:
    views = [torch.tensor(v, dtype=torch.bfloat16) for v in values]
    return Basis([Piece(0, len(values[0]), views)], len(values[0]), len(views))


def test_bf16_merge_is_summed_in_float32_and_rounded_once():
    # bf16 has 8 significant bits: 1 + 2**-8 is not representable and rounds to 1.
    # 0.5 * 1.0 + 0.5 * (1 + 2**-7): float32 gives 1 + 2**-8 exactly, which rounds (ties-to-even) to 1.0;
    # summing in bf16 step by step would give the same here, so also check a case where it differs:
    # 0.25*a + 0.25*a + 0.25*a + 0.25*a with a = 1 + 2**-7 is a itself in float32.
    a = 1.0 + 2 ** -7
    basis = _bf16_basis([[1.0, a], [a, a], [a, a], [a, a]])
    recipe = Recipe(np.array([0, 2]), np.full((1, 4), 0.25))
    out = basis.materialise(recipe, out=basis.new_buffer())
    assert out.dtype == torch.bfloat16
    expected_first = torch.tensor(0.25 * 1.0 + 0.75 * a, dtype=torch.float32).to(torch.bfloat16)
    assert out[0] == expected_first
    assert out[1] == torch.tensor(a, dtype=torch.bfloat16)


def test_a_seed_materialises_to_its_own_bits_in_its_dtype():
    rng = np.random.default_rng(0)
    seeds = [rng.standard_normal(3000).astype(np.float32) for _ in range(2)]
    views = [torch.from_numpy(s).to(torch.bfloat16) for s in seeds]
    basis = Basis([Piece(0, 1000, [v[:1000] for v in views]), Piece(1000, 3000, [v[1000:] for v in views])], 3000, 2)
    assert basis.dtype == torch.bfloat16
    out = basis.materialise(Recipe.seed(1, 2, 3000), out=basis.new_buffer())
    assert torch.equal(out.view(torch.int16), views[1].view(torch.int16))


def test_chunks_and_pieces_agree_with_a_float32_reference(monkeypatch):
    monkeypatch.setattr(basis_mod, "CHUNK", 7)  # many chunks per segment, segments across pieces
    rng = np.random.default_rng(1)
    seeds = [torch.from_numpy(rng.standard_normal(50).astype(np.float32)).to(torch.bfloat16) for _ in range(3)]
    basis = Basis([Piece(0, 20, [s[:20] for s in seeds]), Piece(20, 50, [s[20:] for s in seeds])], 50, 3)
    coeffs = rng.uniform(-0.5, 1.0, size=(3, 3))
    recipe = Recipe(np.array([0, 13, 31, 50]), coeffs)
    out = basis.materialise(recipe, out=basis.new_buffer())
    f32 = torch.stack([s.to(torch.float32) for s in seeds])
    bounds = [0, 13, 31, 50]
    expected = torch.cat([sum(float(coeffs[g, k]) * f32[k, bounds[g]:bounds[g + 1]] for k in range(3))
                          for g in range(3)]).to(torch.bfloat16)
    assert torch.equal(out, expected)
    assert torch.equal(basis.materialise(recipe).to(torch.bfloat16), expected)  # float32 default, same values
