"""The project's expected failures: one class tree, so that the entry points catch them in one place.

An `RdistillError` is a failure a user can fix (a bad config or input, a missing model, an
unreachable endpoint, an unusable sandbox, a full disk): its message is one line saying what
is wrong and how to fix it, and `jobs/run.py` prints just that line (the traceback goes to the
run's log file). Anything else escaping a stage is a bug and keeps its traceback.
"""

from __future__ import annotations


class RdistillError(Exception):
    """An expected failure; the message is one line: what is wrong and how to fix it."""

    exit_code = 1


class ConfigError(RdistillError, ValueError):
    """A config value is invalid. The message is one line: key, value, what is allowed."""

    exit_code = 2


class DataError(RdistillError, ValueError):
    """Input data cannot be used (an empty SFT set, a source that yields nothing)."""


class ResourceError(RdistillError):
    """Something outside the config is missing or broken: a model, an endpoint, the code
    sandbox, disk space."""


def expected_error(exc: BaseException) -> RdistillError | None:
    """The project error behind `exc`, if any: itself, or one wrapped by Ray (a task's error is
    re-raised in the driver as a subclass or with `.cause`) or chained as a cause."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RdistillError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
