"""Exceptions raised by jgc."""

from __future__ import annotations


class GradCheckError(AssertionError):
    """Raised when analytic and numerical derivatives disagree.

    A subclass of ``AssertionError`` so that test runners report it as a failed
    assertion. ``.report`` holds the full :class:`jgc.Report`.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
