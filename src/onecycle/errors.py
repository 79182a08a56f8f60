"""Errors a user can act on, and the one place that turns them into a message and an exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix (a param, an archive, a URL, a server): shown as one line, no traceback."""


def stage_main(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's main(): a UserError prints `error: ...` on stderr and exits 1; Ctrl-C exits 130."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted: nothing half-written was kept; rerun the stage to continue", file=sys.stderr)
            sys.exit(130)

    return wrapper
