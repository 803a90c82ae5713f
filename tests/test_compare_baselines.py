"""`evomerge compare` lists each merge of M2N2's seed_with as a static baseline of its own.

(That M2N2 evaluates the same merges at its start is tests/test_merge_baselines.py's job.)"""

from __future__ import annotations

import csv

import optuna

from evomerge.cli import main


def test_compare_lists_the_seed_with_merges_as_static_baselines(ray_session, tmp_path):
    config = tmp_path / "pre.yaml"
    config.write_text(
        "name: pre\nseeds: task\nfitness: {task: digits, options: {train_size: 200}}\n"
        "strategy: {name: m2n2, options: {seed_with: [{method: ties, parameters: {density: 0.5}},"
        " {method: breadcrumbs, parameters: {density: 0.5, gamma: 0.05}}]}}\n"
        "budget: {evaluations: 10}\nworkers: {count: 2}\nsync: true\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--strategies", "static", "--budget", "12", "--seeds", "1",
                 "--out", str(out), "--quiet"]) == 0
    table = (out / "compare.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| strategy")]
    assert rows == ["static", "static: ties(density=0.5)", "static: breadcrumbs(density=0.5, gamma=0.05)"]
    with open(out / "compare.csv") as f:
        runs = {r["strategy"]: r for r in csv.DictReader(f)}
    for name in ("static: ties(density=0.5)", "static: breadcrumbs(density=0.5, gamma=0.05)"):
        assert 0.0 < float(runs[name]["test_score"]) <= 1.0 and int(runs[name]["evaluations"]) == 1
    # 2 seeds + SLERP + soup + the 2 merges
    assert int(runs["static"]["evaluations"]) == 6
    # the static run scored exactly the seed_with merges: 0 and 1 of `merges`
    static_trials = optuna.load_study(study_name="pre-static-seed0", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))).get_trials()
    assert sorted(int(t.params["merge"]) for t in static_trials if "merge" in t.params) == [0, 1]
    assert all(t.user_attrs.get("test_score") is not None for t in static_trials)  # test_every: all
