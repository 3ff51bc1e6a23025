"""The errors a user can cause, kept apart from bugs so the command line can report them in one
line (exit status 2, or 1 for a run that failed on its own) and keep tracebacks for real bugs."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a config value, a file, the machine, a busy run folder).
    The message names the key or file and says what to do; ``declip-fast train`` prints it as
    one line and exits with status 2."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; also a ValueError, so library callers that caught
    ValueError for bad configs still do."""


class RunFailed(RuntimeError):
    """The run itself failed (it diverged, or most of its steps were skipped): nothing to fix
    in the command line as such, but the message says what to try; exit status 1."""


def one_line(error: BaseException) -> str:
    """The error's message folded onto one line (so a terminal or a log shows it whole)."""
    return " ".join(str(error).split()) or type(error).__name__


__all__ = ["ConfigError", "RunFailed", "UserError", "one_line"]
