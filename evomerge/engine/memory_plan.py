"""The memory plan: what every process of a search will hold, printed (and checked) before any
worker starts, so a search that cannot fit stops with the option to change instead of being
killed by the OOM killer an hour in.

Units. F is one copy of the model in the run dtype: layout numel × bytes of the run dtype. The
run dtype is `fitness.options.dtype` when the task has that option (auto = the seeds' dtype, as
evomerge/devices.py resolves it), else float32 (the worker's own merge buffer for tasks without a
bound buffer, e.g. digits). Seeds and the elements a guide adds to the basis are held in the
seeds' dtype (`Basis.place`, `Basis.new_buffer`), which is F when the two agree.

Where the model bytes live (evomerge/engine/worker.py, actors.py, genomes/spaces.py, basis.py):

* driver: no model bytes during the search (it records trials; the export of the best member
  runs after the workers are gone).
* population actor: no model bytes for M2N2 over recipes (the LM task it builds to learn sizes
  is a weightless skeleton until bound); one buffer per guide element and one per non-linear
  `strategy.options.seed_with` merge (RecipeSpace.add_element materialises each into
  Basis.new_buffer: host, seeds' dtype; linear/task_arithmetic merges are recipes and hold
  nothing, merge_specs.joins_basis); for DAM (standalone or as guide) with
  `strategy.options.train_on: population` the task's bound model F, one merge in the run
  dtype (kept for backward) and its gradients (DAM_TRAINING_F = 2F for both); the seeds stay
  views in their own dtype and each group's float32
  sum is transient (columns.combine_trainable). DAM then trains there, on the actor's CPU.
  With `train_on: worker` (auto's choice over checkpoint seeds) it holds no model bytes for DAM:
  the column layout comes from a meta-device model.
* the worker that trains DAM (`train_on: worker`; one at a time, worker 0 unless it died): its
  bound model is the task's own (no extra copy), plus the merged weights kept for autograd and
  their gradients in backward, +2F in the run dtype (DAM_TRAINING_F), on its device (host on a CPU
  worker). Measured: +2.5F at 100M parameters (a 128k-vocabulary embedding is most of it), so
  2F is the floor of what a real model needs, not a bound. The seeds' views must be on that device:
  a GPU worker with its seeds in pinned host memory (`seeds_on: host`, or auto finding they do
  not fit) is refused. The row is shown on worker 0 and counted once in the totals (and on the
  busiest GPU).
* worker on CPU: the merge buffer F (the task's bound buffer), one buffer per guide and seed_with
  element (each worker rebuilds them, FitnessWorker.sync_elements) and ACTIVATION_ALLOWANCE for
  scoring activations.
* worker on GPU: on the device the buffer F, activations, and with `seeds_on: device` the K seeds;
  with `seeds_on: host` the seeds are copied to pinned host memory (per worker, not shareable page
  cache). `auto` picks the device when everything fits on one GPU (the worker itself decides on
  its GPU's free memory at start). Guide and seed_with elements stay on the host.
* seeds: memory-mapped safetensors are page cache, shared by every process on a node; counted
  once per node and shown on their own line, not in any process (the check does not require
  them to fit: pages that do not fit are read again from disk). Pickle seeds (allow_pickle) are
  loaded into every process that opens them (the population actor and each worker).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError

GB = 1e9
ACTIVATION_ALLOWANCE = 256 * 1024 * 1024  # bytes per worker for scoring activations (stated, not measured)
DAM_TRAINING_F = 2  # DAM's merged weights kept for backward, and their gradients: in F
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_SAFETENSORS_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass(frozen=True)
class ModelSizes:
    """What the plan needs to know about the seeds: read from their headers, nothing loaded."""

    numel: int  # floating parameters in the layout
    seeds_dtype: str  # the dtype most of the seeds' parameters have (Basis.dtype): float32, bfloat16, ...
    num_seeds: int
    seed_file_bytes: int | None = None  # one seed's floating tensors in their own dtypes (None: numel × seeds' dtype)
    mapped: bool = True  # False: pickle seeds, loaded into each process's memory

    @property
    def seed_bytes(self) -> int:
        if self.seed_file_bytes is not None:
            return int(self.seed_file_bytes)
        return self.numel * DTYPE_BYTES[self.seeds_dtype]

    @classmethod
    def from_layout(cls, layout: Any, num_seeds: int, mapped: bool = True) -> "ModelSizes":
        counts: dict[str, int] = {}
        file_bytes = 0
        for spec in layout.tensors:
            name = _SAFETENSORS_NAMES.get(spec.dtype, spec.dtype)
            counts[name] = counts.get(name, 0) + spec.numel
            file_bytes += spec.numel * DTYPE_BYTES.get(name, 4)
        dtype = max(counts, key=counts.get) if counts else "float32"
        return cls(int(layout.size), dtype, int(num_seeds), file_bytes, mapped)


@dataclass
class Part:
    what: str
    host: int = 0
    device: int = 0


@dataclass
class ProcessMemory:
    name: str
    parts: list[Part] = field(default_factory=list)
    note: str = ""

    @property
    def host(self) -> int:
        return sum(p.host for p in self.parts)

    @property
    def device(self) -> int:
        return sum(p.device for p in self.parts)


@dataclass
class MemoryPlan:
    sizes: ModelSizes
    run_dtype: str
    model_bytes: int  # F
    element_bytes: int  # one added basis element (guide or seed_with), in the seeds' dtype, on the host
    num_elements: int  # the guide's (guide.max_elements)
    workers: int
    on_gpu: bool
    seeds_on: str | None  # "device" / "host" on GPU workers; None on CPU
    workers_per_gpu: int
    num_gpus: float
    local: bool  # every process on this node (embedded Ray)
    processes: list[ProcessMemory]
    page_cache_bytes: int  # the seeds, once per node
    dtype_option: bool  # the task has a `dtype` option to suggest
    dam: str | None = None  # where DAM (strategy or guide) trains: "population", "worker", or None (no DAM)
    dam_training: Part | None = None  # the training worker's extra (train_on: worker), counted once
    dam_option: str = "strategy.options.train_on"  # its name (a DAM guide's: strategy.options.guide.options.train_on)
    seeds_on_option: str = "auto"  # fitness.options.seeds_on as given
    num_seed_elements: int = 0  # non-linear strategy.options.seed_with merges: basis elements from the start
    notes: list[str] = field(default_factory=list)

    @property
    def driver(self) -> ProcessMemory:
        return self.processes[0]

    @property
    def population(self) -> ProcessMemory:
        return self.processes[1]

    @property
    def worker(self) -> ProcessMemory:
        return self.processes[2]

    @property
    def host_total(self) -> int:
        """Host bytes of every process together (each worker counted)."""
        extra = self.dam_training.host if self.dam_training is not None else 0
        return self.driver.host + self.population.host + self.workers * self.worker.host + extra

    @property
    def device_per_gpu(self) -> int:
        """The busiest GPU: its workers, one of them training DAM (train_on: worker)."""
        if not self.on_gpu:
            return 0
        extra = self.dam_training.device if self.dam_training is not None else 0
        return self.workers_per_gpu * self.worker.device + extra

    def table(self) -> str:
        f = self.model_bytes
        s = self.sizes

        def cell(b: int) -> str:
            return f"{_size(b):>10} {b / f if f else 0.0:8.2f}F" if b else f"{'0':>10} {'-':>9}"

        where = (f"GPU ({self.workers_per_gpu} per GPU, seeds on {self.seeds_on})" if self.on_gpu else "CPU")
        lines = [
            f"memory plan: {s.num_seeds} seeds of {s.numel:,} parameters ({s.seeds_dtype}), run dtype "
            f"{self.run_dtype}: F = {_size(f)}; {self.workers} worker(s) on {where}; "
            f"{self.num_elements} guide element(s), {self.num_seed_elements} seed_with element(s)",
            f"  {'process':<20}{'host':>10} {'(xF)':>9} {'device':>10} {'(xF)':>9}  holds",
        ]
        rows = [self.driver, self.population]
        trains = [self.dam_training] if self.dam_training is not None else []
        rows += [ProcessMemory(f"worker {i}", self.worker.parts + (trains if i == 0 else []), self.worker.note)
                 for i in range(min(self.workers, 8))]
        for proc in rows:
            holds = ", ".join(f"{p.what} {(p.host + p.device) / f if f else 0:.2f}F" for p in proc.parts
                              if p.host or p.device) or proc.note or "no model bytes"
            lines.append(f"  {proc.name:<20}{cell(proc.host)} {cell(proc.device)}  {holds}")
        if self.workers > 8:
            lines.append(f"  ... {self.workers - 8} more workers, each as worker 1")
        total_name = "total, this node" if self.local else "total, all nodes"
        lines.append(f"  {total_name:<20}{cell(self.host_total)} "
                     f"{cell(self.device_per_gpu) if self.on_gpu else cell(0)}  "
                     f"{'(device: per GPU)' if self.on_gpu else ''}".rstrip())
        if self.page_cache_bytes:
            lines.append(f"  seeds, page cache, once per node: {_size(self.page_cache_bytes)} "
                         f"({self.page_cache_bytes / f if f else 0:.2f}F); memory-mapped, in no process's RSS")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _run_dtype(options: dict[str, Any], sizes: ModelSizes) -> tuple[str, bool]:
    if "dtype" not in options:
        return "float32", False
    dtype = str(options.get("dtype") or "auto")
    return (sizes.seeds_dtype if dtype == "auto" else dtype), True


def _guide_elements(config: Any) -> tuple[int, str | None]:
    guide = (config.strategy.options or {}).get("guide")
    if not guide or not isinstance(config.seeds, list) or not config.seeds:
        return 0, None
    return int(guide.get("max_elements", 4)), guide.get("from")


def _dam_trains_on(config: Any) -> tuple[str | None, str]:
    """Where DAM (the strategy, or M2N2's guide) trains: `strategy.options.train_on`, or the
    guide's `options.train_on`; auto is the worker over checkpoint seeds (the plan's only case)
    unless the genomes are dense (DAM's `_train_on`). None without DAM; and the option's name."""
    options = config.strategy.options or {}
    field_name = "strategy.options.train_on"
    if config.strategy.name == "dam":
        wanted = options.get("train_on", "auto")
    elif (options.get("guide") or {}).get("from") == "dam":
        wanted = ((options["guide"].get("options") or {}).get("train_on", "auto"))
        field_name = "strategy.options.guide.options.train_on"
    else:
        return None, field_name
    if wanted == "auto":
        return ("population" if config.genome.kind == "dense" else "worker"), field_name
    return str(wanted), field_name


def _seed_with_elements(config: Any, num_seeds: int) -> int:
    """How many `strategy.options.seed_with` merges join the basis (merge_specs.joins_basis). A
    spec the strategy will refuse is counted as one: it refuses with its own message."""
    specs = (config.strategy.options or {}).get("seed_with") or []
    if not specs or config.genome.kind == "dense" or not isinstance(config.seeds, list) or not config.seeds:
        return 0
    from evomerge.strategies.merge_specs import joins_basis

    count = 0
    for spec in specs:
        try:
            count += joins_basis(spec, num_seeds)
        except ValueError:
            count += 1
    return count


def _elements(parts: list[Part], guide: int, seed_with: int, element_bytes: int) -> None:
    """The added basis elements a process holds, on the host in the seeds' dtype (Basis.new_buffer)."""
    if guide:
        parts.append(Part(f"{guide} guide elements", host=guide * element_bytes))
    if seed_with:
        parts.append(Part(f"{seed_with} seed_with elements", host=seed_with * element_bytes))


def _workers_per_gpu(num_gpus: float, count: int) -> int:
    if num_gpus <= 0:
        return count  # a device named without Ray GPUs: they all land on the one visible GPU
    if num_gpus >= 1:
        return 1
    return max(1, min(count, math.floor(1.0 / num_gpus + 1e-9)))


def plan_memory(config: Any, sizes: ModelSizes, *, gpu_bytes: int | None = None, local: bool = True,
                allowance_bytes: int = ACTIVATION_ALLOWANCE) -> MemoryPlan:
    """The memory each process of `config` will need, from the seeds' sizes alone (pure)."""
    options = dict(config.fitness.options or {})
    run_dtype, dtype_option = _run_dtype(options, sizes)
    if run_dtype not in DTYPE_BYTES:
        raise ConfigError(f"fitness.options.dtype {run_dtype!r} is not one of auto, float32, bfloat16, float16")
    n, k = sizes.numel, sizes.num_seeds
    f = n * DTYPE_BYTES[run_dtype]
    f32 = n * 4
    seed_dtype_bytes = n * DTYPE_BYTES.get(sizes.seeds_dtype, 4)
    num_elements, _ = _guide_elements(config)
    num_seed_elements = _seed_with_elements(config, k)
    notes: list[str] = []

    spec = config.workers
    device = str(options.get("device") or "auto")
    on_gpu = device.startswith("cuda") or (device == "auto" and spec.num_gpus > 0)
    per_gpu = _workers_per_gpu(spec.num_gpus, spec.count) if on_gpu else 0
    dense = (config.genome.kind == "dense")
    unmapped_seeds = 0 if sizes.mapped else k * sizes.seed_bytes

    # population actor
    pop = ProcessMemory("population actor")
    _elements(pop.parts, num_elements, num_seed_elements, seed_dtype_bytes)
    dam, dam_option = _dam_trains_on(config)
    if dam == "population":
        # DAM trains against the task's model (its bound buffer, F) with one merge in the run dtype.
        pop.parts.append(Part("DAM: task model + merge + gradients", host=(1 + DAM_TRAINING_F) * f))
    if dense:
        pop.parts.append(Part("seeds as dense float32 members", host=k * f32))
        notes.append("dense genomes over checkpoint seeds: every archive member is a float32 model "
                     "(strategy.options.archive_size of them), not counted here")
    if unmapped_seeds:
        pop.parts.append(Part("pickle seeds, loaded", host=unmapped_seeds))

    # one worker
    worker = ProcessMemory("worker")
    seeds_on, wanted = None, str(options.get("seeds_on") or "auto")
    if not on_gpu:
        worker.parts.append(Part("merge buffer", host=f))
        _elements(worker.parts, num_elements, num_seed_elements, seed_dtype_bytes)
        worker.parts.append(Part("activations", host=allowance_bytes))
    else:
        # The worker's rule (FitnessWorker._place_seeds): resident when the K seeds fit beside the buffer.
        seeds_bytes = k * sizes.seed_bytes
        if wanted == "auto":
            fits = gpu_bytes is None or per_gpu * (f + allowance_bytes + seeds_bytes) <= gpu_bytes
            seeds_on = "device" if fits else "host"
            if gpu_bytes is None:
                notes.append("GPU memory unknown here: auto assumed the seeds go to the device")
        else:
            seeds_on = wanted
        worker.parts.append(Part("merge buffer", device=f))
        worker.parts.append(Part("activations", device=allowance_bytes))
        if seeds_on == "device":
            worker.parts.append(Part(f"{k} seeds", device=seeds_bytes))
        else:
            worker.parts.append(Part(f"{k} seeds, pinned", host=seeds_bytes))
        _elements(worker.parts, num_elements, num_seed_elements, seed_dtype_bytes)  # host, as on CPU
    if unmapped_seeds:
        worker.parts.append(Part("pickle seeds, loaded", host=unmapped_seeds))
    # DAM on a worker: the merged weights autograd keeps, beside the worker's own bound model.
    dam_training = None
    if dam == "worker":
        extra = DAM_TRAINING_F * f
        dam_training = Part("DAM training: merge + gradients", device=extra) if on_gpu else \
            Part("DAM training: merge + gradients", host=extra)

    if not on_gpu and local and run_dtype in ("bfloat16", "float16"):
        from evomerge.devices import DTYPES, cpu_lacks_native, slow_cpu_dtype_advice

        if cpu_lacks_native(DTYPES[run_dtype]):
            notes.append(slow_cpu_dtype_advice(DTYPES[run_dtype]))
    driver = ProcessMemory("driver", note="no model bytes (export runs after the workers stop)")
    if not local:
        notes.append("Ray cluster: processes spread over nodes; host memory checked per process "
                     "against this node only")
    return MemoryPlan(
        sizes=sizes, run_dtype=run_dtype, model_bytes=f,
        element_bytes=seed_dtype_bytes, num_elements=num_elements, workers=spec.count, on_gpu=on_gpu,
        seeds_on=seeds_on, workers_per_gpu=per_gpu, num_gpus=spec.num_gpus, local=local,
        processes=[driver, pop, worker], page_cache_bytes=k * sizes.seed_bytes if sizes.mapped else 0,
        dtype_option=dtype_option, dam=dam, dam_training=dam_training, dam_option=dam_option,
        seeds_on_option=wanted,
        num_seed_elements=num_seed_elements, notes=notes)


def _size(b: float) -> str:
    """GB (decimal) for model-sized numbers, MB or KB for small ones."""
    if abs(b) >= 1e9:
        return f"{b / GB:.2f} GB"
    if abs(b) >= 1e6:
        return f"{b / 1e6:.1f} MB"
    return f"{b / 1e3:.1f} KB"


def _gb(b: float) -> str:
    return _size(b)


def check(plan: MemoryPlan, free_host_bytes: int | None, gpu_bytes: int | None) -> None:
    """ConfigError naming the options to change when the plan does not fit; None when it does
    (or when a side cannot be measured: None)."""
    cheaper = []
    if plan.dtype_option and plan.run_dtype == "float32":
        cheaper.append("`fitness.options.dtype` (float32 now; bfloat16 halves every model copy)")
    elements = []  # added basis elements live on the host: no help on a GPU
    if plan.num_elements:
        elements.append(f"`strategy.options.guide.max_elements` ({plan.num_elements} now; each element is "
                       f"{_gb(plan.element_bytes)} in every worker and the population actor)")
    if plan.num_seed_elements:
        elements.append(f"`strategy.options.seed_with` ({plan.num_seed_elements} non-linear merges now; each "
                       f"joins the basis as an element of {_gb(plan.element_bytes)} in every worker and the "
                       "population actor; linear and task_arithmetic merges are recipes and hold none)")
    if plan.dam == "population":
        cheaper.append(f"the DAM strategy or guide (it trains in the population actor, which then holds "
                       f"{_gb((1 + DAM_TRAINING_F) * plan.model_bytes)}: the task's model, a merge and "
                       f"its gradients; `{plan.dam_option}: worker` trains on a fitness worker instead, "
                       "where it adds the merge and its gradients; `strategy: m2n2` or a "
                       "`guide.from: cmaes` hold none)")
    if plan.dam == "worker":
        cheaper.append(f"`{plan.dam_option}: population` (DAM now trains on a worker, adding "
                       f"{_gb(DAM_TRAINING_F * plan.model_bytes)} there; in the population actor it holds "
                       f"{_gb((1 + DAM_TRAINING_F) * plan.model_bytes)} of host memory)")
    off = "or set `workers.memory_check: false` to start anyway"
    if plan.dam == "worker" and plan.on_gpu and plan.seeds_on == "host":
        why = ("`fitness.options.seeds_on` is host" if plan.seeds_on_option == "host" else
               "`fitness.options.seeds_on: auto` keeps them in host memory here: they do not fit on the GPU "
               "beside the buffer")
        raise ConfigError(
            f"memory plan: DAM trains on a GPU worker (`{plan.dam_option}` is worker, set or auto's "
            f"choice over checkpoint seeds) against the seeds' views on that GPU, but the seeds would be in pinned host "
            f"memory ({why}); set `fitness.options.seeds_on: device` (the {plan.sizes.num_seeds} seeds resident "
            f"need {_gb(plan.sizes.num_seeds * plan.sizes.seed_bytes)} per GPU), or "
            f"`{plan.dam_option}: population` (trains in the population actor on its CPU)")
    if free_host_bytes is not None:
        trainer = plan.worker.host + (plan.dam_training.host if plan.dam_training is not None else 0)
        need = plan.host_total if plan.local else max(trainer, *(p.host for p in plan.processes))
        if need > free_host_bytes:
            what = (f"{plan.workers} workers × {_gb(plan.worker.host)} + population actor "
                    f"{_gb(plan.population.host)}" if plan.local else
                    f"its largest process {_gb(need)}")
            options = [f"`workers.count` ({plan.workers} now; each worker needs {_gb(plan.worker.host)})"]
            if plan.on_gpu and plan.seeds_on == "host":
                options.append("`fitness.options.seeds_on: device` (the seeds are pinned in host memory "
                               "by every worker now)")
            options += elements + cheaper
            raise ConfigError(
                f"memory plan: the search needs {_gb(need)} of host memory ({what}) but this node has "
                f"{_gb(free_host_bytes)} available; change {', '.join(options)}; {off}")
    if plan.on_gpu and gpu_bytes is not None and plan.device_per_gpu > gpu_bytes:
        options = []
        if plan.workers_per_gpu > 1:
            options.append(f"`workers.num_gpus` ({plan.num_gpus} now puts {plan.workers_per_gpu} workers "
                           "on one GPU; 1 gives each its own)")
        if plan.seeds_on == "device":
            options.append(f"`fitness.options.seeds_on: host` (keeps the {plan.sizes.num_seeds} seeds "
                           "in pinned host memory)")
        options += cheaper
        if not options:
            options.append("`fitness.options.dtype` (a smaller run dtype)")
        raise ConfigError(
            f"memory plan: each GPU needs {_gb(plan.device_per_gpu)} ({plan.workers_per_gpu} worker(s) × "
            f"{_gb(plan.worker.device)}) but a GPU has {_gb(gpu_bytes)}; change {', '.join(options)}; {off}")


# -- reading the machine -------------------------------------------------------------------------

def proc_bytes(path: str, key: str) -> int | None:
    """A `Key:  N kB` line of a /proc file (meminfo, PID/status) in bytes; None where there is none."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def gpu_total_bytes() -> int | None:
    """The smallest GPU's total memory on this node, without opening a CUDA context here when
    nvidia-smi can tell; None when there is no GPU."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            sizes = [int(float(x)) * 1024 * 1024 for x in out.split() if x.strip()]
            if sizes:
                return min(sizes)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    except Exception:
        return None
    return None


def seed_sizes(config: Any) -> ModelSizes | None:
    """The seeds' sizes from the first seed's headers (the seeds share a layout; the search
    checks that when it opens them). None for searches without checkpoint seeds."""
    if not isinstance(config.seeds, list) or not config.seeds:
        return None
    from evomerge.models import build_layout, open_checkpoint

    with open_checkpoint(config.seeds[0], allow_pickle=config.allow_pickle) as ckpt:
        layout = build_layout(ckpt)
        mapped = getattr(ckpt, "_loaded", None) is None
    return ModelSizes.from_layout(layout, len(config.seeds), mapped=mapped)


def check_before_start(config: Any, *, local: bool = True, out: Any = None) -> MemoryPlan | None:
    """Print the plan and refuse a search that cannot fit. Skipped (None) when
    `workers.memory_check` is off or there are no checkpoint seeds (from-scratch dense searches
    and task-made seeds are small)."""
    if not getattr(config.workers, "memory_check", True):
        return None
    sizes = seed_sizes(config)
    if sizes is None:
        return None
    options = config.fitness.options or {}
    wants_gpu = config.workers.num_gpus > 0 or str(options.get("device") or "auto").startswith("cuda")
    gpu = gpu_total_bytes() if wants_gpu else None
    plan = plan_memory(config, sizes, gpu_bytes=gpu, local=local)
    print(plan.table(), file=out or sys.stderr)
    check(plan, free_host_bytes(), gpu)
    return plan
