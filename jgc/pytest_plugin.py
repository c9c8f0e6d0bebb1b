"""The pytest plugin (entry point ``pytest11``: ``jgc``): ``pytest --jgc-rules=PACKAGE``.

Records every custom derivative rule defined under PACKAGE that the tests run and
checks each one with :func:`jgc.check_rule` when the session ends (see docs/readme-scan.md).
Without ``--jgc-rules`` it only adds its options.
"""

from ._src.pytest_plugin import (
                                 pytest_addoption,
                                 pytest_configure,
                                 pytest_runtest_protocol,
                                 pytest_sessionfinish,
                                 pytest_terminal_summary,
                                 pytest_testnodedown,
                                 pytest_unconfigure,
)

__all__ = ["pytest_addoption", "pytest_configure", "pytest_runtest_protocol", "pytest_sessionfinish",
           "pytest_terminal_summary", "pytest_testnodedown", "pytest_unconfigure"]
