"""Differential test: the real kernel against the emulator (see test_differential.py)."""
