"""Console scripts turn expected errors into one `error: ...` line on stderr and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

# Bad input a user can fix: a wrong value, a missing or unreadable file, a missing optional package.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ImportError)


def one_line(err: BaseException) -> str:
    """The message on one line (a multi-line error, e.g. a ManifestError listing bad lines, joined by '; ')."""
    text = str(err).strip() or type(err).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, prog: str = "") -> None:
    """Runs main(argv); an expected error prints `error: <prog>: message` and exits 2, without a traceback."""
    try:
        main(argv)
    except EXPECTED_ERRORS as err:
        print(f"error: {prog + ': ' if prog else ''}{one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
