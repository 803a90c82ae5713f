"""Replay on resume for every strategy: a crash after a snapshot, the trials recorded after it
told back, and the search goes on as if nothing had happened.

The suite runs in one process (no Ray), over every registered strategy and the M2N2 variants
with state of their own (a guide, subsampled fitness with top-ups, static merges among the
seeds), in two dispatch orders: sync rounds told in id order, and an async-like order with
several children in flight, told in a random order. Each case runs straight to the end, taking
a snapshot at one point and the crashed state at a later one; a resume loads the snapshot,
replays the trials between, and must hold the crashed state bit for bit (strategy included),
then go on to the same trials and the same final archive as the straight run.

Then two kill -9 searches through the CLI (async, real Ray; slow): CMA-ES, resumed with
`evomerge resume`, and subsampled M2N2 with top-ups, counting what the resumed search evaluated.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from evomerge.config import config_from_dict
from evomerge.engine.actors import build_population
from evomerge.engine.population import Population
from evomerge.engine.replay import replay
from evomerge.engine.worker import FitnessWorker
from evomerge.snapshots import load_snapshot, write_snapshot
from evomerge.strategies import STRATEGIES
from test_replay import _config, _entries, _kill_and_resume, _after_snapshot_by

# Options that keep each strategy's run short on digits; a strategy not named here runs with its
# defaults (from scratch where it can, else on the task's seeds), so a new one is covered too.
TIES = [{"method": "ties", "parameters": {"density": 0.5}}]
SHORT = {"dam": {"steps": 24, "eval_every": 3}, "static": {"merges": TIES}}
VARIANTS = {
    "m2n2-guided-cmaes": ("m2n2", {"guide": {"from": "cmaes", "every": 10}}, False, None),
    "m2n2-guided-dam": ("m2n2", {"guide": {"from": "dam", "every": 10, "options": SHORT["dam"]}}, True, None),
    "m2n2-subsample-topup": ("m2n2", {}, False, {"fraction": 0.2, "topup": "archive"}),
    "m2n2-subsample-staged": ("m2n2", {}, False, {"fraction": 0.1, "topup": "archive", "staged": True}),
    "m2n2-subsample-none": ("m2n2", {}, False, {"fraction": 0.2, "topup": "none"}),
    "cmaes-subsample": ("cmaes", {}, False, {"fraction": 0.3}),
    "m2n2-seed-with": ("m2n2", {"seed_with": TIES}, True, None),
    "m2n2-groups-subsample": ("m2n2", {}, False, {"fraction": 0.2, "topup": "archive"}),
}
TASKS = {"m2n2-groups-subsample": "grouped_tasks:GroupedDigits"}  # the rest: digits
CASES = {name: (name, SHORT.get(name, {}), not STRATEGIES.get(name).supports_scratch, None)
         for name in STRATEGIES.names()}
CASES.update(VARIANTS)
BUDGET = 60
ROUND = 4  # sync: children asked together, told in id order (the engine's rounds)
IN_FLIGHT = 5  # async: children out at a time


def _search(name: str):
    strategy, options, seeds, subsample = CASES[name]
    fitness = {"task": TASKS.get(name, "digits"), "options": {"train_size": 120}}
    data = {"name": "replay", "seed": 4, "fitness": fitness,
            "strategy": {"name": strategy, "options": options}, "budget": {"evaluations": BUDGET}}
    if seeds:
        data["seeds"] = "task"
    if subsample is not None:
        data["fitness"]["subsample"] = subsample
    return config_from_dict(data)


class Driver:
    """The engine's dispatch orders without Ray: `sync` rounds of ROUND told in id order, or
    (async) up to IN_FLIGHT children out, one of them told at random, as completion order."""

    def __init__(self, population: Population, worker: FitnessWorker, sync: bool, seed: int = 0) -> None:
        self.population, self.worker, self.sync = population, worker, sync
        self.rng = np.random.default_rng(seed)
        # re-sent children first (a round of their own in sync mode), oldest first
        self.queue = sorted(population.inflight.values(), key=lambda c: c.member_id)

    def step(self):
        population = self.population
        if self.sync and not self.queue:
            self.queue = population.ask_batch(ROUND)
        elif not self.sync:
            while len(self.queue) < IN_FLIGHT and (child := population.ask()) is not None:
                self.queue.append(child)
        assert self.queue, "nothing to evaluate"
        child = self.queue.pop(0 if self.sync else int(self.rng.integers(len(self.queue))))
        if population.basis_elements:
            self.worker.sync_elements(population.basis_elements)
        return population.tell(self.worker.evaluate_one(child.member_id, child.genome,
                                                        test_above=population.test_threshold(),
                                                        job=population.job(child)))


def _state(population: Population) -> tuple[str, dict[str, bytes]]:
    """The population's whole state (strategy included) as bytes, without the resume counters."""
    meta, arrays = population.state_dict()
    meta = {k: v for k, v in meta.items() if k != "recovery"}
    return json.dumps(meta, sort_keys=True), {k: np.asarray(v).tobytes() for k, v in arrays.items()}


def _trial(record) -> tuple:
    """A record as the study keeps it, less the evaluation's own timing."""
    return (record.number, record.member_id, record.train_score, record.test_score, record.params,
            record.parents, record.generation, record.error, record.replay, record.indices, record.topup_of,
            record.train_scores, record.test_scores, record.datapoints, record.partial)


def _through_files(meta: dict, arrays: dict) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:  # the real, pickle-free snapshot files
        return load_snapshot(write_snapshot(Path(tmp), 0, meta, arrays))


def _straight(config, sync: bool, snapshot_at: int | None = None, crash_at: int | None = None) -> dict:
    """Run to the end; the snapshot at `snapshot_at` told, the state and driver at `crash_at`."""
    population = build_population(config)
    worker = FitnessWorker(config.model_dump(mode="json"), 0)
    driver = Driver(population, worker, sync)
    run: dict = {"records": [], "worker": worker}
    while True:
        if population.told == snapshot_at:
            run["snapshot"] = _through_files(*population.state_dict())
        if population.told == crash_at:
            run["crashed"] = (_state(population), driver.rng.bit_generator.state, [c.member_id for c in driver.queue])
        if population.done:
            break
        run["records"].append(driver.step())
    run["final"] = _state(population)
    return run


def _points(total: int, name: str) -> tuple[int, int]:
    """Snapshot and crash points: a third and two thirds in; the seed merges are asked at the
    start, so that case snapshots before any ask (the engine's step-0 snapshot)."""
    return (0 if name == "m2n2-seed-with" else total // 3), (2 * total) // 3


def _run(name: str, sync: bool) -> tuple[dict, int, int]:
    """A case's straight run with its snapshot and crash points."""
    config = _search(name)
    snapshot_at, crash_at = _points(BUDGET, name)
    run = _straight(config, sync, snapshot_at, crash_at)
    if "crashed" not in run:  # the strategy ended early (static, DAM): points within its run
        snapshot_at, crash_at = _points(len(run["records"]), name)
        run = _straight(config, sync, snapshot_at, crash_at)
    run["config"] = config
    return run, snapshot_at, crash_at


def _crash(name: str, sync: bool) -> tuple:
    """A case's straight run with its snapshot and crash points, and a population loaded from
    the snapshot, ready to replay."""
    run, snapshot_at, crash_at = _run(name, sync)
    resumed = build_population(run["config"])
    resumed.load_state_dict(*run["snapshot"])
    return run, resumed, _entries(run["records"][snapshot_at:crash_at]), snapshot_at, crash_at


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_replays_and_continues_bitwise(name, sync):
    subsample = CASES[name][3]
    run, resumed, entries, snapshot_at, crash_at = _crash(name, sync)
    straight = run["records"]
    after = straight[snapshot_at:crash_at]
    if subsample is not None and subsample.get("topup") == "archive":
        assert any(r.topup_of is not None for r in after), "no top-up among the trials replayed"
    if subsample is not None:
        assert any(r.indices is not None for r in after), "no subsampled child among the trials replayed"

    report = replay(resumed, entries, study_max_member=max(r.member_id for r in straight[:crash_at]), sync=sync)
    assert report.problem is None
    assert (report.replayed, report.redone) == (crash_at - snapshot_at, 0) and report.replayed > 0
    state, driver_rng, queue = run["crashed"]
    assert _state(resumed) == state  # archive, best, counters and the strategy's state, bit for bit
    assert sorted(resumed.inflight) == sorted(queue) and report.resent == len(queue)

    driver = Driver(resumed, run["worker"], sync)
    driver.rng.bit_generator.state = driver_rng
    rest = []
    while not resumed.done:
        rest.append(driver.step())
    assert [_trial(r) for r in rest] == [_trial(r) for r in straight[crash_at:]]
    assert _state(resumed) == run["final"]


@pytest.mark.parametrize("name", ["m2n2", "m2n2-subsample-topup"])  # M2N2 wrote such payloads
def test_payloads_without_the_ask_count_replay_by_ask_order_in_sync_mode(name):
    """Payloads written before `n` existed place each ask by its ask order `a` (exact in rounds):
    the archive is the crashed one. What they cannot say is which children were asked after the
    last recorded one; those are asked afresh."""
    run, resumed, entries, snapshot_at, crash_at = _crash(name, sync=True)
    for entry in entries:
        entry.payload = {k: v for k, v in entry.payload.items() if k != "n"}
    report = replay(resumed, entries, sync=True)
    assert (report.replayed, report.redone) == (crash_at - snapshot_at, 0)
    arrays, crashed = _state(resumed)[1], run["crashed"][0][1]
    archive = ("strategy/scores", "strategy/ids", "strategy/genomes/values", "best/values")
    assert all(arrays[k] == crashed[k] for k in archive)
    assert resumed.issued == 1 + max(e.member_id for e in entries)


def _tamper(entries: list, pick, change, first_asked_again: int) -> int:
    """Change the first trial after the third whose child is asked again and `pick` likes."""
    index = next(i for i, e in enumerate(entries) if i >= 3 and e.member_id >= first_asked_again and pick(e))
    change(entries[index])
    return index


@pytest.mark.parametrize("name,pick,change,why", [
    ("cmaes", lambda e: "h" in e.payload, lambda e: e.payload.update(h="00000000"), "has another genome"),
    ("m2n2", lambda e: e.parents, lambda e: e.payload["g"]["lineage"].__setitem__(2, 7), "was made otherwise"),
    ("m2n2-subsample-topup", lambda e: e.indices is not None and e.topup_of is None,
     lambda e: setattr(e, "indices", _other_subset(e.indices)), "is scored on other datapoints"),
    ("cmaes", lambda e: True, lambda e: e.params.update(index=99), "has other params or parents"),
])
def test_a_re_asked_child_that_differs_from_its_trial_stops_the_replay(name, pick, change, why):
    run, resumed, entries, snapshot_at, crash_at = _crash(name, sync=False)
    index = _tamper(entries, pick, change, resumed.issued)
    report = replay(resumed, entries, study_max_member=max(r.member_id for r in run["records"][:crash_at]))
    assert why in report.problem and report.problem.startswith(f"trial {entries[index].number} cannot be replayed")
    assert (report.replayed, report.redone, report.first_redone) == (index, len(entries) - index,
                                                                     entries[index].number)
    later = {e.member_id for e in entries[index:]}
    assert not later & set(resumed.inflight)  # ids on the trials left in the study never come back


def _other_subset(text: str) -> str:
    from evomerge.strategies.subsets import decode_indices, encode_indices

    indices = decode_indices(text, 120)
    moved = np.setdiff1d(np.arange(120), indices)[0]
    return encode_indices(np.sort(np.append(indices[1:], moved)), 120)


# -- the engine itself (Ray, Optuna), sync ------------------------------------------------------
@pytest.mark.slow  # two Ray searches per strategy
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_engine_resume_after_a_crash_is_the_straight_search(ray_session, tmp_path, name):
    """Through the study: the reference search's run folder as a crash after its last trial
    leaves it (newest snapshot gone, trials after the one before still in the study); resume
    evaluates nothing and ends bitwise where the reference did."""
    from evomerge.engine.search import SearchOptions, resume_search, run_search
    from counting_tasks import read_log
    from test_replay import _arrays, _crashed_copy, _study

    log = tmp_path / "evaluations.log"
    config = _config("engine", log, 120, {"static": 1, "dam": 1}.get(name, 40), sync=True)
    config["strategy"] = {"name": name, "options": SHORT.get(name, {})}
    if not STRATEGIES.get(name).supports_scratch:
        config["seeds"] = "task"
    reference = tmp_path / "reference"
    config["workers"]["batch"] = 1  # rounds of 2, about one per stretch: snapshots fall inside short searches
    total = run_search(config_from_dict(config), SearchOptions(out_dir=reference, progress=False,
                                                               advance_seconds=0.01))["evaluations"]
    out, step = _crashed_copy(reference, tmp_path, total)
    evaluated = read_log(log)[0]
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False))
    assert read_log(log)[0] == evaluated  # every trial after the snapshot told back, none evaluated
    assert summary["recovery"] == {"replayed": total - step, "resent": 0, "redone": 0}
    a, b = _arrays(out), _arrays(reference)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    trials = [(t.number, t.value, t.params, t.user_attrs["member_id"])
              for t in _study(out, "engine").get_trials(deepcopy=False)]
    assert trials == [(t.number, t.value, t.params, t.user_attrs["member_id"])
                      for t in _study(reference, "engine").get_trials(deepcopy=False)]


# -- kill -9 through the CLI, async, real Ray ---------------------------------------------------
def _payload_bytes(attrs: list[dict]) -> float:
    return float(np.mean([len(json.dumps(a["replay"], separators=(",", ":"))) for a in attrs]))


@pytest.mark.slow  # ~110 s here (two Ray start-ups); the suite above covers CMA-ES's async replay in-process
def test_kill_9_of_an_async_cmaes_search_then_evomerge_resume(ray_session, tmp_path):
    config = _config("cmaes", tmp_path / "evaluations.log", 400, 100)
    config["strategy"] = {"name": "cmaes"}
    summary, before, step = _kill_and_resume(ray_session, tmp_path, _after_snapshot_by(50), config=config, cli=True)
    assert summary["recovery"]["replayed"] >= 50
    attrs = [view[4] for view in before if view[0] >= step]  # the trials told back
    assert all("h" in a["replay"] and a["replay"]["g"] is None for a in attrs if a["parents"] == [])
    print("payload bytes per trial (CMA-ES, digits 300):", _payload_bytes(attrs))


@pytest.mark.slow  # ~80 s here
def test_kill_9_of_a_subsampled_m2n2_search_with_topups(ray_session, tmp_path):
    """The archive after kill + resume is made of exactly the recorded scores, over the
    recorded subsets: every replayed child drew the same subset again (the replay checks it)."""
    from evomerge import snapshots
    from evomerge.strategies.subsets import decode_indices
    from evomerge.tracking import replay_payload
    from test_replay import _study

    config = _config("subsampled", tmp_path / "evaluations.log", 400, 100)
    config["fitness"]["subsample"] = {"fraction": 0.2, "topup": "archive"}
    summary, before, step = _kill_and_resume(ray_session, tmp_path, _after_snapshot_by(50), config=config)
    replayed = [view[4] for view in before if view[0] >= step]
    assert any("topup_of" in a for a in replayed) and any("datapoint_indices" in a for a in replayed)
    print("payload bytes per trial (subsampled M2N2, digits 300):", _payload_bytes(replayed),
          "+ datapoint_indices:", np.mean([len(a["datapoint_indices"]) for a in replayed if "datapoint_indices" in a]))

    n = 300
    rows: dict[int, np.ndarray] = {}
    for trial in _study(tmp_path / "run", "subsampled").get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if "error" in attrs:
            continue
        indices = decode_indices(attrs.get("datapoint_indices"), n)
        indices = np.arange(n) if indices is None else indices
        member = attrs.get("topup_of", attrs["member_id"])
        row = rows.setdefault(member, np.full(n, np.nan))
        row[indices] = replay_payload.decode_scores(attrs["replay"]["s"], len(indices))
    arrays = snapshots.load_latest_snapshot(tmp_path / "run")[2]
    members = [(int(m), row) for m, row in zip(arrays["strategy/ids"], arrays["strategy/scores"]) if m >= 0]
    assert len(members) >= 10
    for member, row in members:  # each archive row is its child's subset and top-up, fully known
        assert np.array_equal(rows[member], row), member


class _SlowJob:
    """DAM's training thread made deterministic: the chunk is trained at once, but the job says
    it is still running for the first two looks, as a thread still busy would."""

    def __init__(self, work, name: str) -> None:
        self._error, self._looks = None, 0
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed back by result(), as the real job does
            self._error = exc

    def done(self) -> bool:
        self._looks += 1
        return self._looks > 2

    def wait(self, timeout=None) -> None:
        pass

    def result(self) -> None:
        if self._error is not None:
            raise self._error


def test_async_dam_guide_turns_that_found_training_busy_are_replayed(monkeypatch):
    """An async search's DAM guide trains on a thread: some guide turns found it busy and gave
    the turn to M2N2. The resume replays without the thread, told by each trial whose child it
    was, and ends with the crashed state bit for bit, nothing evaluated again."""
    import evomerge.strategies.dam as dam
    import test_replay_strategies as here

    monkeypatch.setattr(dam, "BackgroundJob", _SlowJob)
    real_build = here.build_population

    def build_in_background(config):
        population = real_build(config)
        population.strategy.allow_background(True)  # the async engine's setting (actors.py)
        return population

    monkeypatch.setattr(here, "build_population", build_in_background)
    run, resumed, entries, snapshot_at, crash_at = _crash("m2n2-guided-dam", sync=False)
    guide_children = [e for e in entries if e.params.get("guide")]
    assert guide_children, "no guide child among the trials replayed"
    report = replay(resumed, entries, study_max_member=max(r.member_id for r in run["records"][:crash_at]))
    assert report.problem is None
    assert (report.replayed, report.redone) == (crash_at - snapshot_at, 0)
    state, _, queue = run["crashed"]
    assert _state(resumed) == state
    assert sorted(resumed.inflight) == sorted(queue)
