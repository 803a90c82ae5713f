"""Search strategies, registered by name."""

from __future__ import annotations

from evomerge.registry import Registry
from evomerge.strategies.base import Candidate, Evaluation, Problem, Strategy, StrategyOptions


def _load_builtin_strategies() -> None:
    from evomerge.strategies import cmaes, dam, m2n2, static  # noqa: F401


STRATEGIES: Registry[type[Strategy]] = Registry("strategy", autoload=_load_builtin_strategies)


def build_strategy(name: str, options: dict, problem: Problem, seed: int) -> Strategy:
    return STRATEGIES.get(name)(options, problem, seed)


__all__ = ["STRATEGIES", "Candidate", "Evaluation", "Problem", "Strategy", "StrategyOptions", "build_strategy"]
