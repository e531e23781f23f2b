"""The docs test itself: it refuses what it cannot check and fails a block
that does not do what it shows (small Markdown made up here)."""
from __future__ import annotations

import os
import time

import pytest

from . import blocks as md
from .test_blocks import Scratch, _run_console_group, _run_python_group


@pytest.fixture
def scratch():
    where = Scratch()
    yield where
    import shutil

    shutil.rmtree(where.tmp, ignore_errors=True)


def runs(text: str):
    found, _ = md.groups(md.parse(text, "README.md"))
    return found


@pytest.mark.parametrize("text,says", [
    ("Text\n\n    indented code\n", "an indented code block"),
    ("```\nplain\n```\n", "a plain block the docs test cannot run"),
    ("```sh\nls\n```\n", "a 'sh' block the docs test cannot run"),
    ("<!-- docs-test: skipp: typo -->\n```console\n$ ls\n```\n", "unknown docs-test directive 'skipp'"),
    ("<!-- docs-test: skip: why -->\n\nText\n", "must sit right above a code block's fence"),
    ("```python\nx = 1\n", "never closed"),
    ("```python\ndef test_x():\n    pass\n```\n", "mark it <!-- docs-test: pytest: ARGS -->"),
    ("<!-- docs-test: continue -->\n```console\n$ ls\n```\n", "no console block before it"),
    ("<!-- docs-test: varies: pid ( -->\n```console\n$ ls\n```\n", "docs-test: varies: missing )"),
    ("<!-- docs-test: skip -->\n```console\n$ ls\n```\n", "needs a value after the colon"),
])
def test_what_cannot_be_checked_is_refused(text, says):
    with pytest.raises(md.MarkdownError, match=None) as info:
        md.groups(md.parse(text, "README.md"))
    assert says in str(info.value)


def test_a_list_item_continued_by_indentation_is_not_code():
    assert md.parse("- item\n\n    more of the item\n", "README.md") == []


def test_a_leaked_session_fails_its_python_block(scratch):
    leak = runs("```python\nimport liveupdate\ns = liveupdate.Emulator().open().create_session('x')\n```\n")
    with pytest.raises(AssertionError, match="unclosed"):
        _run_python_group(leak[0], scratch)


def test_a_pycon_block_must_print_what_it_shows(scratch):
    run = runs("```pycon\n>>> 1 + 1\n3\n```\n")
    with pytest.raises(AssertionError, match="does not give the output it shows"):
        _run_python_group(run[0], scratch)


def test_a_continued_pycon_sees_the_script_before_it(scratch):
    run = runs("```python\nx = 41\n```\n\n<!-- docs-test: continue -->\n```pycon\n>>> x + 1\n42\n```\n")
    _run_python_group(run[0], scratch)


def test_console_output_is_compared_with_elision_and_masks(scratch):
    good = runs("<!-- docs-test: varies: pid (\\d+) -->\n```console\n$ printf 'a\\nb\\nc\\npid %s\\n' $$\n"
                "a\n...\npid 1\n```\n")
    _run_console_group(good[0], scratch)
    bad = runs("```console\n$ echo real\nshown\n```\n")
    with pytest.raises(AssertionError, match=r"(?s)prints something else than shown.*real output, to paste:\s+\| real"):
        _run_console_group(bad[0], scratch)


def test_tmp_paths_are_private_and_shown_back_as_tmp(scratch):
    run = runs("```console\n$ mkdir /tmp/walk && echo /tmp/walk/x > /tmp/walk/f && cat /tmp/walk/f\n"
               "/tmp/walk/x\n```\n")
    _run_console_group(run[0], scratch)
    assert os.path.exists(os.path.join(scratch.tmp, "walk", "f"))


def test_a_background_command_is_waited_for_and_whatever_is_left_is_ended(scratch):
    run = runs("```console\n$ (sleep 0.5; setsid sleep 600 & echo $! > /tmp/pid; echo ready) &\nready\n"
               "$ cat /tmp/pid > /dev/null && cat /tmp/nothing\n```\n")
    with pytest.raises(AssertionError, match="No such file"):
        _run_console_group(run[0], scratch)  # the cat fails, but only after "ready"
    pid = int(open(os.path.join(scratch.tmp, "pid")).read())
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists("/proc/%d" % pid), "the daemon that left the shell's session is still running"


def test_a_background_command_that_prints_more_later_fails(scratch):
    run = runs("```console\n$ (echo ready; sleep 0.3; echo unshown) &\nready\n$ sleep 1\n```\n")
    with pytest.raises(AssertionError, match="unshown"):
        _run_console_group(run[0], scratch)
