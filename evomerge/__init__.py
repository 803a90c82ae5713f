"""evomerge: evolutionary model-merge search (M2N2 and baselines) on Ray."""

__version__ = "0.1.0"
