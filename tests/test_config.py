"""Config errors name the field, the file and the fix; overrides and defaults behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.errors import ConfigError
from evomerge.registry import Registry

REPO = Path(__file__).resolve().parent.parent
BASE = {"name": "x", "fitness": {"task": "digits"}, "budget": {"evaluations": 10}}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _error(tmp_path: Path, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, data))
    return str(info.value)


def test_shipped_populations_validate():
    for path in sorted((REPO / "populations").glob("digits-*.yaml")):
        config = load_config(path)
        assert config.strategy.options["alpha"] == 1.0
        assert config.fitness.task == "digits"


def test_unknown_top_level_key_names_field_file_and_choices(tmp_path):
    message = _error(tmp_path, {**BASE, "budjet": 3})
    assert "search.yaml" in message and "`budjet`" in message and "unknown field" in message
    assert "budget" in message and "strategy" in message  # what is allowed instead


def test_unknown_nested_key_lists_the_nested_choices(tmp_path):
    message = _error(tmp_path, {**BASE, "workers": {"cout": 2}})
    assert "`workers.cout`" in message and "count" in message and "num_gpus" in message


def test_unknown_strategy_option(tmp_path):
    message = _error(tmp_path, {**BASE, "strategy": {"name": "m2n2", "options": {"alfa": 0.5}}})
    assert "`strategy.options.alfa`" in message and "alpha" in message


def test_wrong_type_names_field_and_value(tmp_path):
    message = _error(tmp_path, {**BASE, "budget": {"evaluations": "lots"}})
    assert "`budget.evaluations`" in message and "'lots'" in message
    message = _error(tmp_path, {**BASE, "strategy": {"options": {"alpha": -1}}})
    assert "`strategy.options.alpha`" in message and "greater than or equal to 0" in message


def test_missing_required_field(tmp_path):
    message = _error(tmp_path, {"name": "x", "fitness": {"task": "digits"}})
    assert "`budget`" in message and "required" in message


def test_unknown_strategy_and_task_list_the_registered_ones(tmp_path):
    message = _error(tmp_path, {**BASE, "strategy": {"name": "m2n3"}})
    assert "`strategy.name`" in message and "m2n2" in message and "ga" in message
    message = _error(tmp_path, {**BASE, "fitness": {"task": "digitz"}})
    assert "`fitness.task`" in message and "digits" in message


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    message = _error(tmp_path, {**BASE, "seeds": [str(tmp_path / "missing-model")]})
    assert "`seeds`" in message and "missing-model" in message and "does not exist" in message


def test_overrides_use_dotted_names(tmp_path):
    config = load_config(_write(tmp_path, BASE), {"budget.evaluations": 99, "workers.count": 1})
    assert config.budget.evaluations == 99 and config.workers.count == 1
    assert config.strategy.options["archive_size"] == 20  # defaults filled in from the strategy


def test_config_hash_ignores_budget_but_not_the_algorithm(tmp_path):
    a = load_config(_write(tmp_path, BASE))
    b = load_config(_write(tmp_path, {**BASE, "budget": {"evaluations": 5000}}))
    c = load_config(_write(tmp_path, {**BASE, "strategy": {"options": {"alpha": 0.5}}}))
    assert a.hash() == b.hash() != c.hash()


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    code = main(["search", str(_write(tmp_path, {**BASE, "budjet": 3}))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("evomerge: error:") and "Traceback" not in err


def test_registry_refuses_duplicate_names():
    registry: Registry[object] = Registry("thing")
    registry.add("a", int)
    registry.add("a", int)  # the same object twice is harmless (module re-import)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", float)
    with pytest.raises(KeyError, match="registered: a"):
        registry.get("b")
