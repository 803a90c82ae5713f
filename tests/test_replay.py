"""A crash loses no finished evaluation: resume replays the trials recorded after the snapshot.

The kill tests run the search as a CLI process (its own embedded Ray), kill its process group
with SIGKILL at a chosen point, and resume it here. A fitness that logs every evaluate call (from
the worker processes, through a file) counts what the resumed search evaluated: exactly the
budget minus the trials recorded before the kill, so no recorded evaluation was done twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from conftest import REPO, TESTS_DIR
from counting_tasks import read_log
from evomerge import snapshots
from evomerge.config import config_from_dict
from evomerge.engine.search import SearchOptions, resume_search, run_search
from evomerge.tracking import replay_payload
from evomerge.tracking.storage import JOURNAL_NAME, open_storage

EVOMERGE = str(Path(sys.executable).parent / "evomerge")
CREATE_TRIAL = b'"op_code":4,'


# -- the payload, by hand ------------------------------------------------------------------------
def test_scores_are_encoded_exactly_and_compactly():
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=np.float32)
    text = replay_payload.encode_scores(bits)
    # 9 bits -> 2 bytes 0b10110000 0b10000000 -> base64 "sIA="
    assert text == "b:sIA="
    assert replay_payload.decode_scores(text, 9).tobytes() == bits.tobytes()
    halves = np.array([0.5, 0.25, 0.75], dtype=np.float32)  # exact in float16: 2 bytes each
    assert replay_payload.encode_scores(halves).startswith("h:")
    assert len(replay_payload.encode_scores(halves)) == 2 + 8  # 6 bytes -> 8 base64 characters
    assert replay_payload.decode_scores(replay_payload.encode_scores(halves), 3).tobytes() == halves.tobytes()
    third = np.array([1 / 3, 0.1], dtype=np.float32)  # not exact in float16: kept as float32
    assert replay_payload.encode_scores(third).startswith("f:")
    assert replay_payload.decode_scores(replay_payload.encode_scores(third), 2).tobytes() == third.tobytes()
    with pytest.raises(replay_payload.PayloadError, match="2 bytes of bits, expected 3"):
        replay_payload.decode_scores(text, 17)
    with pytest.raises(replay_payload.PayloadError):
        replay_payload.decode_scores("b:!!", 9)
    with pytest.raises(replay_payload.PayloadError, match="version 0"):
        replay_payload.decode({"v": 0})
    with pytest.raises(replay_payload.PayloadError, match="no replay payload"):
        replay_payload.decode(None)


# -- helpers -------------------------------------------------------------------------------------
def _config(name: str, log: Path, budget: int, every: int, sync: bool = False, sleep: float = 0.004) -> dict:
    return {
        "name": name, "seed": 5, "sync": sync,
        "fitness": {"task": "counting_tasks:CountingDigits",
                    "options": {"train_size": 300, "log": str(log), "sleep": sleep}},
        "budget": {"evaluations": budget}, "workers": {"count": 2},
        "snapshots": {"every": every}, "ray": {"num_cpus": 2, "object_store_memory_mb": 100},
    }


def _study(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(run_dir / JOURNAL_NAME)))


def _view(trial: optuna.trial.FrozenTrial) -> tuple:
    return (trial.number, trial.state, trial.value, trial.params, trial.user_attrs,
            trial.datetime_start, trial.datetime_complete)


def _recorded(run_dir: Path) -> int:
    path = run_dir / JOURNAL_NAME
    return path.read_bytes().count(CREATE_TRIAL) if path.is_file() else 0


def _kill_when(tmp_path: Path, config: dict, ready, timeout: float = 180) -> Path:
    """Run `evomerge search` and SIGKILL its process group (driver and embedded Ray) once
    `ready(run_dir)` holds."""
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)])}
    proc = subprocess.Popen([EVOMERGE, "search", str(cfg), "--out", str(out), "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready(out):
            if proc.poll() is not None:
                raise AssertionError(f"search ended before the kill point: {proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the kill point never came")
            time.sleep(0.01)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(1.0)  # the embedded Ray's workers die with the group; let the last writes land
    return out


def _after_snapshot(step: int):
    return lambda out: any(int(p.name.split("-")[1]) >= step for p in snapshots.list_snapshots(out))


def _newest_step(out: Path) -> int | None:
    kept = snapshots.list_snapshots(out)
    return int(kept[-1].name.split("-")[1]) if kept else None


def _after_snapshot_by(trials: int, every: int = 100):
    """Once `trials` more than the newest snapshot (past step 0) are recorded."""
    def ready(out: Path) -> bool:
        step = _newest_step(out)
        return step is not None and step >= every and _recorded(out) >= step + trials
    return ready


def _resume_with_cli(out: Path) -> dict:
    """`evomerge resume` as a user types it (its own embedded Ray); the summary it wrote."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)])}
    done = subprocess.run([EVOMERGE, "resume", str(out), "--quiet"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot be replayed" not in done.stderr, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _kill_and_resume(ray_session, tmp_path: Path, ready, budget: int = 400, every: int = 100,
                     config: dict | None = None, cli: bool = False) -> tuple[dict, list, int]:
    log = tmp_path / "evaluations.log"
    if config is None:
        config = _config("replay", log, budget, every)
    out = _kill_when(tmp_path, config, ready)
    assert not (out / "summary.json").exists(), "the search finished before it was killed"
    before = [_view(t) for t in _study(out, config["name"]).get_trials(deepcopy=False)]
    evaluated_before, _ = read_log(log)
    step = int(snapshots.load_latest_snapshot(out)[1]["population"]["told"])
    summary = _resume_with_cli(out) if cli else resume_search(out, SearchOptions(out_dir=out, progress=False))
    evaluated_after = read_log(log)[0] - evaluated_before
    after = _study(out, config["name"]).get_trials(deepcopy=False)
    # trials = evaluations = budget, member ids unique, nothing recorded before the kill changed
    assert summary["evaluations"] == budget == len(after)
    assert [t.number for t in after] == list(range(budget))
    ids = [t.user_attrs["member_id"] for t in after]
    assert len(set(ids)) == budget
    assert [_view(t) for t in after[:len(before)]] == before
    # evaluations done twice: what the resumed search evaluated beyond what was not recorded
    assert evaluated_after - (budget - len(before)) == 0
    assert summary["recovery"]["redone"] == 0
    assert summary["recovery"]["replayed"] == len(before) - step  # every trial after the snapshot
    return summary, before, step


# -- kill -9 in async mode -----------------------------------------------------------------------
def test_kill_midway_between_snapshots_loses_and_redoes_nothing(ray_session, tmp_path):
    summary, before, step = _kill_and_resume(ray_session, tmp_path, _after_snapshot_by(50))
    assert step >= 100 and len(before) >= step + 50
    status = subprocess.run([EVOMERGE, "status", str(tmp_path / "run")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)])})
    assert status.returncode == 0, status.stderr
    assert f"{summary['recovery']['replayed']} replayed from the study" in status.stdout


@pytest.mark.slow
def test_kill_right_after_a_snapshot(ray_session, tmp_path):
    _kill_and_resume(ray_session, tmp_path, _after_snapshot(100))


@pytest.mark.slow
def test_kill_just_before_the_next_snapshot(ray_session, tmp_path):
    _, before, step = _kill_and_resume(ray_session, tmp_path, _after_snapshot_by(85))
    assert len(before) >= step + 85


@pytest.mark.slow
def test_tiny_lm_recipe_search_replays_recipes_after_a_kill(ray_session, tmp_path):
    from evomerge.fixtures.tiny_lm import make_tiny_lm

    info = make_tiny_lm(tmp_path / "models", scale="test", seed=0, data_dir=tmp_path / "data")
    log = tmp_path / "evaluations.log"
    options = {"model": info["models"]["base"], "data": [info["data"]["add_train"], info["data"]["rev_train"]],
               "limit": 16, "max_new_tokens": 6, "batch_size": 32, "log": str(log)}
    config = {"name": "tiny", "seed": 0, "seeds": [info["models"]["expert_add"], info["models"]["expert_rev"]],
              "fitness": {"task": "counting_lm_tasks:CountingExactMatch", "options": options},
              "strategy": {"name": "m2n2", "options": {"mutation_sigma": 0.0}},
              "budget": {"evaluations": 120}, "workers": {"count": 2, "batch": 1},
              "snapshots": {"every": 20}, "ray": {"num_cpus": 2, "object_store_memory_mb": 100}}
    # 120 evaluations: room after the first snapshot for the kill point, whatever a stretch holds
    # (with 60, a machine whose stretches ran 20 trials each ended the search before it)
    summary, before, step = _kill_and_resume(ray_session, tmp_path, _after_snapshot_by(8, every=20), budget=120,
                                             config=config)
    assert summary["recovery"]["replayed"] >= 8
    attrs = [view[4] for view in before if view[0] >= step]  # the trials told back
    # the payload names recipe children by lineage: parents, slots, split and mix ratio
    assert all("lineage" in a["replay"]["g"] for a in attrs if a["parents"])
    print("payload bytes per trial (tiny LM):", np.mean([len(json.dumps(a["replay"], separators=(",", ":")))
                                                        for a in attrs]))


# -- sync mode: bitwise, and a corrupt payload ---------------------------------------------------
@pytest.fixture(scope="module")
def sync_run(ray_session, tmp_path_factory) -> tuple[Path, dict]:
    """A finished sync search (300 evaluations, snapshots every 50), kept as the reference."""
    root = tmp_path_factory.mktemp("sync")
    config = _config("sync", root / "evaluations.log", 300, 50, sync=True)
    out = root / "run"
    # One sync round (8 children) per stretch, so the snapshots fall at the first round after each
    # 50 whatever the machine's speed: with 0.25 s stretches a fast machine took the last one at
    # 298 or 299, leaving the tests below no trials after it to corrupt.
    summary = run_search(config_from_dict(config), SearchOptions(out_dir=out, progress=False, advance_seconds=0))
    return out, summary


def _crashed_copy(reference: Path, tmp_path: Path, total: int = 300) -> tuple[Path, int]:
    """The reference run as a crash after its last trial would leave it: no final snapshot, no
    summary; the study still holds the trials written since the snapshot before; its step."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    kept = snapshots.list_snapshots(out)
    assert len(kept) >= 2, "the reference search wrote one snapshot only"
    shutil.rmtree(kept[-1])
    (out / "summary.json").unlink()
    step = int(snapshots.load_latest_snapshot(out)[1]["population"]["told"])
    assert 0 < step < total
    return out, step


def _arrays(run_dir: Path) -> dict[str, np.ndarray]:
    return snapshots.load_latest_snapshot(run_dir)[2]


@pytest.mark.slow  # tests/test_resume.py's kill -9 test covers sync replay in CI (bitwise, redone 0)
def test_sync_replay_is_bitwise_the_uninterrupted_search(sync_run, tmp_path):
    reference, _ = sync_run
    out, step = _crashed_copy(reference, tmp_path)
    log = Path(json.loads((out / "config.json").read_text())["fitness"]["options"]["log"])
    evaluated = read_log(log)[0]
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False))
    assert read_log(log)[0] == evaluated  # nothing evaluated: every trial after the snapshot replayed
    assert summary["recovery"] == {"replayed": 300 - step, "resent": 0, "redone": 0}
    a, b = _arrays(out), _arrays(reference)
    for key in ("strategy/genomes/values", "strategy/scores", "strategy/ids", "best/values"):
        assert a[key].tobytes() == b[key].tobytes(), key
    meta_a = snapshots.load_latest_snapshot(out)[1]["population"]
    meta_b = snapshots.load_latest_snapshot(reference)[1]["population"]
    assert meta_a["strategy"]["rng"] == meta_b["strategy"]["rng"]  # the next ask is the same
    assert (meta_a["issued"], meta_a["told"]) == (meta_b["issued"], meta_b["told"]) == (300, 300)
    assert len(_study(out, "sync").get_trials(deepcopy=False)) == 300


def _corrupt_trial(run_dir: Path, number: int) -> None:
    path = run_dir / JOURNAL_NAME
    lines = path.read_bytes().split(b"\n")
    index = [i for i, line in enumerate(lines) if CREATE_TRIAL in line][number]
    entry = json.loads(lines[index])
    entry["user_attrs"]["replay"]["s"] = "b:not base64!"
    lines[index] = json.dumps(entry, separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(lines))


def test_corrupt_payload_falls_back_with_a_warning(sync_run, tmp_path, capsys):
    reference, _ = sync_run
    out, step = _crashed_copy(reference, tmp_path)
    bad = step + (300 - step) // 2 + 1
    trials = _study(out, "sync").get_trials(deepcopy=False)
    asked = trials[bad].user_attrs["replay"]["a"]
    round_start = min(t.number for t in trials if t.user_attrs["replay"]["a"] == asked)
    assert step <= round_start < bad  # a sync round of 8 asked together: the replay stops at its start
    _corrupt_trial(out, bad)
    log = Path(json.loads((out / "config.json").read_text())["fitness"]["options"]["log"])
    evaluated = read_log(log)[0]
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False))
    err = capsys.readouterr().err
    assert f"trial {bad} cannot be replayed: scores are not valid base64" in err
    assert f"evaluates again the {300 - round_start} evaluation(s) recorded from trial {round_start} on" in err
    assert summary["recovery"] == {"replayed": round_start - step, "resent": 0, "redone": 300 - round_start}
    assert read_log(log)[0] - evaluated == 300 - round_start
    after = _study(out, "sync").get_trials(deepcopy=False)
    assert len(after) == summary["evaluations"] == 300
    assert len({t.user_attrs["member_id"] for t in after}) == 300
    assert json.loads((out / "summary.json").read_text())["recovery"]["redone"] == 300 - round_start
    # sync mode: redoing the round from its start asks the same children again, bit for bit
    a, b = _arrays(out), _arrays(reference)
    for key in ("strategy/genomes/values", "strategy/scores", "strategy/ids", "best/values"):
        assert a[key].tobytes() == b[key].tobytes(), key


def test_trial_durations_are_the_evaluations_own(sync_run):
    reference, _ = sync_run
    trials = _study(reference, "sync").get_trials(deepcopy=False)
    for trial in trials:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
        assert duration == pytest.approx(trial.user_attrs["seconds"], abs=2e-6)  # microsecond clock
    assert all(t.duration.total_seconds() > 0 for t in trials)
    # a batch is recorded together, but its trials start one after the other on their worker
    assert len({t.datetime_start for t in trials}) > len(trials) // 2


# -- the replay itself, in one process (no Ray): async interleaving, and the fallback's ids ------
def _async_run(told_at_snapshot: int, told_at_crash: int, in_flight: int = 6):
    """An M2N2 digits search in one process with `in_flight` children out at a time (told oldest
    first, as an async search interleaves asks and tells); the snapshot's state, the records
    after it, and the population as the crash left it."""
    from evomerge.engine.actors import build_population
    from evomerge.engine.worker import FitnessWorker

    config = config_from_dict({"name": "inproc", "seed": 1, "fitness": {"task": "digits",
                                                                       "options": {"train_size": 120}},
                               "budget": {"evaluations": 200}})
    population = build_population(config)
    worker = FitnessWorker(config.model_dump(mode="json"), 0)
    queue, records, snapshot = [], [], None
    while population.told < told_at_crash:
        while len(queue) < in_flight and (child := population.ask()) is not None:
            queue.append(child)
        child = queue.pop(0)
        records.append(population.tell(worker.evaluate_one(child.member_id, child.genome)))
        if population.told == told_at_snapshot:
            meta, arrays = population.state_dict()
            snapshot = (json.loads(json.dumps(meta)), {k: np.array(v) for k, v in arrays.items()})
    return config, snapshot, records[told_at_snapshot:], population


def _entries(records) -> list:
    from evomerge.engine.replay import TrialEntry

    return [TrialEntry(number=r.number, member_id=r.member_id, failed=r.failed, value=r.train_score,
                       test_score=r.test_score, error=r.error, seconds=r.seconds, params=dict(r.params),
                       parents=list(r.parents), generation=r.generation, payload=json.loads(r.replay),
                       test_scores=r.test_scores, indices=r.indices, topup_of=r.topup_of)
            for r in records]


def test_replay_rebuilds_the_crashed_archive_from_interleaved_asks():
    from evomerge.engine.actors import build_population
    from evomerge.engine.replay import replay

    config, (meta, arrays), after, crashed = _async_run(30, 55)
    resumed = build_population(config)
    resumed.load_state_dict(meta, arrays)
    assert resumed.inflight  # children out at the snapshot: some are among the trials after it
    report = replay(resumed, _entries(after), study_max_member=max(r.member_id for r in after))
    assert (report.replayed, report.redone) == (25, 0)
    assert resumed.told == crashed.told == 55
    for name in ("scores", "ids", "generations"):
        assert getattr(resumed.strategy, name).tobytes() == getattr(crashed.strategy, name).tobytes(), name
    for a, b in zip(resumed.strategy.genomes, crashed.strategy.genomes):
        assert (a is None and b is None) or a.tobytes() == b.tobytes()
    assert resumed.best.member_id == crashed.best.member_id
    # every child the crashed search had asked is asked again: the next ask is where it left off
    assert resumed.issued == crashed.issued
    assert resumed.strategy.rng.bit_generator.state == crashed.strategy.rng.bit_generator.state
    # re-sent under their own ids: the snapshot's children and the ones asked after it that no
    # trial holds (in flight when the process died)
    told_ids = {r.member_id for r in after}
    assert set(resumed.inflight) == set(crashed.inflight)
    assert set(int(c["member_id"]) for c in meta["inflight"]) - told_ids <= set(resumed.inflight)
    assert set(resumed.inflight) - set(int(c["member_id"]) for c in meta["inflight"])  # asked after it
    assert report.resent == len(resumed.inflight)


def test_fallback_gives_fresh_ids_past_the_study():
    from evomerge.engine.actors import build_population
    from evomerge.engine.replay import replay

    config, (meta, arrays), after, _ = _async_run(30, 55)
    entries = _entries(after)
    entries[2].payload = {**entries[2].payload, "v": 99}  # a trial from another version
    resumed = build_population(config)
    resumed.load_state_dict(meta, arrays)
    study_max = max(r.member_id for r in after)
    report = replay(resumed, entries, study_max_member=study_max)
    assert (report.replayed, report.redone, report.first_redone) == (2, 23, 32)
    assert "trial 32 cannot be replayed: replay payload version 99 is not 1" in report.problem
    assert resumed.told == 32 and resumed.issued > study_max
    later = {e.member_id for e in entries[2:]}
    # children in flight whose ids are on the trials left in the study go out again under new
    # ids: the snapshot's, and the ones asked again before the two tells replayed
    asked_again = set(range(meta["issued"], entries[1].payload["n"]))
    assert asked_again  # the async interleaving asked some after the snapshot, before trial 31
    in_flight = ({int(c["member_id"]) for c in meta["inflight"]} | asked_again) - {e.member_id for e in entries[:2]}
    assert set(report.renumbered) == in_flight & later != set()
    assert not later & set(resumed.inflight)
    fresh = set(resumed.inflight) - (in_flight - later)
    assert len(fresh) == len(report.renumbered) and min(fresh) > study_max
    assert resumed.recovery == {"replayed": 2, "resent": len(resumed.inflight), "redone": 23}
