"""fisher and regmean inside searches: static baselines and M2N2's seed_with (issue 18, item 3).

The driver merges each data-based spec once into RUN_DIR/merges/KEY with `evomerge merge`'s own
pipeline (evomerge/engine/data_merges.py); the population and the workers read that folder back
by tensor name (genomes/merged_folder.py). Checked here on tiny random Llama folders: the tensors a
search evaluates are `evomerge merge`'s for the same YAML, the merge runs once per run folder, and
a real Ray search keeps them in its archive across a snapshot round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import save_tiny_llamas
from evomerge.config import config_from_dict
from evomerge.engine import data_merges
from evomerge.errors import ConfigError
from evomerge.genomes.elements import pack_elements, unpack_elements
from evomerge.genomes.merged_folder import MergedFolder

DATA = ["add_train.jsonl", "rev_train.jsonl"]  # seed 0 on additions, seed 1 on reversals
FISHER = {"method": "fisher", "parameters": {"num_examples": 4}}
REGMEAN = {"method": "regmean", "parameters": {"num_examples": 4, "alpha": 0.8}}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[str]:
    return [str(p) for p in save_tiny_llamas(tmp_path_factory.mktemp("data_merges"), num_layers=2)]


def _config(seeds: list[str], strategy: dict, **extra):
    return config_from_dict({
        "name": "dm", "seed": 0, "seeds": seeds,
        "fitness": {"task": "lm_answer_likelihood", "options": {"data": DATA, "limit": 6, "batch_size": 6}},
        "strategy": strategy, "budget": {"evaluations": extra.pop("evaluations", 8)},
        "workers": {"count": 2, "batch": 1}, **extra})


def _evomerge_merge(seeds: list[str], spec: dict, out: Path) -> Path:
    """What a user gets from `evomerge merge` for the same merge, written as YAML by hand."""
    from evomerge.cli import main

    config = {"merge_method": spec["method"], "models": [{"model": s} for s in seeds],
              "parameters": spec["parameters"], "data": DATA, "dtype": "float32"}
    (out.parent / f"{out.name}.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(out.parent / f"{out.name}.yml"), str(out)]) == 0
    return out


def _flat(folder: Path, basis) -> torch.Tensor:
    """A model folder's tensors along the seeds' layout, read here independently of MergedFolder."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return torch.cat([tensors[t.name].reshape(-1).float() for t in basis.layout.tensors])


@pytest.fixture
def count_merges(monkeypatch) -> list[Path]:
    """Every merge the driver runs, by output folder."""
    calls: list[Path] = []
    real = data_merges.merge_plan

    def counting(plan, out, **kwargs):
        calls.append(Path(out))
        return real(plan, out, **kwargs)

    monkeypatch.setattr(data_merges, "merge_plan", counting)
    return calls


def test_static_baselines_evaluate_evomerge_merges_tensors_and_merge_once(seeds, tmp_path, count_merges):
    from evomerge.engine.basis_spec import checkpoint_basis
    from evomerge.engine.local import run_local

    strategy = {"name": "static", "options": {"merges": [FISHER, REGMEAN, {"method": "ties"}],
                                              "slerp_points": [], "linear": False}}
    config = _config(seeds, strategy)
    records: list = []
    run = tmp_path / "run"
    population = run_local(config, on_record=records.append, run_dir=run)
    assert len(count_merges) == 2  # fisher and regmean; ties needs no data and no folder
    assert sorted(p.parent for p in count_merges) == [(run / "merges").resolve()] * 2
    assert [r.params for r in records] == [{"seed": 0}, {"seed": 1}, {"merge": 0}, {"merge": 1}, {"merge": 2}]
    assert all(r.error is None for r in records)
    plan = {p["merge"]: g for p, g in population.strategy.plan if "merge" in p}
    basis = checkpoint_basis(seeds)
    for j, spec in enumerate((FISHER, REGMEAN)):
        genome = plan[j]
        assert isinstance(genome, MergedFolder) and Path(genome.path).parent == (run / "merges").resolve()
        assert genome.label == ("fisher(num_examples=4)", "regmean(alpha=0.8, num_examples=4)")[j]
        want = _flat(_evomerge_merge(seeds, spec, tmp_path / spec["method"]), basis)
        got = genome.materialise(basis)
        assert torch.equal(got, want), float((got - want).abs().max())
        # a data merge is not a plain average of the seeds
        assert not torch.allclose(want, (_flat(Path(seeds[0]), basis) + _flat(Path(seeds[1]), basis)) / 2, atol=1e-4)
    # the search scored the merged model, not something else: the task on `evomerge merge`'s folder
    from fitness.lm_tasks import LMAnswerLikelihoodTask, flat_params_of

    task = LMAnswerLikelihoodTask({**config.fitness.options, "model": seeds[0]})
    assert records[2].train_score == pytest.approx(float(np.mean(task.evaluate(flat_params_of(tmp_path / "fisher")))))

    # the same run folder again: both folders reused, nothing merged
    run_local(config, run_dir=run)
    assert len(count_merges) == 2
    # a half-written folder (no marker) is merged again, the finished one is kept
    (Path(plan[1].path) / data_merges.MARKER).unlink()
    run_local(config, run_dir=run)
    assert count_merges[2:] == [Path(plan[1].path)]
    # another parameter is another merge, in a folder of its own
    other = _config(seeds, {"name": "static", "options": {"merges": [{"method": "fisher",
                                                                       "parameters": {"num_examples": 2}}]}})
    run_local(other, run_dir=run)
    assert len(count_merges) == 4 and count_merges[3] not in count_merges[:3]


@pytest.mark.slow  # about 80 s: two data merges of real Ray searches
def test_seed_with_data_and_ties_merges_join_a_ray_archive_and_survive_resume(ray_session, seeds, tmp_path,
                                                                               count_merges):
    import optuna

    from evomerge.engine.search import SearchOptions, resume_search, run_search
    from evomerge.snapshots import load_latest_snapshot
    from fitness.lm_tasks import LMAnswerLikelihoodTask, flat_params_of

    strategy = {"name": "m2n2", "options": {"mutation_sigma": 0.0, "archive_size": 6,
                                            "seed_with": [FISHER, {"method": "ties", "parameters": {"density": 0.5}}]}}
    config = _config(seeds, strategy, evaluations=8, sync=True, snapshots={"every": 4})
    out = tmp_path / "run"
    summary = run_search(config, SearchOptions(out_dir=out, progress=False))
    assert summary["evaluations"] == 8 and summary["failed"] == 0
    assert len(count_merges) == 1  # fisher only
    folder = count_merges[0]
    # config.json and the snapshots keep the user's spec: the folder is the actors' business
    assert "merged" not in (out / "config.json").read_text()

    _, meta, arrays = load_latest_snapshot(out)
    elements = unpack_elements({k.removeprefix("population/"): v for k, v in arrays.items()}, "strategy/elements")
    assert [type(e).__name__ for e in elements] == ["MergedFolder", "LayerwiseGenome"]
    assert Path(elements[0].path) == folder and elements[1].method == "ties"
    ids = arrays.get("population/strategy/ids", arrays.get("strategy/ids"))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
    trials = optuna.load_study(study_name="dm", storage=storage).get_trials()
    seeded = {int(t.params["seed_with"]): t for t in trials if "seed_with" in t.params}
    assert sorted(seeded) == [0, 1]
    members = {int(t.user_attrs["member_id"]): t for t in trials}
    in_archive = [i for i in ids.tolist() if i >= 0]
    assert all(any(members[i] is seeded[j] for i in in_archive) for j in (0, 1)), (in_archive, seeded)
    # the workers read the folder: the fisher member scored what the merged folder scores
    task = LMAnswerLikelihoodTask({**config.fitness.options, "model": seeds[0]})
    assert seeded[0].value == pytest.approx(float(np.mean(task.evaluate(flat_params_of(folder)))))

    more = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=12)
    assert more["evaluations"] == 12 and more["failed"] == 0
    assert len(count_merges) == 1  # the resume reused the finished folder
    _, _, arrays = load_latest_snapshot(out)
    again = unpack_elements({k.removeprefix("population/"): v for k, v in arrays.items()}, "strategy/elements")
    assert len(again) == 2 and again[0].equals(elements[0]) and again[1].equals(elements[1])
    assert json.loads((out / "best.json").read_text())["genome"] == "recipe"


def test_data_merges_refuse_what_they_cannot_do(seeds, tmp_path):
    digits = config_from_dict({"name": "d", "seeds": "task", "fitness": {"task": "digits"},
                               "strategy": {"name": "m2n2", "options": {"seed_with": [FISHER]}}, "budget": {"evaluations": 4}})
    with pytest.raises(ConfigError, match=r"strategy.options.seed_with.0: fisher .*checkpoint"):
        data_merges.prepare_data_merges(digits, tmp_path)
    static = {"name": "static", "options": {"merges": [{"method": "regmean", "data": ["add_train.jsonl"]}]}}
    with pytest.raises(ConfigError, match=r"strategy.options.merges.0.data: regmean needs one data file per seed \(2\)"):
        data_merges.prepare_data_merges(_config(seeds, static), tmp_path)
    static["options"]["merges"][0]["data"] = ["add_train.jsonl", "nope.jsonl"]
    with pytest.raises(ConfigError, match=r"strategy.options.merges.0.data.1: data file 'nope.jsonl' not found"):
        data_merges.prepare_data_merges(_config(seeds, static), tmp_path)
    static["options"]["merges"][0] = {**FISHER, "merged": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"merges.0.merged: set by the search itself"):
        data_merges.prepare_data_merges(_config(seeds, static), tmp_path)
    three = config_from_dict({"name": "t", "seeds": seeds, "strategy": {"name": "m2n2", "options": {"seed_with": [FISHER]}},
                              "fitness": {"task": "lm_answer_likelihood", "options": {"data": DATA * 2}},
                              "budget": {"evaluations": 4}})
    with pytest.raises(ConfigError, match=r"seed_with.0.data: .*lists 4 files for 2 seeds"):
        data_merges.prepare_data_merges(three, tmp_path)
    with pytest.raises(ConfigError, match="pass run_dir= to run_local"):
        data_merges.prepare_data_merges(_config(seeds, {"name": "m2n2", "options": {"seed_with": [FISHER]}}), None)
    with pytest.raises(ValueError, match=r"data: ties reads no data"):
        from evomerge.strategies.merge_specs import MergeSpec

        MergeSpec.model_validate({"method": "ties", "data": DATA})


def test_a_single_fitness_file_is_every_seeds_data(seeds, tmp_path):
    from evomerge.strategies.merge_specs import MergeSpec

    one = config_from_dict({"name": "t", "seeds": seeds, "strategy": {"name": "m2n2", "options": {}},
                            "fitness": {"task": "lm_answer_likelihood", "options": {"data": ["add_train.jsonl"]}},
                            "budget": {"evaluations": 4}})
    files = data_merges.spec_data(MergeSpec.model_validate(FISHER), one, "w")
    assert [f.name for f in files] == ["add_train.jsonl"] * 2


def test_merged_folders_pack_with_other_elements_and_refuse_other_seeds(seeds, tmp_path):
    from evomerge.engine.basis_spec import checkpoint_basis
    from evomerge.genomes.layerwise import LayerwiseGenome

    ties = LayerwiseGenome("ties", np.array([[0.0, 1.0]]), None, 0, np.array([0, 10]))
    folder = MergedFolder(str(tmp_path / "x"), "fisher")
    back = unpack_elements(pack_elements([folder, ties, folder], "e"), "e")
    assert back[0].equals(folder) and back[1].equals(ties) and back[2].equals(folder)
    # a folder of another model: names differ, refused by name instead of read by position
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="lacks .* of the seeds' tensors"):
        MergedFolder(str(tmp_path / "other")).materialise(checkpoint_basis(seeds))


def test_compare_lists_a_data_based_baseline_by_its_label():
    import optuna

    from evomerge.compare import static_baselines

    trial = optuna.trial.create_trial(params={"merge": 0}, distributions={
        "merge": optuna.distributions.IntDistribution(0, 10)}, value=0.25, user_attrs={"test_score": 0.5})
    rows = static_baselines([trial], {"merges": [REGMEAN]})
    assert rows == [{"label": "regmean(alpha=0.8, num_examples=4)", "train_score": 0.25, "test_score": 0.5}]


def test_a_merged_folder_as_best_member_is_written_and_exported_as_that_model(seeds, tmp_path):
    """A static fisher baseline that wins is stored as the recipe "all of one more element"."""
    from evomerge.engine.basis_spec import checkpoint_basis
    from evomerge.engine.results import as_element_recipe, write_best
    from evomerge.export import export_best

    merged = _evomerge_merge(seeds, FISHER, tmp_path / "fisher")
    config = _config(seeds, {"name": "static", "options": {"merges": [FISHER]}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.model_dump(mode="json")))
    best = {"member_id": 2, "train_score": 0.5, "test_score": None, "generation": 0, "parents": [],
            "genome": MergedFolder(str(merged), "fisher"), "elements": []}
    stored = as_element_recipe(best, config)
    np.testing.assert_array_equal(stored["genome"].coeffs, [[0, 0, 1]])
    write_best(run, stored, config)
    assert json.loads((run / "best.json").read_text())["basis_elements"] == 1
    export_best(run, run / "best")
    basis = checkpoint_basis(seeds)
    assert torch.equal(_flat(run / "best", basis), _flat(merged, basis))


def test_runs_sharing_a_merges_folder_merge_each_spec_once(seeds, tmp_path, count_merges, monkeypatch):
    """`evomerge compare` gives every run one merges folder: M2N2's seed_with and the static
    baselines name the same fisher spec, which is merged once for both (and every seed)."""
    from evomerge import compare
    from evomerge.engine.local import run_local

    shared = tmp_path / "merges"
    static = _config(seeds, {"name": "static", "options": {"merges": [FISHER], "slerp_points": [], "linear": False}})
    run_local(static, run_dir=tmp_path / "a", merges_dir=shared)
    run_local(static.model_copy(update={"seed": 1}), run_dir=tmp_path / "b", merges_dir=shared)
    assert [p.parent for p in count_merges] == [shared.resolve()]
    assert not (tmp_path / "a" / "merges").exists() and not (tmp_path / "b" / "merges").exists()

    seen = []

    class Stop(Exception):
        pass

    def fake_run_search(config, options):
        seen.append(options.merges_dir)
        raise Stop

    monkeypatch.setattr(compare, "run_search", fake_run_search)
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(static.model_dump(mode="json")))
    with pytest.raises(Stop):
        compare._one_run(path, static, "static", 0, 4, tmp_path / "cmp", str(tmp_path / "cmp.journal"), None, False)
    assert seen == [tmp_path / "cmp" / "merges"]
