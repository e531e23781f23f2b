"""Tests of the operator tools: the liveupdate command, systemd, the example daemon."""
