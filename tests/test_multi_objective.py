"""One objective per skill: a task with `groups` gets a multi-objective Optuna study.

The study has one maximised direction per group, each trial's values are the mean train scores of
its groups' datapoints, and its user attributes hold the mean over all datapoints (`train_score`)
and the held-out score per group (`test_scores`). Single-objective studies are unchanged.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from safetensors.numpy import load_file

from conftest import digits_config
from evomerge.engine.population import EvalRecord, group_means
from evomerge.engine.search import SearchOptions, resume_search, run_search
from evomerge.errors import ConfigError
from evomerge.strategies.base import Evaluation
from evomerge.tasks import FitnessTask, check_groups
from evomerge.tracking.recorder import JournalBulkWriter, TrialRecorder, record_to_trial
from evomerge.tracking.rdb_writer import RDBBulkWriter
from evomerge.tracking.storage import open_storage
from grouped_tasks import HEAD, GroupedDigits

optuna.logging.set_verbosity(optuna.logging.WARNING)

TASK = "grouped_tasks:GroupedDigits"
TRAIN = 300
GROUPS = ["head", "tail"]


def _config(name: str, budget: int, **overrides):
    overrides.setdefault("fitness", {"task": TASK, "options": {"train_size": TRAIN}})
    return digits_config(name, budget={"evaluations": budget}, **overrides)


def _study(run_dir: Path) -> optuna.Study:
    summary = json.loads((run_dir / "summary.json").read_text())
    return optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))


def _assert_trials_are_group_means(trials: list[optuna.trial.FrozenTrial]) -> None:
    """Each complete trial: values are per-group means of 0/1 scores (k/100, k/200), and its
    train_score attribute is their datapoint-weighted mean."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for t in complete:
        head, tail = t.values
        assert head * HEAD == pytest.approx(round(head * HEAD), abs=1e-4)
        assert tail * (TRAIN - HEAD) == pytest.approx(round(tail * (TRAIN - HEAD)), abs=1e-4)
        assert t.user_attrs["train_score"] == pytest.approx((HEAD * head + (TRAIN - HEAD) * tail) / TRAIN, abs=1e-6)
        assert "test_scores" in t.user_attrs


# -- the contract ---------------------------------------------------------------------------


def test_check_groups():
    assert check_groups(None, 5) is None
    assert check_groups([("a", 2), ["b", np.int64(3)]], 5) == [("a", 2), ("b", 3)]
    for bad, why in [([("a", 2), ("b", 2)], "hold 4"), ([("a", 2), ("a", 3)], "unique"), ([("", 5)], "non-empty"),
                     ([("a", 0), ("b", 5)], "at least one"), ([], "empty"), ([("a",)], "pairs")]:
        with pytest.raises(ValueError, match=why):
            check_groups(bad, 5)


def test_default_task_has_no_groups():
    from fitness.digits import DigitsTask

    task = DigitsTask({"train_size": 20})
    params = np.zeros(task.dimension, dtype=np.float32)
    assert task.groups is None and task.test_scores(params) is None
    assert task.held_out(params) == (task.test_score(params), None)
    assert FitnessTask.groups.fget(task) is None


def test_group_means_and_the_wire():
    scores = np.array([1, 0, 1, 1, 0], dtype=np.float32)
    assert group_means(scores, [("a", 2), ("b", 3)]) == {"a": 0.5, "b": pytest.approx(2 / 3)}
    back = pickle.loads(pickle.dumps(Evaluation(4, scores, 0.5, None, 0.1, test_scores={"a": 0.25}), protocol=5))
    assert back.test_scores == {"a": 0.25} and back.test_score == 0.5 and np.array_equal(back.scores, scores)
    old = pickle.loads(pickle.dumps(Evaluation(4, scores, 0.5)))
    assert old.test_scores is None


def test_population_records_per_group_means_and_snapshots_them():
    """Without Ray: each record's train_scores are the group means of that child's own scores,
    its test_scores the task's per-group test; the best's survive a state_dict round trip."""
    from evomerge.engine.actors import build_population
    from evomerge.engine.worker import FitnessWorker

    config = _config("pop", 16, fitness__test_every="all")
    population = build_population(config)
    assert population.groups == [("head", HEAD), ("tail", TRAIN - HEAD)]
    worker = FitnessWorker(config.model_dump(mode="json"), 0)
    task = GroupedDigits({"train_size": TRAIN})
    records = []
    while not population.done:
        child = population.ask()
        record = population.tell(worker.evaluate_one(child.member_id, child.genome))
        scores = task.evaluate(np.asarray(child.genome))
        assert record.train_scores == {"head": float(np.mean(scores[:HEAD])), "tail": float(np.mean(scores[HEAD:]))}
        assert record.train_score == float(np.mean(scores))
        assert record.test_scores == task.test_scores(np.asarray(child.genome))
        trial = record_to_trial(record)
        assert trial.values == list(record.train_scores.values())
        assert trial.user_attrs["train_score"] == record.train_score
        assert trial.user_attrs["test_scores"] == record.test_scores
        records.append(record)
    status = population.status()["best"]
    assert status["train_scores"] == population.best.train_scores and status["test_scores"]
    meta, arrays = population.state_dict()
    json.dumps(meta)  # snapshots keep the metadata as JSON
    again = build_population(config)
    again.load_state_dict(json.loads(json.dumps(meta)), arrays)
    assert again.best.train_scores == population.best.train_scores
    assert again.best.test_scores == population.best.test_scores


def test_bad_groups_refuse_the_search():
    from evomerge.engine.actors import build_problem

    with pytest.raises(ConfigError, match="groups hold 20 datapoints but the task scores 300"):
        build_problem(_config("bad", 4, fitness={"task": "grouped_tasks:BadGroups",
                                                 "options": {"train_size": TRAIN}}))


# -- recording ------------------------------------------------------------------------------


def _records(n: int) -> list[EvalRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        failed = i % 5 == 3
        head, tail = (None, None) if failed else (float(rng.integers(0, 11)) / 10, float(rng.integers(0, 21)) / 20)
        records.append(EvalRecord(
            number=i, member_id=i, train_score=None if failed else (head + 2 * tail) / 3,
            test_score=None if failed else 0.5, params={"t": float(rng.random()), "k": int(i)}, parents=[],
            generation=0, seconds=0.01, error="fitness task raised RuntimeError: boom" if failed else None,
            train_scores=None if failed else {"head": head, "tail": tail},
            test_scores=None if failed else ({"head": 0.25} if i % 2 else {"head": 0.25, "tail": 0.75})))
    return records


def _view(trial: optuna.trial.FrozenTrial) -> tuple:
    return (trial.number, trial.state, trial.values, trial.params, trial.user_attrs)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_recorder_writes_a_multi_objective_study(tmp_path, kind):
    """The journal's and SQLite's bulk writers (straight from the records) write what add_trials
    writes from record_to_trial; FAIL trials included; a resumed recorder checks the objectives."""
    url = str(tmp_path / "optuna.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"
    groups = [("head", 10), ("tail", 20)]
    records = _records(23)
    recorder = TrialRecorder(open_storage(url), "mo", groups=groups)
    assert isinstance(recorder._bulk, JournalBulkWriter if kind == "journal" else RDBBulkWriter)
    recorder.put(records[:7])
    recorder.put(records[7:])
    recorder.close()
    reference = optuna.create_study(storage=open_storage(url), study_name="ref", directions=["maximize"] * 2)
    reference.add_trials([record_to_trial(r) for r in records])
    study = optuna.load_study(study_name="mo", storage=open_storage(url))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert study.metric_names == GROUPS
    assert study.user_attrs["groups"] == [["head", 10], ["tail", 20]]
    got = study.get_trials()
    assert [_view(t) for t in got] == [_view(t) for t in reference.get_trials()]
    for t, r in zip(got, records):
        if r.failed:
            assert t.state == optuna.trial.TrialState.FAIL and t.values is None
        else:
            assert t.values == [r.train_scores["head"], r.train_scores["tail"]]
    with pytest.raises(ValueError, match="has 2 objective"):
        TrialRecorder(open_storage(url), "mo", create=False)
    TrialRecorder(open_storage(url), "mo", create=False, groups=groups).close()  # resumes
    # A record without groups cannot go into a multi-objective study, in one batch as a whole.
    single = EvalRecord(number=0, member_id=0, train_score=0.5, test_score=None, params={}, parents=[],
                        generation=0, seconds=0.0)
    bad = TrialRecorder(open_storage(url), "mo", create=False, groups=groups)
    bad.put([single])
    with pytest.raises(RuntimeError, match="objective"):
        bad.close()


# -- searches on Ray ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("grouped") / "run"
    summary = run_search(_config("grouped", 40), SearchOptions(out_dir=out, progress=False))
    return out, summary


def test_search_records_one_objective_per_group(grouped_run):
    run_dir, summary = grouped_run
    study = _study(run_dir)
    assert len(study.directions) == 2 and all(d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions)
    assert study.metric_names == GROUPS
    trials = study.get_trials()
    assert len(trials) == summary["evaluations"] == 40
    _assert_trials_are_group_means(trials)

    # The best member, scored again: its groups' means are the summary's and its trial's values.
    best = summary["best"]
    params = load_file(str(run_dir / "best.safetensors"))["params"]
    task = GroupedDigits({"train_size": TRAIN})
    scores = task.evaluate(params)
    assert best["train_scores"] == {"head": float(np.mean(scores[:HEAD])), "tail": float(np.mean(scores[HEAD:]))}
    assert best["train_score"] == float(np.mean(scores))
    assert best["test_scores"] == task.test_scores(params) and best["test_score"] == task.test_score(params)
    (trial,) = [t for t in trials if t.user_attrs["member_id"] == best["member_id"]]
    assert trial.values == [best["train_scores"]["head"], best["train_scores"]["tail"]]
    assert trial.user_attrs["test_scores"] == best["test_scores"]
    assert json.loads((run_dir / "best.json").read_text())["train_scores"] == best["train_scores"]
    assert {Path(p).name for p in summary["plots"]} >= {"progress.png"}  # plots drew despite 2 objectives


def test_status_and_summary_show_each_group(grouped_run):
    from evomerge.report import summary_table
    from evomerge.status import run_status, status_table

    run_dir, summary = grouped_run
    status = run_status(run_dir)
    best = summary["best"]
    assert status["groups"] == GROUPS
    assert status["best_train"] == best["train_score"] and status["best_member"] == best["member_id"]
    assert status["best_train_scores"] == best["train_scores"]
    assert status["best_test_scores"] == best["test_scores"]
    for table in (status_table(status), summary_table(summary)):
        for name in GROUPS:
            row = next(line for line in table.splitlines() if line.strip().startswith(f"{name}: train / test"))
            assert f"{best['train_scores'][name]:.4f} / {best['test_scores'][name]:.4f}" in row


def test_plots_of_a_multi_objective_study(grouped_run, tmp_path):
    from evomerge.tracking.plots import plot_progress, progress_series

    run_dir, summary = grouped_run
    trials = _study(run_dir).get_trials()
    series = progress_series(trials)
    assert np.nanmax(series["best_train"]) == pytest.approx(summary["best"]["train_score"])
    assert plot_progress(trials, tmp_path / "p.png").stat().st_size > 0


def _dashboard_get(app, path: str):
    reply = {}

    def start_response(status, headers, exc_info=None):
        reply["status"] = status

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr}
    body = b"".join(app(environ, start_response))
    assert reply["status"].startswith("200"), (path, reply["status"], body[:500])
    return json.loads(body)


def test_dashboard_api_lists_the_directions(grouped_run):
    """optuna-dashboard (its WSGI app on the run's storage, as `evomerge dashboard` serves it):
    the study's two directions, the group names as objective names, a Pareto front of best trials."""
    from optuna_dashboard import wsgi

    from evomerge.tracking.dashboard import run_storage_url

    run_dir, summary = grouped_run
    app = wsgi(open_storage(run_storage_url(run_dir)))
    studies = _dashboard_get(app, "/api/studies")["study_summaries"]
    (study,) = [s for s in studies if s["study_name"] == summary["study_name"]]
    assert study["directions"] == ["maximize", "maximize"]
    detail = _dashboard_get(app, f"/api/studies/{study['study_id']}")
    assert detail["directions"] == ["maximize", "maximize"]
    assert detail["objective_names"] == GROUPS
    assert len(detail["trials"]) == 40
    front = detail["best_trials"]
    assert front and all(len(t["values"]) == 2 for t in front)
    values = [tuple(t["values"]) for t in detail["trials"] if t["state"] == "Complete"]
    for t in front:  # nothing dominates a trial on the front
        a = tuple(t["values"])
        assert not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in values)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_resume_continues_the_multi_objective_study(ray_session, tmp_path, kind):
    out = tmp_path / "run"
    storage = {} if kind == "journal" else {"optuna": {"storage": f"sqlite:///{tmp_path / 'optuna.db'}"}}
    config = _config(f"resume-{kind}", 20, snapshots={"every": 10}, sync=True, **storage)
    first = run_search(config, SearchOptions(out_dir=out, progress=False))
    assert first["evaluations"] == 20
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=36)
    assert summary["evaluations"] == 36 and summary["study_name"] == first["study_name"]
    study = _study(out)
    assert len(study.directions) == 2 and study.metric_names == GROUPS
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(36))
    assert [t.user_attrs["evaluation"] for t in trials] == list(range(36))
    _assert_trials_are_group_means(trials)
    assert summary["best"]["train_scores"] is not None


def test_single_objective_study_is_unchanged(ray_session, tmp_path):
    summary = run_search(digits_config("single", budget={"evaluations": 12}),
                         SearchOptions(out_dir=tmp_path / "run", progress=False))
    study = _study(tmp_path / "run")
    assert len(study.directions) == 1 and "groups" not in study.user_attrs
    assert "train_scores" not in summary["best"] and "test_scores" not in summary["best"]
    for t in study.get_trials():
        assert "train_score" not in t.user_attrs and "test_scores" not in t.user_attrs


# -- the native LM tasks ---------------------------------------------------------------------


def test_lm_task_groups_per_data_file(tmp_path):
    """`groups: true`: one group per data file, named after its stem; per-group train and test
    means are the per-file scores. The files are built from the model's own greedy answers, so
    the scores are known: skill_a all right, skill_b half right."""
    from evomerge.fixtures.tiny_lm import make_tiny_lm
    from fitness.lm_data import read_examples
    from fitness.lm_tasks import LMExactMatchTask, flat_params_of

    make_tiny_lm(tmp_path / "models", scale="test", seed=0, data_dir=tmp_path / "data")
    model = str(tmp_path / "models" / "base")
    params = flat_params_of(model)
    prompts = [p for p, _ in read_examples(tmp_path / "data" / "add_train.jsonl", 10)]
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": p, "answer": "?"}) + "\n" for p in prompts))
    task = LMExactMatchTask({"model": model, "data": [str(probe)], "batch_size": 4})
    task.evaluate(params)
    own = list(zip(prompts, task.last_answers))  # what the model answers, i.e. right answers

    def write(name: str, rows: list[tuple[str, str]]) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
        return str(path)

    wrong = [(p, a + "#") for p, a in own]
    files = {"skill_a": write("skill_a", own[:4]), "skill_b": write("skill_b", own[4:6] + wrong[6:8]),
             "test_a": write("test_a", own[8:9] + wrong[9:10]), "test_b": write("test_b", wrong[:3])}

    def options(**extra):
        return {"model": model, "batch_size": 3, "data": [files["skill_a"], files["skill_b"]],
                "test_data": [files["test_a"], files["test_b"]], **extra}

    task = LMExactMatchTask(options(groups=True))
    assert task.groups == [("skill_a", 4), ("skill_b", 4)]
    scores = task.evaluate(params)
    means = group_means(scores, task.groups)
    assert means == {"skill_a": 1.0, "skill_b": 0.5}
    test, by_group = task.held_out(params)
    assert by_group == {"skill_a": 0.5, "skill_b": 0.0} and test == pytest.approx(1 / 5)
    for name, test_name in (("skill_a", "test_a"), ("skill_b", "test_b")):
        one = LMExactMatchTask(options(data=[files[name]], test_data=[files[test_name]]))
        assert means[name] == float(one.evaluate(params).mean())
        assert by_group[name] == one.test_score(params)
    assert task.test_scores(params) == by_group and task.test_score(params) == test

    named = LMExactMatchTask(options(groups=["skills", "skills"]))
    assert named.groups == [("skills", 8)]
    assert named.held_out(params) == (test, {"skills": test})
    assert LMExactMatchTask(options()).groups is None and LMExactMatchTask(options()).held_out(params)[1] is None
    with pytest.raises(ValueError, match="one file per data file"):
        LMExactMatchTask(options(groups=True, test_data=[files["test_a"]]))


def test_compare_shows_each_group(tmp_path, capsys):
    from evomerge.compare import aggregate, write_outputs

    def row(strategy, seed, head, tail):
        return {"strategy": strategy, "seed": seed, "evaluations": 10, "failed": 0, "test_score": 0.5,
                "train_score": 0.6, "wall_seconds": 1.0, "curve": [0.4, 0.5], "study": f"s{seed}",
                "train_scores": {"head": head, "tail": tail}, "test_scores": {"head": head / 2, "tail": tail / 2}}

    rows = [row("m2n2", 0, 0.6, 0.8), row("m2n2", 1, 0.8, 0.6), {"strategy": "dam", "seed": 0, "skipped": "x"}]
    (table, _) = aggregate(rows)
    assert table["train_groups"] == {"head": pytest.approx(0.7), "tail": pytest.approx(0.7)}
    assert table["test_groups"] == {"head": pytest.approx(0.35), "tail": pytest.approx(0.35)}
    write_outputs(rows, tmp_path, budget=10)
    printed = capsys.readouterr().out
    assert "per group: train / test (means)" in printed and "head 0.7000 / 0.3500, tail 0.7000 / 0.3500" in printed
    header, first = (tmp_path / "compare.csv").read_text().splitlines()[:2]
    assert header.endswith("train_score/head,test_score/head,train_score/tail,test_score/tail")
    assert first.endswith("0.6,0.3,0.8,0.4")


def test_group_means_of_a_subsampled_child_by_hand():
    """A child scored on datapoints [0, 2, 3, 6] of groups a (0-2), b (3-5), c (6-7): each group's
    mean is over its observed datapoints; a group with none observed would take the overall mean."""
    from evomerge.engine.population import group_means

    groups = [("a", 3), ("b", 3), ("c", 2)]
    scores = np.array([1.0, 0.0, 1.0, 1.0])
    assert group_means(scores, groups, np.array([0, 2, 3, 6])) == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert group_means(np.array([1.0, 0.0]), groups, np.array([0, 1])) == {"a": 0.5, "b": 0.5, "c": 0.5}
