"""Genome spaces: the operations a strategy needs, for dense vectors or for recipes over seeds.

M2N2 is written once against this interface; a dense space reproduces the reference code on
small models, a recipe space scales the same algorithm to checkpoints of any size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.genomes.dense import split_slerp
from evomerge.genomes.elements import pack_elements, unpack_elements
from evomerge.genomes.offspring import Lineage, Offspring, pack_offspring, realise, unpack_offspring
from evomerge.genomes.recipe import PrefixGram, Recipe, pack_recipes, recipe_split_slerp, unpack_recipes


class DenseSpace:
    kind = "dense"

    def __init__(self, size: int, seeds: list[np.ndarray] | None = None) -> None:
        self.size = size
        self.seeds = [np.asarray(s, dtype=np.float32) for s in (seeds or [])]
        # On: children stay `Offspring` (bred by whoever needs the values: the fitness workers,
        # or the archive when one enters it). The population actor turns it on; in-process use
        # gets plain arrays. The children are the same bits either way.
        self.defer_breeding = False

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    def seed_genome(self, index: int) -> np.ndarray:
        return self.seeds[index].copy()

    def random_genome(self, rng: np.random.Generator, sigma: float) -> np.ndarray:
        return (rng.standard_normal(self.size) * sigma).astype(np.float32)

    def draw_split(self, rng: np.random.Generator) -> int:
        return int(rng.integers(0, self.size))

    def crossover(self, a: np.ndarray, b: np.ndarray, split: int, ratio: float) -> np.ndarray:
        return split_slerp(a, b, split, ratio)

    def breed(self, parents: list[np.ndarray], lineage: Lineage) -> np.ndarray | Offspring:
        """The child of these parents (one: a mutated copy; two: split-point SLERP, then noise)."""
        offspring = Offspring(lineage, tuple(parents))
        return offspring if self.defer_breeding else offspring.materialise()

    def copy(self, genome: np.ndarray | Offspring) -> np.ndarray:
        return genome.materialise() if isinstance(genome, Offspring) else genome.copy()

    def realise(self, genome: Any) -> Any:
        return realise(genome)

    def pack(self, genomes: list[Any], prefix: str) -> dict[str, np.ndarray]:
        """Values of the bred genomes; children not bred yet (the ones in flight) as lineages."""
        present = np.array([g is not None for g in genomes], dtype=bool)
        unbred = [i for i, g in enumerate(genomes) if isinstance(g, Offspring)]
        rows = [i for i, g in enumerate(genomes) if g is not None and not isinstance(g, Offspring)]
        if not unbred:  # every row stored, as snapshots always held them
            rows = list(range(len(genomes)))
        values = np.zeros((len(rows), self.size), dtype=np.float32)
        for i, row in enumerate(rows):
            if genomes[row] is not None:
                values[i] = genomes[row]
        arrays = {f"{prefix}/values": values, f"{prefix}/present": present}
        if unbred:
            arrays[f"{prefix}/rows"] = np.asarray(rows, dtype=np.int64)
            arrays.update(pack_offspring([genomes[i] for i in unbred], unbred, f"{prefix}/offspring"))
        return arrays

    def unpack(self, arrays: dict[str, np.ndarray], prefix: str) -> list[Any]:
        values, present = arrays[f"{prefix}/values"], arrays[f"{prefix}/present"]
        if f"{prefix}/rows" not in arrays:
            return [values[i].copy() if present[i] else None for i in range(len(present))]
        genomes: list[Any] = [None] * len(present)
        for i, row in enumerate(arrays[f"{prefix}/rows"]):
            genomes[int(row)] = values[i].copy()
        for row, child in unpack_offspring(arrays, f"{prefix}/offspring").items():
            genomes[row] = child
        return genomes


NO_NOISE_ON_RECIPES = ("strategy.options.mutation_sigma must be 0 with recipe genomes "
                       "(noise on every parameter cannot be written as a recipe); set it to 0")


class RecipeSpace:
    """Recipes over the seeds, and over merged models added to the basis during the search.

    A guide whose genomes are not recipes (DAM's column genomes, TIES layer-wise genomes) joins
    the archive by becoming a new basis element: the population materialises it once, grows the
    prefix Gram by one row and column, and the member is the recipe "all of element K". Workers
    rebuild the same element from the (small) genome, so nothing model-sized crosses the wire.
    """

    kind = "recipe"

    def __init__(self, gram: PrefixGram, basis: Any = None) -> None:
        self.gram = gram
        self.base_gram = gram
        self.size = gram.size
        self.basis = basis
        self.extensions: list[Any] = []  # genomes over the seeds, in the order they joined

    @property
    def num_seeds(self) -> int:
        return self.base_gram.num_seeds

    @property
    def num_elements(self) -> int:
        return self.gram.num_seeds

    def add_element(self, genome: Any) -> Recipe:
        """Make a merged model (anything with `materialise(basis)`) a basis element; its recipe."""
        if self.basis is None:
            raise ValueError("this recipe space has no basis to add a merged model to")
        basis = self.basis
        if basis.num_elements != self.num_elements:
            raise ValueError(f"basis has {basis.num_elements} elements but the Gram matrices cover "
                             f"{self.num_elements}; they must grow together")
        index = basis.add_element(genome.materialise(basis, out=basis.new_buffer()))
        try:
            self.gram = self.gram.with_element(basis.values)
        except BaseException:
            basis.extra.pop()
            raise
        self.extensions.append(genome)
        return Recipe.seed(index, index + 1, self.size)

    def reset_extensions(self, genomes: list[Any]) -> None:
        """Rebuild the added elements from their genomes, e.g. when a snapshot is loaded."""
        if self.basis is not None:
            self.basis.drop_extra()
        self.gram, self.extensions = self.base_gram, []
        for genome in genomes:
            self.add_element(genome)

    def seed_genome(self, index: int) -> Recipe:
        return Recipe.seed(index, self.num_seeds, self.size)

    def random_genome(self, rng: np.random.Generator, sigma: float) -> Recipe:
        raise ValueError("recipe genomes start from seeds; a from-scratch search needs dense genomes")

    def draw_split(self, rng: np.random.Generator) -> int:
        # With a grid of every index this draws exactly what DenseSpace does.
        return int(self.gram.grid[rng.integers(0, self.gram.grid.size - 1)])

    def crossover(self, a: Recipe, b: Recipe, split: int, ratio: float) -> Recipe:
        return recipe_split_slerp(a, b, split, ratio, self.gram)

    def breed(self, parents: list[Recipe], lineage: Lineage) -> Recipe:
        """Recipes are a few KB and their SLERP needs the Gram matrices: always bred here."""
        if lineage.sigma > 0:
            raise ValueError(NO_NOISE_ON_RECIPES)
        if len(parents) == 2:
            return self.crossover(parents[0], parents[1], lineage.split, lineage.ratio)
        return parents[0]

    def copy(self, genome: Recipe) -> Recipe:
        return genome  # recipes are never modified in place

    def realise(self, genome: Any) -> Any:
        return genome

    def pack(self, genomes: list[Any], prefix: str) -> dict[str, np.ndarray]:
        """Recipes, plus any guide genomes among them (a DAM candidate in flight, or the best)."""
        arrays = pack_recipes([g if isinstance(g, Recipe) else None for g in genomes], prefix)
        others = [(i, g) for i, g in enumerate(genomes) if g is not None and not isinstance(g, Recipe)]
        if others:
            arrays[f"{prefix}/merged/index"] = np.array([i for i, _ in others], dtype=np.int64)
            arrays.update(pack_elements([g for _, g in others], f"{prefix}/merged"))
        return arrays

    def unpack(self, arrays: dict[str, np.ndarray], prefix: str) -> list[Any]:
        genomes: list[Any] = list(unpack_recipes(arrays, prefix))
        if f"{prefix}/merged/index" in arrays:
            for i, genome in zip(arrays[f"{prefix}/merged/index"].tolist(), unpack_elements(arrays, f"{prefix}/merged")):
                genomes[i] = genome
        return genomes
