"""What every layer raises for the user's mistakes, and the package version.

`UserError` is a problem with the user's input or environment (a bad option, a missing or corrupt
file, a full disk): the `qwen-local` command prints it as one line and exits 2, no traceback.
"""
from __future__ import annotations

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input or environment: reported as one line, no traceback."""


class Terminated(BaseException):
    """SIGTERM (timeout, systemd, docker stop) or SIGHUP (closed terminal), raised in the main thread
    like KeyboardInterrupt, so every `finally` runs: a conversion removes its temp folder."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
