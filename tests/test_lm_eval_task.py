"""The `lm_eval` fitness task: per-sample scores from lm-evaluation-harness on the bound candidate."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")

from evomerge.errors import ConfigError  # noqa: E402
from evomerge.fixtures.tiny_lm import make_tiny_lm  # noqa: E402
from evomerge.tasks import TaskContext, build_task  # noqa: E402
from fitness.lm_eval_task import LMEvalTask  # noqa: E402
from fitness.lm_tasks import flat_params_of  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "fitness" / "lm_eval_tasks"
LIMIT = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")
    return root


def _options(tiny: Path, **extra) -> dict:
    opts = {"model": str(tiny / "models" / "base"), "include_path": str(TASKS_DIR),
            "metadata": {"data_dir": str(tiny / "data")}, "batch_size": 16}
    opts.update(extra)
    return opts


def _reference(tiny: Path, folder: Path, tasks: list[str], **kwargs) -> dict:
    """lm-eval on its own: the checkpoint loaded by HFLM with from_pretrained, simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(tiny / "data")})
    return simple_evaluate(model="hf", model_args={"pretrained": str(folder), "device": "cpu"}, tasks=tasks,
                           task_manager=manager, batch_size=16, log_samples=True, bootstrap_iters=0, **kwargs)


def _per_sample(res: dict, task: str, metric: str, filt: str) -> list[float]:
    rows = sorted((s for s in res["samples"][task] if s["filter"] == filt), key=lambda s: s["doc_id"])
    return [float(s[metric]) for s in rows]


def test_scores_equal_lm_eval_sample_by_sample(tiny):
    tasks = ["tiny_skills_gen", "tiny_add_ll", "tiny_add_mc"]
    task = build_task("lm_eval", _options(tiny, tasks=tasks, limit=LIMIT))
    assert task.num_datapoints == 4 * LIMIT
    assert list(task.train_ids) == ["tiny_add_gen", "tiny_rev_gen", "tiny_add_ll", "tiny_add_mc"]
    assert task.metrics == {"tiny_add_gen": "exact_match", "tiny_rev_gen": "exact_match",
                            "tiny_add_ll": "acc", "tiny_add_mc": "acc"}  # each task's first metric
    assert task.filters["tiny_add_gen"] == "strict"  # the first of two
    folder = tiny / "models" / "expert_add"
    scores = task.evaluate(flat_params_of(folder))
    ref = _reference(tiny, folder, tasks, limit=LIMIT)
    at = 0
    for name in task.train_ids:
        metric, filt = task.metrics[name], task.filters[name]
        expected = _per_sample(ref, name, metric, filt)
        assert scores[at:at + LIMIT].tolist() == expected, name
        assert float(scores[at:at + LIMIT].mean()) == pytest.approx(ref["results"][name][f"{metric},{filt}"])
        at += LIMIT
    # the generations themselves agree, not just the 0/1 scores
    gen = sorted((s for s in ref["samples"]["tiny_add_gen"] if s["filter"] == "strict"), key=lambda s: s["doc_id"])
    assert [s["resps"] for s in task.last_samples[:LIMIT]] == [s["resps"] for s in gen]


def test_weights_changed_in_place_change_the_scores(tiny):
    """The request cache is off: the same requests on new weights are scored again."""
    import torch

    task = build_task("lm_eval", _options(tiny, tasks=["tiny_add_mc"], limit=20))
    buffer = task.candidate_buffer()
    seen = {}
    for name in ("base", "expert_add", "expert_rev"):
        buffer.copy_(torch.from_numpy(flat_params_of(tiny / "models" / name)))
        seen[name] = task.evaluate(buffer)
        ref = _reference(tiny, tiny / "models" / name, ["tiny_add_mc"], limit=20)
        assert seen[name].tolist() == _per_sample(ref, "tiny_add_mc", "acc", "none"), name
    assert not np.array_equal(seen["base"], seen["expert_add"])
    assert not np.array_equal(seen["expert_add"], seen["expert_rev"])
    assert task.model.model.embed_tokens.weight.data_ptr() >= buffer.data_ptr()  # still a view of the buffer


def test_order_samples_and_the_chosen_filter(tiny):
    samples = {"tiny_rev_gen": [5, 1, 3], "tiny_add_gen": [2, 0]}
    task = build_task("lm_eval", _options(tiny, tasks=["tiny_rev_gen", "tiny_add_gen"], samples=samples,
                                          filter={"tiny_rev_gen": "loose"}))
    # known without a model (the population actor builds none): task, then doc id
    assert task._model is None and task.num_datapoints == 5
    assert task.train_keys == [("tiny_rev_gen", 1), ("tiny_rev_gen", 3), ("tiny_rev_gen", 5),
                               ("tiny_add_gen", 0), ("tiny_add_gen", 2)]
    assert task._model is None
    scores = task.evaluate(flat_params_of(tiny / "models" / "expert_rev"))
    assert scores.shape == (5,)
    got = [(s["doc_id"], s["filter"]) for s in task.last_samples]
    assert got == [(1, "loose"), (3, "loose"), (5, "loose"), (0, "strict"), (2, "strict")]  # each doc once
    again = build_task("lm_eval", _options(tiny, tasks=["tiny_rev_gen", "tiny_add_gen"], samples=samples,
                                           filter={"tiny_rev_gen": "loose"}))
    assert again.train_keys == task.train_keys  # the same on every worker and on resume


def test_one_group_per_task_with_held_out_scores_per_task(tiny):
    """Several tasks: one objective each; test_tasks that expand to as many tasks score them in order."""
    task = build_task("lm_eval", _options(tiny, tasks=["tiny_skills_ll"], test_tasks=["tiny_skills_ll_test"],
                                          limit=6))
    assert task.groups == [("tiny_add_ll", 6), ("tiny_rev_ll", 6)]
    folder = tiny / "models" / "expert_add"
    mean, by_group = task.held_out(flat_params_of(folder))
    ref = _reference(tiny, folder, ["tiny_skills_ll_test"], limit=6)
    expected = {"tiny_add_ll": np.mean(_per_sample(ref, "tiny_add_ll_test", "acc", "none")),
                "tiny_rev_ll": np.mean(_per_sample(ref, "tiny_rev_ll_test", "acc", "none"))}
    assert by_group == pytest.approx(expected)
    assert mean == pytest.approx(np.mean(list(expected.values())))
    assert build_task("lm_eval", _options(tiny, tasks=["tiny_add_mc"], limit=6)).groups is None  # one task
    assert build_task("lm_eval", _options(tiny, tasks=["tiny_skills_ll"], limit=6, groups=False)).groups is None


def test_held_out_docs_in_the_fitness_set_are_refused(tiny):
    with pytest.raises(ConfigError, match=r"1 fitness document.*tiny_add_gen doc 2"):
        build_task("lm_eval", _options(tiny, tasks=["tiny_add_gen"], samples={"tiny_add_gen": [0, 1, 2]},
                                       test_samples={"tiny_add_gen": [2, 3]}))
    # another task over the same documents (compared by lm-eval's doc_hash, not by name)
    with pytest.raises(ConfigError, match=r"5 fitness document.*tiny_add_gen doc 0 = tiny_add_ll doc 0"):
        build_task("lm_eval", _options(tiny, tasks=["tiny_add_gen"], limit=5, test_tasks=["tiny_add_ll"]))
    task = build_task("lm_eval", _options(tiny, tasks=["tiny_add_mc"], samples={"tiny_add_mc": [0, 1]},
                                          test_samples={"tiny_add_mc": [2, 3, 4]}))
    assert task.num_datapoints == 2
    score = task.test_score(flat_params_of(tiny / "models" / "expert_add"))
    ref = _reference(tiny, tiny / "models" / "expert_add", ["tiny_add_mc"], samples={"tiny_add_mc": [2, 3, 4]})
    assert score == pytest.approx(ref["results"]["tiny_add_mc"]["acc,none"])


def test_chat_template_and_system_prompt(tiny, tmp_path):
    from evomerge.fixtures.synthetic_llama import make_synthetic_llama

    made = make_synthetic_llama(tmp_path / "synth", params="3M", shard_size="1MB", experts=1)
    task = build_task("lm_eval", _options(tiny, model=str(made["expert_1"]), tasks=["tiny_add_gen"], limit=2,
                                          apply_chat_template=True, system_instruction="Be brief.",
                                          dtype="float32"))
    task.attach(TaskContext(role="worker"))
    task.evaluate(flat_params_of(made["expert_1"]))
    prompts = [s["arguments"][0][0] for s in task.last_samples]
    assert prompts == ["system: Be brief.\nuser: 4+40=\nassistant: ", "system: Be brief.\nuser: 69+72=\nassistant: "]
    # the tiny LM's tokenizer has no chat template: refused before any evaluation
    refused = build_task("lm_eval", _options(tiny, tasks=["tiny_add_gen"], limit=2, apply_chat_template=True))
    with pytest.raises(ConfigError, match="no chat template"):
        refused.attach(TaskContext(role="worker"))


def test_missing_extra_names_it(tiny, monkeypatch):
    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ConfigError, match=r"pip install -e \.\[lmeval\]"):
        build_task("lm_eval", _options(tiny, tasks=["tiny_add_gen"]))


def test_importing_the_fitness_package_does_not_import_lm_eval():
    code = "import sys, fitness; from evomerge.tasks import TASKS; TASKS.get('lm_eval'); print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_task_and_unbounded_metric_are_refused(tiny):
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'tiny_add_gen_typo'.*did you mean tiny_add_gen"):
        build_task("lm_eval", _options(tiny, tasks=["tiny_add_gen_typo"]))
    with pytest.raises(ConfigError, match=r"metric 'perplexity' is not a per-sample score in \[0, 1\]"):
        build_task("lm_eval", _options(tiny, tasks=["tiny_add_ll"], metric="perplexity"))
    with pytest.raises(ConfigError, match=r"no metric 'bleu'"):
        build_task("lm_eval", _options(tiny, tasks=["tiny_add_ll"], metric={"tiny_add_ll": "bleu"}))
    with pytest.raises(ConfigError, match=r"no filter 'nope'"):
        build_task("lm_eval", _options(tiny, tasks=["tiny_add_gen"], filter="nope"))
    with pytest.raises(ValueError, match="extra"):
        LMEvalTask.Options.model_validate({"tasks": ["tiny_add_gen"], "nonsense": 1})


@pytest.mark.slow  # 20-70 s on 2 cores (Ray start, a 10-evaluation search, the lm_eval CLI)
def test_search_on_ray_and_the_lm_eval_cli_agree(ray_session, tiny, tmp_path):
    """A short search over populations/tiny-lm-lmeval.yaml; `lm_eval` on the exported best gives its train score."""
    from evomerge.config import config_from_dict
    from evomerge.engine.search import SearchOptions, run_search

    data = yaml.safe_load((REPO / "populations" / "tiny-lm-lmeval.yaml").read_text())
    models = tiny / "models"
    data["seeds"] = [str(models / "expert_add"), str(models / "expert_rev")]
    opts = data["fitness"]["options"]
    # the multiple-choice task too, so the scores are not all 0 at the fixture's test scale
    opts.update(model=str(models / "base"), tasks=["tiny_add_mc", "tiny_skills_gen"], limit=8, batch_size=16,
                include_path=str(TASKS_DIR), metadata={"data_dir": str(tiny / "data")},
                metric={"tiny_add_mc": "acc", "tiny_add_gen": "exact_match", "tiny_rev_gen": "exact_match"},
                filter=None)
    data["budget"] = {"evaluations": 10}
    data["workers"] = {"count": 2, "batch": 1}
    data.pop("snapshots", None)
    config = config_from_dict(data)
    out = tmp_path / "run"
    summary = run_search(config, SearchOptions(out_dir=out, progress=False))
    assert summary["evaluations"] == 10 and summary["failed"] == 0
    best = summary["best"]
    assert best["test_score"] is not None
    results = tmp_path / "cli"
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
           "--model_args", f"pretrained={out / 'best'}", "--device", "cpu", "--tasks", "tiny_add_mc,tiny_skills_gen",
           "--include_path", str(TASKS_DIR), "--metadata", json.dumps({"data_dir": str(tiny / "data")}),
           "--limit", "8", "--batch_size", "16", "--output_path", str(results)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(next(results.rglob("results_*.json")).read_text())["results"]
    cli = [report["tiny_add_mc"]["acc,none"], report["tiny_add_gen"]["exact_match,strict"],
           report["tiny_rev_gen"]["exact_match,strict"]]
    assert float(np.mean(cli)) == pytest.approx(best["train_score"])  # 8 docs each: the plain mean
    # one objective per task: the study's values are the per-task means lm-eval reports
    assert best["train_scores"] == pytest.approx(dict(zip(["tiny_add_mc", "tiny_add_gen", "tiny_rev_gen"], cli)))
    import optuna

    study = optuna.load_study(study_name=None, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))))
    assert study.metric_names == ["tiny_add_mc", "tiny_add_gen", "tiny_rev_gen"]


def test_shipped_population_validates_and_counts_its_documents_without_a_model(tiny):
    from evomerge.config import config_from_dict

    data = yaml.safe_load((REPO / "populations" / "tiny-lm-lmeval.yaml").read_text())
    data["seeds"] = [str(tiny / "models" / "expert_add"), str(tiny / "models" / "expert_rev")]
    config = config_from_dict(data)
    opts = dict(config.fitness.options)
    opts.pop("model")  # models/tiny-lm may not exist here; the documents are counted without one
    task = build_task("lm_eval", opts)  # include_path and the JSONL resolve from the repo (fitness/data)
    assert task.num_datapoints == 400 and len(task.test_keys) == 400 and task._model is None


def test_a_subset_runs_only_those_documents_through_samples(tiny):
    """fitness.subsample: the chosen datapoints go to lm-eval as `samples=`, task by task; the
    scores are the full evaluation's at those indices, and a task with none chosen is not run."""
    task = build_task("lm_eval", _options(tiny, tasks=["tiny_add_mc", "tiny_rev_gen"], limit=6))
    params = flat_params_of(tiny / "models" / "expert_add")
    full = task.evaluate(params)
    idx = np.array([1, 4, 7])  # two add_mc docs (1, 4), one rev_gen doc (index 7 = doc 1)
    np.testing.assert_array_equal(task.evaluate(params, idx), full[idx])
    assert [(s["doc_id"]) for s in task.last_samples] == [1, 4, 1]
    only_add = task.evaluate(params, np.array([0, 2]))
    np.testing.assert_array_equal(only_add, full[[0, 2]])
    assert len(task.last_samples) == 2
