"""A search over two synthetic 1B bf16 Llama experts on this machine: start-up, seconds, memory, export.

What a user with real checkpoints meets, measured in one run (issue 14's targets in brackets):

- seconds from launch to the first score [at most a third of the 99 s measured before];
- seconds per evaluation, split into materialise, train scoring and test scoring (one worker's
  code path, timed in-process on the same checkpoints);
- peak memory of each process (driver, population actor, worker) as a multiple of F, the model's
  bytes in its own dtype [worker <= 1.5 F; population and driver <= 0.1 F during the search; driver
  <= 1.1 F at export]. Counted as anonymous memory (RssAnon): the seeds' memory-mapped page cache is
  shared, reclaimable and not a copy, so it is not counted;
- the export's bytes and dtype [the seeds' bytes +- 1 %, bfloat16];
- materialising a recipe against a plain torch copy of F bytes, in the same run [>= 0.5x the copy].

    python benchmarks/llm_scale.py                     # 1B (makes models/synthetic-1b once: ~60 s, 5.7 GB)
    python benchmarks/llm_scale.py --params 100M       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BEFORE_FIRST_SCORE_S = 99.0  # issue 14, measured on the old code at 1.06B


# -- per-process memory, sampled from /proc ------------------------------------------------------
def _rss_anon(pid: int) -> int | None:
    from evomerge.engine.memory_plan import proc_bytes

    return proc_bytes(f"/proc/{pid}/status", "RssAnon")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class MemorySampler(threading.Thread):
    """Peak RssAnon per role (driver, population, worker), in two phases: search and export."""

    def __init__(self, driver_pid: int, export_marker) -> None:
        super().__init__(daemon=True)
        self.driver_pid, self.export_marker = driver_pid, export_marker
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()

    def _role(self, pid: int) -> str | None:
        if pid == self.driver_pid:
            return "driver"
        cmd = _cmdline(pid)
        if "FitnessWorker" in cmd:
            return "worker"
        if "PopulationActor" in cmd:
            return "population"
        return None

    def run(self) -> None:
        roles: dict[int, str | None] = {}
        while not self.stop.is_set():
            phase = "export" if self.export_marker() else "search"
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                pid = int(entry)
                if pid not in roles or roles[pid] is None:
                    roles[pid] = self._role(pid)
                role = roles[pid]
                if role is None:
                    continue
                rss = _rss_anon(pid)
                if rss is not None:
                    key = f"{role}/{phase}"
                    self.peaks[key] = max(self.peaks.get(key, 0), rss)
            time.sleep(0.2)


def import_baseline() -> int:
    """RssAnon of a process that only imports what the driver and the actors import (torch,
    transformers, Ray, Optuna, the engine): the floor under every process's peak, not model bytes."""
    code = ("import torch, transformers, ray, optuna\n"
            "import evomerge.engine.actors, evomerge.engine.search, fitness.lm_tasks\n"
            "from evomerge.engine.memory_plan import proc_bytes\n"
            "print(proc_bytes('/proc/self/status', 'RssAnon'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return int(out.stdout.strip().splitlines()[-1])


# -- the pieces --------------------------------------------------------------------------------
def make_checkpoints(folder: Path, params: str) -> dict[str, Path]:
    from evomerge.fixtures.synthetic_llama import make_synthetic_llama

    done = folder / "done.json"
    if done.is_file():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    start = time.perf_counter()
    made = make_synthetic_llama(folder, params=params, experts=2, dtype="bfloat16", shard_size="500MB",
                                progress=True)
    done.write_text(json.dumps({k: str(v) for k, v in made.items()}))
    print(f"made {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return made


def write_data(folder: Path) -> tuple[Path, Path]:
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    rows = [(f"{a}+{b}=", str(a + b)) for a in range(10, 90, 5) for b in (3, 17)]
    train.write_text("".join(json.dumps({"prompt": p, "answer": q}) + "\n" for p, q in rows[:16]))
    test.write_text("".join(json.dumps({"prompt": p, "answer": q}) + "\n" for p, q in rows[16:32]))
    return train, test


def search_config(made: dict[str, Path], train: Path, test: Path, budget: int) -> dict:
    return {
        "name": "llm-scale", "seed": 0, "seeds": [str(made["expert_1"]), str(made["expert_2"])],
        "fitness": {"task": "lm_answer_likelihood",
                    "options": {"data": [str(train)], "test_data": [str(test)], "batch_size": 16}},
        "strategy": {"name": "m2n2", "options": {"mutation_sigma": 0.0}},
        "budget": {"evaluations": budget}, "workers": {"count": 1, "num_cpus": 2, "batch": 1},
        "sync": True, "ray": {"num_cpus": 2},
    }


def run_search(config: dict, run_dir: Path) -> dict:
    import yaml

    path = run_dir.parent / "llm-scale.yaml"
    path.write_text(yaml.safe_dump(config))
    launched = datetime.now()  # optuna stores naive local times
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(path), "--out", str(run_dir),
                             "--overwrite", "--quiet"], cwd=REPO_ROOT)
    # best.safetensors is written when the search is over, just before the export starts.
    sampler = MemorySampler(proc.pid, lambda: (run_dir / "best.safetensors").is_file())
    sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"the search failed (exit {rc})")
    import optuna

    from evomerge.tracking.storage import open_storage, storage_url

    study = optuna.load_study(study_name="llm-scale", storage=open_storage(storage_url(None, run_dir)))
    done = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    first = min(t.datetime_complete for t in done)
    seconds = [float(t.user_attrs.get("seconds", "nan")) for t in done]
    return {"wall_s": wall, "first_score_s": (first - launched).total_seconds(), "evaluations": len(done),
            "median_evaluation_s": statistics.median(seconds), "peaks": sampler.peaks}


def split_evaluation(config: dict, repeats: int) -> dict:
    """The worker's own steps, timed in-process: materialise into the bound buffer, train, test."""
    import numpy as np
    import torch

    from evomerge.engine.worker import FitnessWorker
    from evomerge.genomes.recipe import Recipe

    from evomerge.genomes.fused_combine import wait_for_kernels

    worker = FitnessWorker(config, 0, seeds_checked=True)
    wait_for_kernels()  # the steady state: the fused kernel (kernel: auto) compiles on a thread at start
    basis = worker.basis
    times: dict[str, list[float]] = {"materialise": [], "train": [], "test": []}
    for r in range(repeats):
        recipe = Recipe(np.array([0, basis.size // (2 + r), basis.size]), np.array([[0.3, 0.7], [0.6, 0.4]]))
        t0 = time.perf_counter()
        params = worker.materialise(recipe)
        t1 = time.perf_counter()
        worker.task.evaluate(params)
        t2 = time.perf_counter()
        worker.task.test_score(params)
        t3 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(dt)
    # The same F bytes, copied by torch: the floor materialising is measured against.
    buffer = worker.task.candidate_buffer()
    source = torch.empty_like(buffer).copy_(buffer)
    copy = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.copy_(source)
        copy.append(time.perf_counter() - t0)
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    out["copy_F_s"] = statistics.median(copy)
    out["materialise_vs_copy"] = out["copy_F_s"] / out["materialise_s"]
    return out


def export_size(folder: Path) -> tuple[int, str]:
    from safetensors import safe_open

    total, dtypes = 0, set()
    for path in folder.glob("*.safetensors"):
        total += path.stat().st_size
        with safe_open(str(path), "pt") as f:
            dtypes.update(str(f.get_slice(k).get_dtype()) for k in f.keys())
    return total, ",".join(sorted(dtypes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="1B")
    parser.add_argument("--models", type=Path, help="where the synthetic pair lives (default models/synthetic-SIZE)")
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dam", action="store_true",
                        help="run DAM (2 Adam steps, trained on the worker: train_on auto) instead of M2N2: the "
                             "population actor must stay at its import floor, the worker gains about one F")
    args = parser.parse_args(argv)
    models = args.models or REPO_ROOT / "models" / f"synthetic-{args.params.lower()}"
    made = make_checkpoints(models, args.params)
    work = REPO_ROOT / "runs" / "bench-llm-scale"
    work.mkdir(parents=True, exist_ok=True)
    train, test = write_data(work)
    config = search_config(made, train, test, args.budget)
    if args.dam:  # one data file per seed: DAM distils each seed on its own
        rows = train.read_text().splitlines(keepends=True)
        halves = [work / "train_a.jsonl", work / "train_b.jsonl"]
        for path, part in zip(halves, (rows[::2], rows[1::2])):
            path.write_text("".join(part))
        config["fitness"]["options"]["data"] = [str(p) for p in halves]
        config["strategy"] = {"name": "dam", "options": {"steps": 2, "eval_every": 1, "batch_size": 4}}
        config["budget"]["evaluations"] = 5  # the two seeds, the uniform merge, after each step

    from evomerge.config import config_from_dict
    from evomerge.engine.basis_spec import seeds_layout

    layout = seeds_layout([str(made["expert_1"])])
    f_bytes = sum(t.numel * (4 if t.dtype == "F32" else 2) for t in layout.tensors)
    seed_bytes = sum(p.stat().st_size for p in made["expert_1"].glob("*.safetensors"))

    search = run_search(config, work / "run")
    split = split_evaluation(config_from_dict(config).model_dump(mode="json"), args.repeats)
    exported, dtype = export_size(work / "run" / "best")

    print(f"\nsynthetic {args.params} bf16 pair: {layout.size:,} parameters, F = {f_bytes / 2**30:.2f} GiB; "
          f"one worker, {search['evaluations']} evaluations of {'DAM' if args.dam else 'M2N2'}, 2 cores")
    print(f"{'measure':<42}{'value':>14}  target")
    rows = [
        ("launch to first score (s)", f"{search['first_score_s']:.1f}", f"<= {BEFORE_FIRST_SCORE_S / 3:.0f}"),
        ("median evaluation, as recorded (s)", f"{search['median_evaluation_s']:.2f}", ""),
        ("  materialise (s)", f"{split['materialise_s']:.2f}", ""),
        ("  train scoring (s)", f"{split['train_s']:.2f}", ""),
        ("  test scoring (s)", f"{split['test_s']:.2f}", ""),
        ("materialise vs plain copy of F", f"{split['materialise_vs_copy']:.2f}x", ">= 0.5x"),
    ]
    targets = {"worker/search": 1.5, "population/search": 0.1, "driver/search": 0.1, "driver/export": 1.1}
    floor = import_baseline()
    rows.append(("RssAnon of a process only importing (F)", f"{floor / f_bytes:.2f}", "(the floor below)"))
    for key in ("worker/search", "population/search", "driver/search", "driver/export"):
        peak = search["peaks"].get(key)
        rows.append((f"peak RssAnon {key} (F)", "n/a" if peak is None else f"{peak / f_bytes:.2f}",
                     f"<= {targets[key]}"))
        if peak is not None:
            rows.append(("  above the import floor (F)", f"{(peak - floor) / f_bytes:.2f}", ""))
    rows.append(("export bytes / seed bytes", f"{exported / seed_bytes:.4f}", "1 +- 0.01"))
    rows.append(("export dtype", dtype, "torch.bfloat16"))
    for name, value, target in rows:
        print(f"{name:<42}{value:>14}  {target}")
    result = {"params": layout.size, "F_bytes": f_bytes, "search": search, "split": split, "import_floor": floor,
              "export_bytes": exported, "seed_bytes": seed_bytes, "export_dtype": dtype}
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
