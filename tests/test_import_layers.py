"""The merging layer stands alone: it reads YAML through `evomerge.yamlio`, not the search config.

Run in a fresh interpreter, so modules other tests imported cannot hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _imported_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('evomerge'))))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_merging_imports_neither_config_nor_genomes_nor_strategies():
    loaded = _imported_after("import evomerge.merging, evomerge.merging.mergekit_config, evomerge.merging.run")
    assert "evomerge.yamlio" in loaded
    for upper in ("evomerge.config", "evomerge.genomes", "evomerge.strategies", "evomerge.engine"):
        assert not any(m == upper or m.startswith(upper + ".") for m in loaded), upper


def test_yamlio_is_below_config():
    loaded = _imported_after("import evomerge.yamlio")
    assert loaded <= {"evomerge", "evomerge.yamlio", "evomerge.errors"}
