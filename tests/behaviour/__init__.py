"""Behaviour tests: what every backend (emulator, service, real kernel) must do alike."""
