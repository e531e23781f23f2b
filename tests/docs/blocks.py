"""The code blocks of a Markdown file, with the ``docs-test`` directives
written right above them (the convention is in test_blocks.py's docstring).

Only what this project's Markdown uses is understood: fenced blocks opened
by three or more backticks at the start of a line, HTML comments on the
lines just above a fence, and indented code blocks (found only to be
refused: they cannot carry a language or a directive).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

#: Blocks the test knows how to run.
RUNNABLE = ("python", "pycon", "console")
#: Which kinds of block share a process when one continues another.
FAMILY = {"python": "python", "pycon": "python", "console": "console"}

_FENCE = re.compile(r"^(`{3,})\s*([^`\s]*)[^`]*$")
_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
_KNOWN = ("skip", "continue", "pytest", "output varies", "varies")


class MarkdownError(Exception):
    """A block or a directive the test cannot take as written."""


@dataclass
class Block:
    path: str  # as shown in reports: relative to the repository
    line: int  # of the opening fence, 1-based
    kind: str  # the fence's language ("" when it has none)
    text: str
    skip: Optional[str] = None
    continues: bool = False
    pytest_args: Optional[str] = None
    output_varies: Optional[str] = None
    varies: List[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return "%s:%d" % (self.path, self.line)


def parse(text: str, path: str) -> List[Block]:
    """Every fenced block of ``text`` with its directives. Raises
    MarkdownError for an unclosed fence, an unknown or stray directive, or
    an indented code block."""
    lines = text.split("\n")
    blocks: List[Block] = []
    pending: List[Tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        if directive:
            pending.append((i + 1, directive.group(1)))
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            end = _closing(lines, i, fence.group(1))
            if end is None:
                raise MarkdownError("%s:%d: the code block is never closed" % (path, i + 1))
            block = Block(path, i + 1, fence.group(2).lower(), "\n".join(lines[i + 1:end]) + "\n")
            _apply(block, pending)
            blocks.append(block)
            pending = []
            i = end + 1
            continue
        if pending:
            raise MarkdownError("%s:%d: a docs-test directive must sit right above a code block's fence"
                                % (path, pending[0][0]))
        if _indented_code(lines, i):
            raise MarkdownError("%s:%d: an indented code block: fence it with ``` and a language (python, "
                                "pycon, console) so that the docs test runs it, or marks it" % (path, i + 1))
        i += 1
    if pending:
        raise MarkdownError("%s:%d: a docs-test directive with no code block after it" % (path, pending[0][0]))
    return blocks


def _closing(lines: List[str], start: int, ticks: str) -> Optional[int]:
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == ticks or (lines[j].startswith(ticks) and not lines[j].strip("`").strip()):
            return j
    return None


def _indented_code(lines: List[str], i: int) -> bool:
    # Four spaces after a blank line, below a paragraph that is not itself
    # indented or a list item (whose continuation lines are indented).
    if not lines[i].startswith("    ") or not lines[i].strip() or i == 0 or lines[i - 1].strip():
        return False
    for j in range(i - 1, -1, -1):
        if lines[j].strip():
            previous = lines[j]
            return not (previous[:1].isspace() or re.match(r"^([-*+]|\d+[.)])\s", previous))
    return True


def _apply(block: Block, directives: List[Tuple[int, str]]) -> None:
    for lineno, directive in directives:
        name, _, value = directive.partition(":")
        name, value = name.strip(), value.strip()
        if name not in _KNOWN:
            raise MarkdownError("%s:%d: unknown docs-test directive %r (known: %s)"
                                % (block.path, lineno, name, ", ".join(_KNOWN)))
        needs_value = name != "continue"
        if needs_value and not value:
            raise MarkdownError("%s:%d: docs-test: %s needs a value after the colon" % (block.path, lineno, name))
        if name == "skip":
            block.skip = value
        elif name == "continue":
            block.continues = True
        elif name == "pytest":
            block.pytest_args = value
        elif name == "output varies":
            block.output_varies = value
        else:
            try:
                re.compile(value)
            except re.error as exc:
                raise MarkdownError("%s:%d: docs-test: varies: %s" % (block.path, lineno, exc)) from None
            block.varies.append(value)
    if block.skip is None and block.kind not in RUNNABLE:
        raise MarkdownError("%s:%d: a %s block the docs test cannot run: give it a language (%s) or mark it "
                            "<!-- docs-test: skip: WHY -->" % (block.path, block.line,
                                                               repr(block.kind) if block.kind else "plain",
                                                               ", ".join(RUNNABLE)))
    if (block.kind == "python" and block.skip is None and block.pytest_args is None
            and re.search(r"^def test_", block.text, re.M)):
        raise MarkdownError("%s:%d: a python block with test functions runs as a script, which calls none "
                            "of them: mark it <!-- docs-test: pytest: ARGS -->" % (block.path, block.line))
    if block.pytest_args is not None and block.kind != "python":
        raise MarkdownError("%s:%d: docs-test: pytest is for python blocks" % (block.path, block.line))
    if (block.varies or block.output_varies) and block.kind != "console":
        raise MarkdownError("%s:%d: docs-test: varies is for console blocks" % (block.path, block.line))


def groups(blocks: List[Block]) -> Tuple[List[List[Block]], List[Block]]:
    """(the runnable blocks, grouped: a block marked ``continue`` joins the
    group of the last runnable block of its family in the same file; the
    blocks marked ``skip``)."""
    runs: List[List[Block]] = []
    last: Dict[Tuple[str, str], List[Block]] = {}
    skipped: List[Block] = []
    for block in blocks:
        if block.skip is not None:
            skipped.append(block)
            continue
        family = "pytest" if block.pytest_args is not None else FAMILY[block.kind]
        key = (block.path, family)
        if block.continues:
            if key not in last or family == "pytest":
                raise MarkdownError("%s: docs-test: continue, but no %s block before it in this file"
                                    % (block.where, family))
            last[key].append(block)
            continue
        runs.append([block])
        last[key] = runs[-1]
    return runs, skipped


@dataclass
class Command:
    line: int  # in the Markdown file
    text: str  # without the "$ " prompt
    shown: List[str]  # the output lines the transcript shows for it

    @property
    def background(self) -> bool:
        stripped = self.text.split(" #", 1)[0].rstrip()
        return stripped.endswith("&") and not stripped.endswith("&&")


def commands(block: Block) -> List[Command]:
    """The ``$ `` commands of a console block, each with the output shown
    under it. Raises MarkdownError if the block shows output before any
    command."""
    out: List[Command] = []
    for offset, line in enumerate(block.text.rstrip("\n").split("\n")):
        if line.startswith("$ "):
            out.append(Command(block.line + 1 + offset, line[2:], []))
        elif out:
            out[-1].shown.append(line.rstrip())
        elif line.strip():
            raise MarkdownError("%s:%d: a console block starts with output, not a $ command; mark it "
                                "<!-- docs-test: skip: WHY --> if it only shows output"
                                % (block.path, block.line + 1 + offset))
    for command in out:
        while command.shown and not command.shown[-1]:
            command.shown.pop()
    return out
