"""Errors a user can act on, and the one place that turns them into a message and an exit code."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix (a param, an archive, a URL, a server): shown as one line, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler, a container stop, `kill`), raised where Ctrl-C raises KeyboardInterrupt, so
    that everything that cleans up after Ctrl-C (temporary files, the MLflow run ended KILLED, the checkpoint
    kept) does so after SIGTERM too."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def stage_main(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's main(): a UserError prints `error: ...` on stderr and exits 1; Ctrl-C and SIGTERM print
    that nothing half-written was kept and exit 130 and 143 (128 + the signal's number, as a shell reports it)."""

    @functools.wraps(main)
    def wrapper() -> None:
        signal.signal(signal.SIGTERM, _terminate)
        try:
            main()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            number = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            print("interrupted: nothing half-written was kept; rerun the stage to continue", file=sys.stderr)
            sys.exit(128 + number)

    return wrapper
