"""`evomerge compare` on a tiny budget writes the table, the CSV and the plot, one row per strategy."""

from __future__ import annotations

import csv

from evomerge.cli import main


def test_compare_writes_all_three_files(ray_session, tmp_path, capsys):
    config = tmp_path / "pre.yaml"
    config.write_text("name: pre\nseeds: task\nfitness: {task: digits, options: {train_size: 200}}\n"
                      "budget: {evaluations: 10}\nworkers: {count: 2}\n")
    out = tmp_path / "cmp"
    code = main(["compare", str(config), "--strategies", "m2n2,ga,static", "--budget", "24", "--seeds", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| strategy")]
    assert [r.split("|")[1].strip() for r in rows] == ["m2n2", "ga", "static"]
    with open(out / "compare.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 3 and {r["strategy"] for r in runs} == {"m2n2", "ga", "static"}
    assert all(0.0 < float(r["test_score"]) <= 1.0 for r in runs)
    assert {int(r["evaluations"]) for r in runs if r["strategy"] != "static"} == {24}
    # static has 4 merges to offer (2 seeds, SLERP, soup) and ends there rather than re-score them
    assert [int(r["evaluations"]) for r in runs if r["strategy"] == "static"] == [4]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_skips_strategies_that_cannot_run_the_problem(ray_session, tmp_path):
    config = tmp_path / "scratch.yaml"
    config.write_text("name: s\nfitness: {task: digits, options: {train_size: 200}}\n"
                      "budget: {evaluations: 10}\nworkers: {count: 2}\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--strategies", "m2n2,static", "--budget", "12", "--seeds", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert "needs seeds" in (out / "compare.md").read_text()


def test_compare_by_datapoints_runs_every_strategy_within_the_datapoint_budget(ray_session, tmp_path):
    """The engine path (Ray workers) with subsampled children; static does not judge subsets and
    runs on the whole set; the plot's x axis is datapoint-evaluations."""
    config = tmp_path / "pre.yaml"
    config.write_text("name: pre\nseeds: task\nfitness: {task: digits, options: {train_size: 200}, "
                      "subsample: {size: 50}}\nbudget: {evaluations: 10}\nworkers: {count: 2}\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--strategies", "m2n2,static", "--budget-datapoints", "2000",
                 "--seeds", "1", "--out", str(out), "--quiet"]) == 0
    with open(out / "compare.csv") as f:
        runs = {r["strategy"]: r for r in csv.DictReader(f)}
    assert 1600 < int(runs["m2n2"]["datapoints"]) <= 2000  # fewer than 50 short of the budget, never over
    assert int(runs["m2n2"]["evaluations"]) > 10  # subsampled children: more than 2000 / 200 candidates
    assert int(runs["static"]["datapoints"]) == 4 * 200
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
