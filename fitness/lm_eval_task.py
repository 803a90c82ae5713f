"""lm-evaluation-harness tasks as fitness, scored per sample: `fitness: {task: lm_eval, options: {...}}`.

The model side is the native LM tasks' (`fitness/lm_tasks.py`, `BoundLMTask`): a weightless skeleton
from the first seed (or `model`) whose parameters view one flat buffer; the worker materialises each
candidate into that buffer. The bound model is wrapped once in lm-eval's `HFLM`, the tasks are built
once (`TaskManager.load`), and every evaluation runs lm-eval's own `evaluate` on those task objects
with `log_samples=True`, no request cache (`use_cache`/`cache_requests` are keyed by request, not
weights: they would return stale scores) and no bootstrap. Datapoint i is one document: tasks in
the order lm-eval loads them (`tasks`, groups expanded), then doc id; its score is the chosen metric
(default: the task's first) on the chosen filter's row (default: the task's first filter), which
must lie in [0, 1].

lm-eval is an optional extra (`pip install -e .[lmeval]`); this module imports it only when a task
is built, so a missing extra breaks nothing else.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, model_validator

from evomerge.errors import ConfigError
from evomerge.tasks import TASKS, check_indices
from fitness.lm_data import resolve
from fitness.lm_scoring import torch_threads
from fitness.lm_tasks import BoundLMTask, LMModelOptions

EXTRA_HINT = "pip install -e .[lmeval]"

# Metrics whose per-sample value is a number in [0, 1] (a hit, or a fraction). Corpus-level metrics
# (f1, bleu, mcc: per-sample tuples) and unbounded ones (perplexity, loglikelihood) are refused.
BOUNDED_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "acc_bytes", "exact_match", "em", "exact"})


def _cache_compiled_templates() -> None:
    """lm-eval compiles every Jinja prompt template anew for each document (`utils.apply_template`),
    which is most of an evaluation's time on a small model. Memoise the compile on lm-eval's own
    Environment, once per process: the same template text gives the same template, rendered as before."""
    from lm_eval import utils

    env = utils.env
    if getattr(env, "_evomerge_cached_from_string", False):
        return
    compile_template = env.from_string
    compiled: dict[str, Any] = {}

    def from_string(source, globals=None, template_class=None):
        if globals is None and template_class is None and isinstance(source, str):
            template = compiled.get(source)
            if template is None:
                template = compiled[source] = compile_template(source)
            return template
        return compile_template(source, globals, template_class)

    env.from_string = from_string
    env._evomerge_cached_from_string = True


def _reuse_requests(task) -> None:
    """Build a task's requests (prompts, few-shot contexts: no weights involved) once per doc set and
    reuse them, emptied of the last responses, in later evaluations. Responses are never reused."""
    build = task.build_all_requests
    built: dict[Any, list] = {}

    def build_all_requests(**kwargs):
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()
                           if k != "chat_template"))
        if key not in built:
            build(**kwargs)
            built[key] = task._instances
            return
        for instance in built[key]:
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = built[key]

    task.build_all_requests = build_all_requests


def _memoise_tokenizing(lm) -> None:
    """HFLM tokenises every request again on each evaluation; the ids depend on the text only."""
    encode = lm.tok_encode
    seen: dict[Any, list[int]] = {}

    def tok_encode(string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        if kwargs or not isinstance(string, str):
            return encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        ids = seen.get(key)
        if ids is None:
            ids = seen[key] = encode(string, add_special_tokens=add_special_tokens,
                                     left_truncate_len=left_truncate_len)
        return list(ids)

    lm.tok_encode = tok_encode


def import_lm_eval():
    """lm_eval's pieces this task uses; a missing extra is a ConfigError naming it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, hash_string
    except ImportError as exc:
        raise ConfigError(f"fitness task 'lm_eval' needs lm-evaluation-harness, which is not installed ({exc}); "
                          f"install the extra: {EXTRA_HINT}") from exc
    return evaluator, HFLM, TaskManager, hash_string, handle_non_serializable


class LMEvalOptions(LMModelOptions):
    tasks: list[str] = Field(min_length=1, description="lm-eval task or group names (groups expand to their tasks)")
    include_path: str | None = Field(
        None, description="folder of task YAMLs (e.g. fitness/lm_eval_tasks); its tasks are found before "
                          "lm-eval's built-in ones, which are indexed only when a name is not found there")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="lm-eval task metadata (TaskManager(metadata=...), the CLI's "
                                          "--metadata), e.g. data_dir for the shipped tiny-LM tasks")
    metric: str | dict[str, str] | None = Field(
        None, description="per-sample metric that is the datapoint score, for every task (a name) or per task "
                          "(a mapping); default: each task's first metric. Must lie in [0, 1]: "
                          + ", ".join(sorted(BOUNDED_METRICS)))
    filter: str | dict[str, str] | None = Field(
        None, description="which filter's rows count, for every task or per task; default: each task's first")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1, description="first N documents of each task")
    samples: dict[str, list[int]] | None = Field(
        None, description="fixed doc ids per task (instead of limit); a task not named uses all (or limit) docs")
    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = Field(False, description="with apply_chat_template: few-shot examples as turns")
    batch_size: int = Field(64, ge=1)
    gen_kwargs: dict[str, Any] | None = Field(None, description="override generate_until tasks' generation_kwargs")
    test_tasks: list[str] = Field(default_factory=list, description="held-out lm-eval tasks for test_score")
    test_samples: dict[str, list[int]] | None = Field(
        None, description="held-out doc ids per task (fitness tasks or test_tasks) for test_score")
    fewshot_seed: int = 1234
    groups: bool | None = Field(
        None, description="one study objective per fitness task; default (null): on when tasks expand to "
                          "more than one task. Held-out scores per group come from test_samples of the same "
                          "task, or from test_tasks matched to tasks by position when they expand to as many tasks")

    @model_validator(mode="after")
    def _check(self) -> "LMEvalOptions":
        if self.samples is not None and self.limit is not None:
            raise ValueError("give either limit or samples, not both")
        for field in ("samples", "test_samples"):
            for name, ids in (getattr(self, field) or {}).items():
                if len(set(ids)) != len(ids):
                    raise ValueError(f"{field}[{name!r}] lists a doc id more than once")
                if any(i < 0 for i in ids):
                    raise ValueError(f"{field}[{name!r}] has a negative doc id")
        return self


def _per_task(value: str | dict[str, str] | None, names: list[str], what: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {n: value for n in names}
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"fitness.options.{what} names {unknown}, which are not among the tasks {names}")
    return dict(value)


@TASKS.register("lm_eval")
class LMEvalTask(BoundLMTask):
    """Per-document scores from lm-evaluation-harness tasks on the bound candidate."""

    Options = LMEvalOptions
    supports_subsample = True  # a subset is lm-eval's `samples=`: only those documents are run

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self._lm_eval = import_lm_eval()
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        o: LMEvalOptions = self.options  # type: ignore[assignment]
        self.include_path = str(resolve(o.include_path, kind="dir")) if o.include_path else None
        train = self._load(o.tasks, "tasks")
        test = self._load(o.test_tasks, "test_tasks") if o.test_tasks else {}  # own objects, even for a shared name
        unknown = sorted(set(o.test_samples or {}) - set(train) - set(test))
        if unknown:
            raise ConfigError(f"fitness.options.test_samples names {unknown}, which are neither tasks nor test_tasks")
        held = {**test, **{n: train[n] for n in (o.test_samples or {}) if n not in test}}
        self.metrics = self._choose_metrics({**train, **held})
        self.filters = self._choose_filters({**train, **held})
        self.train_ids = self._doc_ids(train, o.samples, "samples")
        self.test_ids = self._doc_ids(held, o.test_samples, "test_samples") if held else {}
        self.train_tasks, self.test_tasks = train, held
        self.train_keys = [(n, i) for n, ids in self.train_ids.items() for i in ids]
        self.test_keys = [(n, i) for n, ids in self.test_ids.items() for i in ids]
        self._check_overlap()
        for task in {id(t): t for t in [*train.values(), *held.values()]}.values():
            # only the chosen filter's rows count: skip the others' filtering and metrics
            task._filters = [f for f in task._filters if f.name == self.filters[task.task_name]]
            _reuse_requests(task)
        _cache_compiled_templates()
        self._lm = None
        self.last_samples: list[dict[str, Any]] = []  # lm-eval's logged sample per datapoint, last evaluation

    # -- tasks, built once ------------------------------------------------------------------
    def _manager(self, defaults: bool):
        _, _, TaskManager, _, _ = self._lm_eval
        return TaskManager(include_path=self.include_path, include_defaults=defaults,
                           metadata=dict(self.options.metadata) or None)

    def _load(self, names: list[str], field: str) -> dict[str, Any]:
        """{task name: lm-eval Task}, in lm-eval's load order, with the run-wide overrides applied once."""
        manager = self._manager(defaults=self.include_path is None)
        if any(n not in manager.all_tasks for n in names):
            manager = self._manager(defaults=True)  # lm-eval's own tasks: index them only when needed
        missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in missing}
            raise ConfigError(
                f"fitness.options.{field}: unknown lm-eval task {', '.join(repr(n) for n in missing)}"
                + "".join(f" (did you mean {', '.join(h)}?)" for h in hints.values() if h)
                + ("" if self.include_path else "; local task YAMLs need fitness.options.include_path"))
        loaded = manager.load(list(names))
        tasks = dict(loaded["tasks"])
        o: LMEvalOptions = self.options  # type: ignore[assignment]
        for task in tasks.values():  # what lm-eval's simple_evaluate does to each task before evaluating
            if task.get_config("output_type") == "generate_until" and o.gen_kwargs:
                task.set_config(key="generation_kwargs", value=dict(o.gen_kwargs), update=True)
            if o.num_fewshot is not None:
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=o.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            # The documents as a list, read once: lm-eval walks every document of the split (Arrow rows)
            # on each evaluation to pick the sampled ones.
            docs = list(task.eval_docs)
            task.test_docs = task.validation_docs = lambda docs=docs: docs
        return tasks

    def _choose_metrics(self, tasks: dict[str, Any]) -> dict[str, str]:
        chosen = _per_task(self.options.metric, list(tasks), "metric")
        out = {}
        for name, task in tasks.items():
            available = list(task._metric_fn_list)
            metric = chosen.get(name, available[0] if available else None)
            if metric not in available:
                raise ConfigError(f"lm-eval task {name!r} has no metric {metric!r}; it has {available}")
            if metric not in BOUNDED_METRICS:
                raise ConfigError(
                    f"lm-eval task {name!r}: metric {metric!r} is not a per-sample score in [0, 1]; choose one of "
                    f"{sorted(BOUNDED_METRICS & set(available)) or sorted(BOUNDED_METRICS)} with fitness.options.metric")
            out[name] = metric
        return out

    def _choose_filters(self, tasks: dict[str, Any]) -> dict[str, str]:
        chosen = _per_task(self.options.filter, list(tasks), "filter")
        out = {}
        for name, task in tasks.items():
            available = [f.name for f in task._filters]
            filt = chosen.get(name, available[0])
            if filt not in available:
                raise ConfigError(f"lm-eval task {name!r} has no filter {filt!r}; it has {available}")
            out[name] = filt
        return out

    def _doc_ids(self, tasks: dict[str, Any], samples: dict[str, list[int]] | None,
                 field: str) -> dict[str, list[int]]:
        samples = samples or {}
        unknown = sorted(set(samples) - set(tasks)) if field == "samples" else []
        if unknown:
            raise ConfigError(f"fitness.options.samples names {unknown}, which are not among the tasks {list(tasks)}")
        out = {}
        for name, task in tasks.items():
            count = len(task.eval_docs)
            if name in samples:
                ids = sorted(samples[name])
                if ids and ids[-1] >= count:
                    raise ConfigError(f"fitness.options.{field}[{name!r}]: doc id {ids[-1]} is out of range; "
                                      f"the task has {count} documents")
            else:
                ids = list(range(min(count, self.options.limit or count)))
            out[name] = ids
        return out

    def _doc_hash(self, task, doc_id: int) -> str:
        _, _, _, hash_string, handle_non_serializable = self._lm_eval
        doc = task.eval_docs[doc_id]
        return hash_string(json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False))

    def _check_overlap(self) -> None:
        """No training on the test set: a fitness document also held out (by lm-eval's doc_hash) is refused."""
        if not self.test_keys:
            return
        held = {self._doc_hash(self.test_tasks[n], i): (n, i) for n, i in self.test_keys}
        clashes = []
        for n, i in self.train_keys:
            h = self._doc_hash(self.train_tasks[n], i)
            if h in held:
                clashes.append(((n, i), held[h]))
        if clashes:
            (tn, ti), (hn, hi) = clashes[0]
            doc = self.train_tasks[tn].eval_docs[ti]
            raise ConfigError(
                f"{len(clashes)} fitness document(s) also in the held-out set; first: {tn} doc {ti} = {hn} doc {hi} "
                f"({json.dumps(doc, default=str, ensure_ascii=False)[:200]}). Choose disjoint samples / test_samples")

    # -- sizes (no model needed) -------------------------------------------------------------
    @property
    def num_datapoints(self) -> int:
        return len(self.train_keys)

    # -- the model ---------------------------------------------------------------------------
    def attach(self, context) -> None:
        super().attach(context)
        if self.options.apply_chat_template and self.model_dir is not None:
            self._check_chat_template(self.tokenizer)

    def _check_chat_template(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"fitness.options.apply_chat_template is set but the tokenizer of {self.source} has no "
                              "chat template; unset it, or take the architecture from an instruct checkpoint "
                              "(fitness.options.model)")

    @property
    def lm(self):
        """lm-eval's HFLM around the bound model, built once; its weights are the candidate buffer."""
        if self._lm is None:
            from transformers import AutoTokenizer

            from fitness.lm_binding import bind

            _, HFLM, _, _, _ = self._lm_eval
            model = self.model
            # A tokenizer of its own, as HFLM(pretrained=<folder>) loads it (ours pads on the left).
            tokenizer = AutoTokenizer.from_pretrained(str(self.source), trust_remote_code=self.options.trust_remote_code)
            if self.options.apply_chat_template:
                self._check_chat_template(tokenizer)
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.options.batch_size,
                            trust_remote_code=self.options.trust_remote_code)
            bind(self._plan, self._flat)  # HFLM ties weights; keep every parameter a view of the buffer
            _memoise_tokenizing(self._lm)
        return self._lm

    # -- scoring -----------------------------------------------------------------------------
    def _run(self, tasks: dict[str, Any], ids: dict[str, list[int]], keys: list[tuple[str, int]]) -> np.ndarray:
        evaluator = self._lm_eval[0]
        o: LMEvalOptions = self.options  # type: ignore[assignment]
        for task in tasks.values():  # the same few-shot examples on every evaluation
            task.set_fewshot_seed(seed=o.fewshot_seed)
        lm = self.lm
        with torch_threads(self._threads()):
            result = evaluator.evaluate(
                lm=lm, task_dict={"tasks": tasks, "groups": {}, "group_map": {}},
                samples={n: ids[n] for n in tasks}, cache_requests=False, bootstrap_iters=0, log_samples=True,
                system_instruction=o.system_instruction, apply_chat_template=o.apply_chat_template,
                fewshot_as_multiturn=o.fewshot_as_multiturn, confirm_run_unsafe_code=False)
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for name in tasks:
            for sample in result["samples"][name]:
                if sample["filter"] == self.filters[name]:
                    rows[(name, int(sample["doc_id"]))] = sample
        scores = np.empty(len(keys), dtype=np.float32)
        self.last_samples = []
        for k, key in enumerate(keys):
            sample = rows[key]
            metric = self.metrics[key[0]]
            value = sample[metric]
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"lm-eval task {key[0]!r}: metric {metric!r} gave {value!r} for doc {key[1]}, "
                                 "not a number in [0, 1]") from None
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"lm-eval task {key[0]!r}: metric {metric!r} gave {value} for doc {key[1]}, "
                                 "outside [0, 1]")
            scores[k] = value
            self.last_samples.append(sample)
        return scores

    def evaluate(self, params, indices: np.ndarray | None = None) -> np.ndarray:
        idx = check_indices(self, indices)
        tasks, ids, keys = self.train_tasks, self.train_ids, self.train_keys
        if idx is not None:  # only the chosen documents, task by task, through lm-eval's `samples=`
            keys = [keys[i] for i in idx]
            ids = {}
            for name, doc in keys:
                ids.setdefault(name, []).append(doc)
            tasks = {name: task for name, task in tasks.items() if name in ids}
        if not self._bind(params):
            self.last_samples = []
            return np.zeros(len(keys), dtype=np.float32)
        if not keys:
            self.last_samples = []
            return np.zeros(0, dtype=np.float32)
        return self._run(tasks, ids, keys)

    # -- one objective per task ---------------------------------------------------------------
    @property
    def groups(self) -> list[tuple[str, int]] | None:
        """(task, documents) per fitness task, in datapoint order, when there are groups."""
        wanted = self.options.groups
        if wanted is False or (wanted is None and len(self.train_ids) < 2):
            return None
        return [(name, len(ids)) for name, ids in self.train_ids.items()]

    def _test_group_of(self) -> dict[str, str]:
        """Held-out task name -> the fitness task (group) it measures."""
        train = list(self.train_ids)
        mapping = {n: n for n in self.test_ids if n in train}
        others = [n for n in self.test_ids if n not in train]
        if len(others) == len(train):
            mapping.update(zip(others, train))
        return mapping

    def held_out(self, params) -> tuple[float | None, dict[str, float] | None]:
        """The mean over all held-out documents and, with groups, the mean per fitness task: one pass."""
        if not self.test_keys:
            return None, None
        if not self._bind(params):
            scores = np.zeros(len(self.test_keys), dtype=np.float32)
        else:
            scores = self._run(self.test_tasks, self.test_ids, self.test_keys)
        by_group = None
        if self.groups is not None:
            group_of = self._test_group_of()
            sums: dict[str, list[float]] = {}
            for (name, _), value in zip(self.test_keys, scores):
                if name in group_of:
                    sums.setdefault(group_of[name], []).append(float(value))
            by_group = {g: float(np.mean(v)) for g, v in sums.items()}
        return float(scores.mean()), by_group

    def test_score(self, params) -> float | None:
        return self.held_out(params)[0]

    def test_scores(self, params) -> dict[str, float] | None:
        return self.held_out(params)[1]
