"""Checkpoint I/O: memory-mapped seeds, the flat parameter layout, and HF folder export.

Everything here reads safetensors without pickle; pickle checkpoints are refused unless the
user opts in, and even then go through torch.load(weights_only=True).
"""

from evomerge.models.checkpoint import Checkpoint, open_checkpoint
from evomerge.models.errors import CheckpointError
from evomerge.models.layout import Layout, TensorSpec, build_layout, from_specs, read_flat
from evomerge.models.save import save_model_folder
from evomerge.models.seeds import assert_finite, open_seeds

__all__ = [
    "Checkpoint", "CheckpointError", "Layout", "TensorSpec", "assert_finite", "build_layout", "from_specs",
    "open_checkpoint", "open_seeds", "read_flat", "save_model_folder",
]
