"""How candidates are written down and turned into weights."""
