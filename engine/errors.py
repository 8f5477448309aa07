"""Errors and warnings raised while opening studies.

Every problem with user input is reported with the file it came from and what is wrong with it, so
that the viewer can show the message as is and a script's user knows which file to fix.
"""

from __future__ import annotations

import logging
import os
import warnings

logger = logging.getLogger("reg2rg.engine.studyio")


class StudyError(ValueError):
    """A study (volume, mask, DICOM series) cannot be opened. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        if self.path and os.path.basename(self.path):
            # libraries quote the full path again inside their own message: say it once, up front
            problem = problem.replace(self.path, os.path.basename(self.path))
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class StudyWarning(UserWarning):
    """A non-fatal problem found while opening a study; the study is still usable."""


def warn(messages: list[str], path: str | os.PathLike | None, problem: str) -> str:
    """Record a non-fatal problem: append it to ``messages`` (a ``Study.warnings`` list) and warn.

    Only file names and the problem go into the message, never voxel values or patient fields. The
    message reaches the reader once: as a `StudyWarning` (the command-line tools print each as one line,
    the viewer lists ``Study.warnings``); the log gets it at debug level only, so a handler on both
    does not print it twice.
    """
    text = f"{os.fspath(path)}: {problem}" if path is not None else problem
    messages.append(text)
    warnings.warn(text, StudyWarning, stacklevel=3)
    logger.debug(text)
    return text


def print_warnings_as_lines(prog: str) -> None:
    """Show every `StudyWarning` as one line ``<prog>: warning: <message>`` on stderr (not Python's two-line
    ``file:line: StudyWarning: … / source line`` form), each distinct message once per run."""
    import sys

    previous = warnings.showwarning
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, StudyWarning):
            previous(message, category, filename, lineno, file, line)
            return
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"{prog}: warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    warnings.filterwarnings("always", category=StudyWarning)     # dedup is ours, by message
