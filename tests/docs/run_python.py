"""Run a group of python and pycon blocks in one fresh interpreter, as a
reader pasting them one after the other would (run by test_blocks.py as
``python -X dev run_python.py GROUP.json``).

``python`` blocks are executed as scripts, ``pycon`` blocks checked as
doctests, all in one namespace. A ResourceWarning is an error, and so is an
exception raised where Python can only print it (a finalizer's: an unclosed
Session warning under ``-W error``). Exit status 0 when all is well; else
the report is on stderr.
"""
from __future__ import annotations

import doctest
import gc
import json
import sys
import traceback
import warnings
from typing import Any, List


def main(group_file: str) -> int:
    with open(group_file, encoding="utf-8") as f:
        blocks = json.load(f)
    unraisable: List[str] = []

    def hook(info: Any) -> None:
        unraisable.append("".join(traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback))
                          + "(raised in %r)" % (info.object,))

    sys.unraisablehook = hook
    warnings.simplefilter("default")
    warnings.simplefilter("error", ResourceWarning)
    namespace = {"__name__": "__main__"}
    for block in blocks:
        where = "%s:%d" % (block["path"], block["line"])
        if block["kind"] == "python":
            try:
                exec(compile(block["text"], where, "exec"), namespace)
            except BaseException:
                print("%s: the python block failed:\n%s" % (where, traceback.format_exc()), file=sys.stderr)
                return 1
            continue
        test = doctest.DocTestParser().get_doctest(block["text"], namespace, where, block["path"], block["line"])
        runner = doctest.DocTestRunner()
        report: List[str] = []
        result = runner.run(test, out=report.append, clear_globs=False)
        if result.failed:
            print("%s: the pycon block does not give the output it shows:\n%s" % (where, "".join(report)),
                  file=sys.stderr)
            return 1
    namespace.clear()
    gc.collect()
    if unraisable:
        print("exceptions Python could only print (a finalizer's), e.g. an unclosed handle:\n"
              + "\n".join(unraisable), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
