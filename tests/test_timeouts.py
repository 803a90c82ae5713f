"""`workers.timeout_seconds`: a child that hangs becomes a FAIL trial and the search goes on.

Two levels (evomerge/engine/timeouts.py): the worker's alarm stops a hang in Python code, and the
dispatcher restarts a worker stuck where the alarm cannot reach.
"""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import digits_config
from evomerge.engine.actors import build_population, start_workers
from evomerge.engine.dispatch import Dispatcher
from evomerge.engine.search import SearchOptions, run_search
from evomerge.engine.timeouts import Alarm, EvaluationTimeout, HangWatch
from evomerge.tracking.storage import open_storage


def test_the_alarm_stops_a_sleep_and_a_task_cannot_swallow_it():
    def stubborn_task():
        try:
            time.sleep(30)
        except Exception:  # a task's own catch-all must not hide the timeout
            time.sleep(30)

    with pytest.raises(EvaluationTimeout, match="workers.timeout_seconds=0.2 s"):
        with Alarm(0.2):
            stubborn_task()
    with Alarm(None):  # no limit: nothing armed
        pass


def test_the_alarm_is_off_outside_the_main_thread_and_after_its_block():
    armed = []
    thread = threading.Thread(target=lambda: armed.append(Alarm(0.1).armed))
    thread.start()
    thread.join()
    assert armed == [False]  # signals reach the main thread only; the dispatcher's limit remains
    with Alarm(0.05):
        pass
    time.sleep(0.2)  # the timer was cleared on leaving the block: nothing rings here


def test_hang_watch_by_hand():
    """Limits are timeout x children + grace, counted from when a call became its worker's oldest."""
    assert HangWatch(1, None).until_hang() is None and HangWatch(1, None).overdue() == []
    watch = HangWatch(2, timeout=2.0, grace_seconds=5.0)
    watch.started(0, "a", 3)  # limit 2 x 3 + 5 = 11 s
    watch.started(0, "b", 1)  # queued behind a: limit 7 s once a is done
    watch.started(1, "c", 1)  # limit 7 s
    now = time.monotonic()
    watch.head_since[0], watch.head_since[1] = now - 10.0, now - 8.0  # a has 1 s left, c is 1 s over
    assert watch.until_hang() == pytest.approx(-1.0, abs=0.5)
    assert watch.overdue() == [1] and watch.overdue() == []  # marked once
    assert watch.verdict("c") == (True, False) and watch.verdict("c") == (False, False)
    watch.finished(1, "c")
    assert watch.until_hang() == pytest.approx(1.0, abs=0.5)  # only a is timed now
    watch.finished(0, "a")  # b is the oldest now, and its clock starts
    assert watch.head_since[0] >= now and watch.until_hang() == pytest.approx(7.0, abs=0.5)
    watch.started(0, "d", 2)
    watch.head_since[0] = now - 8.0  # b overdue, with d queued behind it
    assert watch.overdue() == [0]
    assert watch.verdict("b") == (True, False) and watch.verdict("d") == (False, True)


def test_hang_watch_spares_a_call_that_is_back_but_not_yet_taken():
    """The population actor busy elsewhere (DAM training inline on a worker) for longer than a
    limit: a call that finished meanwhile is overdue on the clock, but it is not stuck."""
    watch = HangWatch(2, timeout=1.0, grace_seconds=1.0)
    watch.started(0, "back", 1)
    watch.started(1, "stuck", 1)
    watch.head_since[0] = watch.head_since[1] = time.monotonic() - 5.0  # both 3 s past their 2 s
    assert watch.overdue(done=lambda ref: ref == "back") == [1]
    assert watch.overdue() == [0]  # without the question, the call that is back would be killed
    assert watch.verdict("stuck") == (True, False)


def _hang_config(name, tmp_path, task, every, **overrides):
    log = tmp_path / "hangs.txt"
    options = {"train_size": 300, "log": str(log), "every": every}
    return digits_config(name, fitness={"task": f"flaky_tasks:{task}", "options": options}, **overrides), log


def test_a_child_that_hangs_is_stopped_by_the_worker_and_recorded_failed(ray_session, tmp_path):
    config, log = _hang_config("hang", tmp_path, "HangingDigits", 10, budget={"evaluations": 80},
                               workers={"count": 2, "batch": 4, "timeout_seconds": 1.0})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    trials = optuna.load_study(study_name=summary["study_name"],
                               storage=open_storage(summary["storage"])).get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    hangs = log.read_text().split()
    assert len(trials) == summary["evaluations"] == 80
    assert sorted(t.user_attrs["member_id"] for t in trials) == list(range(80))
    assert hangs and len(failed) == len(hangs) == len(set(hangs))  # each hang failed once: its child only
    # stopped by the worker's alarm (the dispatcher's restart would say "stuck past")
    assert all("stopped: the evaluation ran longer than workers.timeout_seconds=1 s" in t.user_attrs["error"]
               for t in failed)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_worker_stuck_out_of_the_alarms_reach_is_restarted(ray_session, tmp_path, sync):
    """The hang blocks SIGALRM, as native code would: the dispatcher kills the worker after the
    call's limit, the children queued behind it go out again free, and the stuck child alone
    uses up its retries and fails. The limit, 0.5 s, leaves a loaded CI machine room for the
    healthy calls (at 0.2 s one of them was once taken for stuck in a full run)."""
    config, log = _hang_config("stuck", tmp_path, "StuckDigits", 8, budget={"evaluations": 48}, sync=sync,
                               workers={"count": 2, "batch": 3, "timeout_seconds": 0.5,
                                        "max_retries_per_child": 1, "max_restarts": 10})
    population = build_population(config)
    workers = start_workers(config)
    dispatcher = Dispatcher(population, workers, batch=3, sync=sync, max_retries_per_child=1,
                            max_worker_deaths=11, timeout=0.5, grace_seconds=1.0)
    records = []
    deadline = time.monotonic() + 240
    while not population.done and time.monotonic() < deadline:
        records.extend(dispatcher.advance(1.0))
    assert population.done, "the search did not get past the stuck children"
    assert sorted(r.member_id for r in records) == list(range(48))
    failed = [r for r in records if r.failed]
    hangs = log.read_text().split()
    assert failed and all("stuck past workers.timeout_seconds=0.5 s and restarted 2 times" in r.error
                          for r in failed)
    # every stuck child failed and nothing else did: a child killed with a stuck one in its call
    # went out again alone (a stuck child is logged when it starts, so once or twice)
    assert len(set(hangs)) == len(failed) and len(hangs) <= 2 * len(failed)
