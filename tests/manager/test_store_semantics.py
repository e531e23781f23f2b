"""The emulated manager's fd store and notify socket behave as systemd
262.1's were measured to (the systemd tier): newest first, a file stored
once, FDSTORE handled before FDSTOREREMOVE, hang-ups dropped unless
FDPOLL=0, the store's size enforced, NotifyAccess= obeyed."""
from __future__ import annotations

import os
import sys
import textwrap
from typing import Any

import pytest

from liveupdate.emulator.systemd import EmulatedSystemd
from liveupdate.emulator.systemd.fdstore import FdStore

UNIT = """\
[Service]
Type=notify
ExecStart={python} {script}
FileDescriptorStoreMax={size}
FileDescriptorStorePreserve=yes
"""


def service(manager: EmulatedSystemd, body: str, size: int = 4, name: str = "s.service") -> str:
    code = "import os, socket, time\nfrom liveupdate import systemd\n" + textwrap.dedent(body) + \
        "\nsystemd.barrier()\nsystemd.notify('READY=1')\nwhile True: time.sleep(60)\n"
    script = os.path.join(manager.directory, name + ".py")
    with open(script, "w") as f:
        f.write(code)
    manager.load(UNIT.format(python=sys.executable, script=script, size=size), name=name)
    manager.start(name)
    return name


@pytest.fixture
def manager(tmp_path) -> Any:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo)
    with EmulatedSystemd(directory=str(tmp_path / "m"), env=env) as m:
        yield m


def names(manager: EmulatedSystemd, unit: str = "s.service") -> list:
    return [name for name, _ in manager.fd_store(unit)]


def test_newest_first_and_a_file_stored_once(manager) -> None:
    service(manager, """
        a, b = os.memfd_create("a"), os.memfd_create("b")
        systemd.store_fd(a, "first")
        systemd.store_fd(b, "second")
        systemd.store_fd(os.dup(a), "again")   # the same file: ignored
    """)
    assert names(manager) == ["second", "first"]


def test_store_and_remove_in_one_message_removes_the_new_fd_too(manager) -> None:
    service(manager, """
        systemd.store_fd(os.memfd_create("old"), "x")
        systemd.barrier()
        systemd.notify("FDSTOREREMOVE=1\\nFDSTORE=1\\nFDNAME=x", [os.memfd_create("new")])
    """)
    assert names(manager) == []


def test_a_hung_up_fd_is_dropped_unless_fdpoll_is_off(manager) -> None:
    service(manager, """
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        systemd.store_fd(r1, "polled")
        systemd.store_fd(r2, "not-polled", poll=False)
        os.close(w1)
        os.close(w2)
    """)
    import time

    deadline = time.monotonic() + 10
    while "polled" in names(manager) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert names(manager) == ["not-polled"]


def test_a_full_store_drops_the_newcomer(manager) -> None:
    service(manager, """
        for i in range(3):
            systemd.store_fd(os.memfd_create(str(i)), "m%d" % i)
    """, size=2)
    assert names(manager) == ["m1", "m0"]


def test_only_the_main_process_may_store(manager) -> None:
    service(manager, """
        pid = os.fork()
        if pid == 0:
            systemd.store_fd(os.memfd_create("child"), "from-child")
            systemd.barrier(timeout=1)  # unanswered: the message is dropped
            os._exit(0)
        os.waitpid(pid, 0)
        systemd.store_fd(os.memfd_create("main"), "from-main")
    """)
    assert names(manager) == ["from-main"]


def test_an_invalid_fdname_is_refused_with_its_fds(manager) -> None:
    service(manager, """
        systemd.notify("FDSTORE=1\\nFDNAME=" + "x" * 300, [os.memfd_create("long")])
        systemd.store_fd(os.memfd_create("ok"), "ok")
    """)
    assert names(manager) == ["ok"]


def test_the_store_is_released_on_stop_unless_preserved(manager) -> None:
    service(manager, 'systemd.store_fd(os.memfd_create("m"), "kept")')
    manager.stop("s.service")
    assert names(manager) == ["kept"]  # FileDescriptorStorePreserve=yes
    manager.load(UNIT.format(python=sys.executable, script="unused.py", size=4).replace("=yes", "=restart"),
                 name="s.service")
    manager.stop("s.service")
    assert names(manager) == []


def test_fdstore_ignores_what_it_cannot_stat() -> None:
    store = FdStore("x.service", 4)
    r, w = os.pipe()
    os.close(w)
    assert store.add(r, "pipe") is True
    assert store.remove("pipe") == 1 and len(store) == 0
