"""Tests of the emulator alone: kexec, serialized layouts, restore fuzzing, properties."""
