"""Workers that die: killed from outside mid-search, or killed by the child they evaluate."""

from __future__ import annotations

import os
import signal
import threading
import time

import optuna
from optuna.trial import TrialState

from conftest import digits_config
from evomerge.engine.search import SearchOptions, run_search
from evomerge.tracking.storage import open_storage


def _trials(summary):
    study = optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))
    return study.get_trials(deepcopy=False)


def _worker_pids() -> list[int]:
    """Ray titles actor processes `ray::FitnessWorker...`; read that from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"ray::FitnessWorker" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_killed_worker_loses_and_duplicates_nothing(ray_session, tmp_path):
    budget = 500
    config = digits_config("kill", fitness={"task": "flaky_tasks:SlowDigits", "options": {"train_size": 300}},
                           budget={"evaluations": budget})
    result = {}
    search = threading.Thread(target=lambda: result.update(
        summary=run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))))
    search.start()
    killed = None
    deadline = time.monotonic() + 60
    journal = tmp_path / "run" / "optuna.journal"
    while killed is None and time.monotonic() < deadline:
        pids = _worker_pids()
        if pids and journal.exists() and journal.stat().st_size > 20_000:  # well into the search
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    search.join(timeout=300)
    assert killed is not None, "never saw a fitness worker process to kill"
    summary = result["summary"]
    trials = _trials(summary)
    assert len(trials) == summary["evaluations"] == budget
    member_ids = [t.user_attrs["member_id"] for t in trials]
    assert sorted(member_ids) == list(range(budget))  # nothing lost, nothing recorded twice
    assert summary["failed"] == 0  # the re-sent children were evaluated by the restarted worker
    assert killed not in _worker_pids()


def test_child_that_keeps_killing_its_worker_is_marked_failed(ray_session, tmp_path):
    config = digits_config("killer", fitness={"task": "flaky_tasks:KillerDigits", "options": {"train_size": 300}},
                           budget={"evaluations": 80}, sync=True,
                           workers={"count": 2, "batch": 1, "max_retries_per_child": 1, "max_restarts": 5})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    trials = _trials(summary)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(trials) == summary["evaluations"] == 80
    assert failed and summary["failed"] == len(failed)
    assert all("worker died 2 times" in t.user_attrs["error"] for t in failed)
    assert sorted(t.user_attrs["member_id"] for t in trials) == list(range(80))


def test_restarted_worker_rebuilds_the_added_basis_elements(ray_session, tmp_path):
    """DAM's merge has joined the recipe basis; a worker killed after that comes back with a
    fresh basis and must rebuild the element before it can evaluate children that use it."""
    from evomerge.snapshots import load_snapshot

    budget = 400
    guide = {"from": "dam", "every": 10, "share": 0.25, "options": {"steps": 20, "eval_every": 5, "batch_size": 64}}
    config = digits_config("elements", seeds="task", genome={"kind": "recipe"},
                           fitness={"task": "flaky_tasks:SlowerDigits", "options": {"train_size": 300}},
                           strategy={"name": "m2n2", "options": {"guide": guide}},
                           budget={"evaluations": budget}, snapshots={"every": 40})
    result = {}
    search = threading.Thread(target=lambda: result.update(
        summary=run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))))
    search.start()
    killed, had_elements = None, False
    deadline = time.monotonic() + 120
    snaps = tmp_path / "run" / "snapshots"
    while killed is None and time.monotonic() < deadline and search.is_alive():
        steps = sorted(snaps.glob("step-*")) if snaps.exists() else []
        if steps and int(steps[-1].name.split("-")[1]) >= 120:
            _, arrays = load_snapshot(steps[-1])
            had_elements = "strategy/elements/kinds" in arrays
            pids = _worker_pids()
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    search.join(timeout=300)
    assert killed is not None, "never got to kill a fitness worker mid-search"
    assert had_elements, "DAM's merge had not joined the basis before the kill; the test proves nothing"
    summary = result["summary"]
    assert summary["evaluations"] == budget and summary["failed"] == 0
    assert len(_trials(summary)) == budget
