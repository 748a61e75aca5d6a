"""Checks that a console script's main reports an expected error as one `error: ...` line and exit status 2."""

from __future__ import annotations

import pytest


def assert_cli_error(capsys, main, argv: list[str], prog: str, *fragments: str) -> str:
    """Runs main(argv), expects SystemExit(2) and one stderr line `error: prog: ...` containing each fragment."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {prog}: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
