"""Experiments that train several models and compare them: `ablation` (the paper's fusion ablation)."""
