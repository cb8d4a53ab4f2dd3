"""Optimizer pieces: int8 Lion, QFT integer updates, HiFT, PEQA, path masks."""
