"""Ctrl-C while a command starts: one line, exit 130, no traceback of the imports it interrupted.

A script's first lines, before any heavy import (torch, the models)::

    if __name__ == "__main__":
        from utils.startup import quiet_interrupts
        quiet_interrupts()

(only when run as a script: a test that imports the module keeps Python's handler).

This module imports only the standard library, so the handler is in place within milliseconds. ``utils.cli.cli_main``
puts Python's KeyboardInterrupt back when the command itself starts (the steps then install their own handler,
``utils.training.guards.StopFlag``).
"""
from __future__ import annotations

import os
import signal


def interrupted_while_starting(signum, frame) -> None:
    """The SIGINT handler of the start-up phase: one line to stderr and exit 130 at once."""
    os.write(2, b"error: interrupted\n")
    os._exit(130)


def quiet_interrupts() -> None:
    """Install `interrupted_while_starting` for SIGINT (a no-op outside the main thread)."""
    try:
        signal.signal(signal.SIGINT, interrupted_while_starting)
    except ValueError:
        pass


def end_quiet_start() -> None:
    """Give SIGINT back to Python (KeyboardInterrupt) if `quiet_interrupts` installed its start-up handler."""
    try:
        if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass
