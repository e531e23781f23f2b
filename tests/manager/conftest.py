from liveupdate.emulator.systemd.plugin import liveupdate_systemd  # noqa: F401  (the fixture)
