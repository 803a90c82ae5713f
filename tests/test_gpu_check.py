"""benchmarks/gpu_check.py must run where only torch and transformers exist (the lent GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BLOCK = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('pydantic', 'ray', 'optuna', 'optuna_dashboard', 'cma'):
            raise ImportError('not on the GPU machine: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['gpu_check.py', '--params', '3M', '--device', 'cpu', '--batch-size', '16', '--json', sys.argv[1]]
runpy.run_path(%r, run_name='__main__')
"""


def test_gpu_check_runs_without_ray_optuna_or_pydantic(tmp_path):
    out = tmp_path / "result.json"
    script = BLOCK % str(REPO / "benchmarks" / "gpu_check.py")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["seeds"] == 2 and result["layers"] > 10
    assert result["materialise_s"] > 0 and result["copy_s"] > 0 and result["logprobs_finite"]
    assert result["materialise_eager_s"] > 0  # and the compiled kernel, where this machine compiles it
    assert result["fused_available"] is not None and result["fused_compile_s"] >= 0
    if result["fused_available"]:
        assert result["fused_bits_equal"] is True and result["materialise_fused_s"] > 0
    assert "materialise_vs_copy" in proc.stdout
