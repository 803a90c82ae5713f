"""Hybrid guidance: CMA-ES or DAM inside M2N2, their best joining the archive by the replacement rule."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.guide import GUIDE_FLAG
from evomerge.strategies.m2n2 import M2N2
from fitness.digits import DigitsTask

TASK = DigitsTask({"train_size": 200})
SEEDS = TASK.make_seeds()


def _problem() -> Problem:
    return Problem(dimension=TASK.dimension, num_datapoints=TASK.num_datapoints, initial=SEEDS)


def _run(strategy: M2N2, start: int, stop: int) -> list:
    seen = []
    for member_id in range(start, stop):
        candidate = strategy.ask()
        assert candidate is not None
        candidate.member_id = member_id
        scores = TASK.evaluate(candidate.genome)
        strategy.tell(candidate, Evaluation(member_id, scores, TASK.test_score(candidate.genome)))
        seen.append(candidate)
    return seen


@pytest.mark.parametrize("source", ["cmaes", "dam"])
def test_guide_shares_evaluations_and_its_best_joins_the_archive(source):
    options = {"guide": {"from": source, "every": 10, "share": 0.25,
                         "options": {"steps": 20, "eval_every": 5} if source == "dam" else {}}}
    strategy = M2N2(options, _problem(), seed=0)
    seen = _run(strategy, 0, 120)
    guided = [c for c in seen if c.params.get(GUIDE_FLAG)]
    if source == "cmaes":
        assert 0.15 * len(seen) <= len(guided) <= 0.3 * len(seen)  # about a quarter of the evaluations
    else:  # DAM: a quarter until its trained merge is offered, then every evaluation goes to M2N2
        steps = [c.params.get("step") for c in guided]
        assert strategy.guide.strategy.exhausted and steps[-1] == 20 and steps.count(20) == 1
        last = next(i for i, c in enumerate(seen) if c is guided[-1])
        assert len(guided) <= 0.3 * (last + 1) and not any(c.params.get(GUIDE_FLAG) for c in seen[last + 1:])
    assert strategy.guide.inserted, "the guide's best was never offered to the archive"
    # an offered member either holds a slot or lost under the replacement rule, never bypassed it
    guided_ids = {c.member_id for c in guided}
    assert guided_ids & set(strategy.ids.tolist()) or strategy.guide.best["train"] <= strategy.scores.mean(1).max()


def test_guided_search_snapshot_resumes_identically():
    options = {"guide": {"from": "cmaes", "every": 8, "share": 0.3}}
    straight = M2N2(options, _problem(), seed=4)
    _run(straight, 0, 40)
    meta, arrays = straight.state_dict()
    resumed = M2N2(options, _problem(), seed=99)
    resumed.load_state_dict(meta, arrays)
    a, b = _run(straight, 40, 80), _run(resumed, 40, 80)
    assert [(c.params, c.genome.tobytes()) for c in a] == [(c.params, c.genome.tobytes()) for c in b]
    np.testing.assert_array_equal(straight.ids, resumed.ids)


def test_guide_config_uses_the_from_key(tmp_path):
    from evomerge.config import config_from_dict

    config = config_from_dict({"name": "g", "seeds": "task", "fitness": {"task": "digits"},
                               "budget": {"evaluations": 10},
                               "strategy": {"name": "m2n2", "options": {"guide": {"from": "dam", "every": 50}}}})
    assert config.strategy.options["guide"]["from"] == "dam"
    from evomerge.errors import ConfigError
    with pytest.raises(ConfigError, match="guide"):
        config_from_dict({"name": "g", "fitness": {"task": "digits"}, "budget": {"evaluations": 10},
                          "strategy": {"options": {"guide": {"from": "bogus"}}}})
