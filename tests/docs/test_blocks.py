"""Every code block of README.md and examples/*/README.md runs as pasted.

The convention, for whoever writes a section:

- Fence every code block with its language: ``python`` (a script),
  ``pycon`` (a REPL session: checked as a doctest, outputs and tracebacks
  included) or ``console`` (``$ `` commands, each followed by the output it
  prints). Indented code blocks and blocks of any other language are refused
  unless marked as below, so nothing goes unchecked by accident.
- Outputs shown are real: copy them from a run (a failing check prints the
  real output in full). ``...`` alone on a line of console output stands for
  lines left out.
- Directives are HTML comments on the lines right above the opening fence
  (invisible on a rendered page); a stray or unknown one is an error:

  ``<!-- docs-test: skip: WHY -->``
      the block cannot run here: say why (it needs the real device, root, a
      VM, or is this very test suite). Each is reported as skipped, with its
      place and reason, in every run (``-ra`` shows them). When the reason
      names ``.ci/run``, the test checks that .ci/run runs each of the
      block's commands verbatim.
  ``<!-- docs-test: continue -->``
      runs in the same interpreter (python, pycon) or shell (console) as the
      last block of that family above it in the same file, its names, cwd,
      variables and background processes included.
  ``<!-- docs-test: pytest: ARGS -->``
      a python block that is a test module: run as ``python -m pytest ARGS``
      in an empty directory; it must pass, nothing skipped.
  ``<!-- docs-test: varies: REGEX -->`` (console, repeatable)
      what REGEX matches (its first group, if it has one) may differ from
      run to run, a process id say, and is not compared.
  ``<!-- docs-test: output varies: WHY -->`` (console)
      the commands run and must exit 0, but their output describes the
      machine and is not compared.

How blocks run: python blocks under ``-X dev`` with ResourceWarning an error
and any exception Python can only print (a finalizer's) a failure, so a
leaked Session fails the block. Console commands run in bash in the
Markdown file's directory with stdin from /dev/null; ``liveupdate``,
``python`` and ``python3`` on PATH are the interpreter running the tests,
with this tree's ``liveupdate``. Paths under ``/tmp/`` refer to a private
scratch directory (and are shown back as ``/tmp/``), ``HOME`` and
``XDG_RUNTIME_DIR`` too are private, and no ``LIVEUPDATE_*`` variable is
inherited. A command ending in ``&`` runs in the background: the next
command starts once it has printed the lines shown under it (so show the
line that says it is ready), and by the end of the block it must have
printed exactly those. Whatever a block leaves running is ended when it is
done.
"""
from __future__ import annotations

import difflib
import glob
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import pytest

from . import blocks as md

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CI_SCRIPT = os.path.join(REPO, ".ci", "run")
TIMEOUT_S = 300


def markdown_files() -> List[str]:
    found = [os.path.join(REPO, "README.md")]
    found += sorted(glob.glob(os.path.join(REPO, "examples", "*", "README.md")))
    return [os.path.relpath(path, REPO) for path in found]


def _collect() -> Tuple[Dict[str, str], List[List[md.Block]], List[md.Block]]:
    problems: Dict[str, str] = {}
    runs: List[List[md.Block]] = []
    skipped: List[md.Block] = []
    for path in markdown_files():
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            text = f.read()
        try:
            file_runs, file_skipped = md.groups(md.parse(text, path))
        except md.MarkdownError as exc:
            problems[path] = str(exc)
            continue
        runs += file_runs
        skipped += file_skipped
    return problems, runs, skipped


PROBLEMS, RUNS, SKIPPED = _collect()


def _run_id(run: List[md.Block]) -> str:
    kinds = "+".join(dict.fromkeys("pytest" if b.pytest_args is not None else b.kind for b in run))
    return "%s-%s" % (run[0].where, kinds)


@pytest.mark.parametrize("path", markdown_files())
def test_markdown_follows_the_convention(path: str) -> None:
    assert path not in PROBLEMS, PROBLEMS.get(path)


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_marked_block(block: md.Block) -> None:
    if ".ci/run" in block.skip:
        _check_ci_runs(block)
    pytest.skip("%s (%s block, docs-test: skip): %s" % (block.where, block.kind or "plain", block.skip))


@pytest.mark.parametrize("run", RUNS, ids=[_run_id(r) for r in RUNS])
def test_block_runs_as_shown(run: List[md.Block], scratch: "Scratch") -> None:
    first = run[0]
    if first.pytest_args is not None:
        _run_pytest_block(first, scratch)
    elif md.FAMILY[first.kind] == "python":
        _run_python_group(run, scratch)
    else:
        _run_console_group(run, scratch)


# -- where blocks run ---------------------------------------------------------------


class Scratch:
    """A private /tmp, HOME and XDG_RUNTIME_DIR, and a PATH whose
    ``liveupdate``, ``python`` and ``python3`` are this interpreter."""

    def __init__(self) -> None:
        # Short, because AF_UNIX socket paths under it must stay below 108 bytes.
        self.tmp = tempfile.mkdtemp(prefix="docs-", dir="/tmp")
        self.bin = self.path(".docs-bin")
        for name in ("home", "run", "work"):
            os.makedirs(self.path("." + name), mode=0o700)
        os.makedirs(self.bin)
        for name, args in (("liveupdate", " -m liveupdate"), ("python", ""), ("python3", "")):
            wrapper = os.path.join(self.bin, name)
            with open(wrapper, "w") as f:
                f.write('#!/bin/sh\nexec %s%s "$@"\n' % (shlex.quote(sys.executable), args))
            os.chmod(wrapper, stat.S_IRWXU)

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEUPDATE_", "PYTHON"))}
        env.update(PATH=self.bin + os.pathsep + env.get("PATH", "/usr/bin:/bin"), HOME=self.path(".home"),
                   XDG_RUNTIME_DIR=self.path(".run"), PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1",
                   LC_ALL="C.UTF-8")
        return env

    def into(self, text: str) -> str:
        """A command as run: its /tmp/ paths in the scratch directory."""
        return text.replace("/tmp/", self.tmp + "/")

    def back(self, text: str) -> str:
        """Real output as the reader's machine would print it."""
        return text.replace(self.tmp, "/tmp")


@pytest.fixture
def scratch():
    where = Scratch()
    yield where
    shutil.rmtree(where.tmp, ignore_errors=True)


def _subprocess(argv: List[str], cwd: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT_S)


# -- python, pycon, pytest ----------------------------------------------------------


def _run_python_group(run: List[md.Block], scratch: Scratch) -> None:
    job = os.path.join(tempfile.mkdtemp(dir=scratch.path(".work")), "job.json")
    with open(job, "w", encoding="utf-8") as f:
        json.dump([{"path": b.path, "line": b.line, "kind": b.kind, "text": b.text} for b in run], f)
    done = _subprocess([sys.executable, "-X", "dev", os.path.join(HERE, "run_python.py"), job],
                       cwd=scratch.path(".work"), env=scratch.env())
    assert done.returncode == 0, "%s\n%s" % (done.stderr, done.stdout)


def _run_pytest_block(block: md.Block, scratch: Scratch) -> None:
    directory = scratch.path("pytest-block")
    os.mkdir(directory)
    with open(os.path.join(directory, "test_from_docs.py"), "w", encoding="utf-8") as f:
        f.write(block.text)
    done = _subprocess([sys.executable, "-X", "dev", "-m", "pytest", *shlex.split(block.pytest_args),
                        "-p", "no:cacheprovider", "-q", "-rA", "test_from_docs.py"],
                       cwd=directory, env=scratch.env())
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, (
        "%s: python -m pytest %s:\n%s%s" % (block.where, block.pytest_args, done.stdout, done.stderr))


# -- console ------------------------------------------------------------------------


def _run_console_group(run: List[md.Block], scratch: Scratch) -> None:
    steps = [(block, command) for block in run for command in md.commands(block)]
    assert steps, "%s: a console block with no $ command" % run[0].where
    job = {
        "work": tempfile.mkdtemp(dir=scratch.path(".work")),
        "cwd": os.path.dirname(os.path.join(REPO, run[0].path)),
        "env": scratch.env(),
        "commands": [{"text": scratch.into(c.text), "background": c.background,
                      "wait_lines": len([line for line in c.shown if line != "..."])} for _, c in steps],
    }
    job_file = os.path.join(job["work"], "job.json")
    with open(job_file, "w", encoding="utf-8") as f:
        json.dump(job, f)
    done = _subprocess([sys.executable, os.path.join(HERE, "run_console.py"), job_file],
                       cwd=scratch.path(".work"), env=scratch.env())
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    problems = []
    for (block, command), result in zip(steps, results):
        problems += _console_problems(block, command, result, scratch)
    if len(results) < len(steps):
        block, command = steps[len(results)]
        problems.append("%s:%d: $ %s never ran" % (block.path, command.line, command.text))
    assert not problems, "\n\n".join(problems)


def _console_problems(block: md.Block, command: md.Command, result: Dict, scratch: Scratch) -> List[str]:
    where = "%s:%d: $ %s" % (block.path, command.line, command.text)
    if result.get("timed_out"):
        return ["%s\n  did not finish; it printed:\n%s" % (where, _indent(scratch.back(result["output"])))]
    if block.output_varies is not None:
        if result["rc"] not in (0, None):
            return ["%s\n  exited %s:\n%s" % (where, result["rc"], _indent(scratch.back(result["output"])))]
        return []
    real = scratch.back(result.get("final_output", result["output"]))
    if not _matches(command.shown, _lines(real), block.varies):
        diff = difflib.unified_diff(command.shown, _lines(real), "shown", "real", lineterm="")
        return ["%s\n  prints something else than shown (exit status %s):\n%s\n  real output, to paste:\n%s"
                % (where, result["rc"], _indent("\n".join(diff)), _indent(real))]
    return []


def _lines(text: str) -> List[str]:
    return [line.rstrip() for line in text.rstrip("\n").split("\n")] if text.strip() else []


def _indent(text: str) -> str:
    return "\n".join("    | " + line for line in text.rstrip("\n").split("\n"))


def _mask(line: str, varies: List[str]) -> str:
    for pattern in varies:
        def hide(m: "re.Match[str]") -> str:
            if not m.groups():
                return "<varies>"
            start, end = m.span(1)
            return m.group(0)[:start - m.start()] + "<varies>" + m.group(0)[end - m.start():]
        line = re.sub(pattern, hide, line)
    return line


def _matches(shown: List[str], real: List[str], varies: List[str]) -> bool:
    shown = [_mask(line, varies) for line in shown]
    real = [_mask(line, varies) for line in real]
    return _match_from(shown, 0, real, 0)


def _match_from(shown: List[str], i: int, real: List[str], j: int) -> bool:
    # "..." matches any run of lines; bounded by len(shown) * len(real).
    while i < len(shown) and shown[i] != "...":
        if j >= len(real) or shown[i] != real[j]:
            return False
        i, j = i + 1, j + 1
    if i == len(shown):
        return j == len(real)
    return any(_match_from(shown, i + 1, real, k) for k in range(j, len(real) + 1))


# -- what .ci/run runs --------------------------------------------------------------


def _check_ci_runs(block: md.Block) -> None:
    if not os.path.exists(CI_SCRIPT):
        pytest.skip("%s: no .ci/run here (not a checkout) to check against" % block.where)
    with open(CI_SCRIPT, encoding="utf-8") as f:
        ci_lines = {line.strip() for line in f}
    missing = [c.text for c in md.commands(block) if c.text.strip() not in ci_lines]
    assert not missing, ("%s says .ci/run runs it, but .ci/run has no line %s"
                         % (block.where, " nor ".join(repr(m) for m in missing)))

