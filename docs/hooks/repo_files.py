"""MkDocs hook: repository files outside docs/ join the site under repo/, and links to them keep working.

The repository README becomes the site's home page (index.md).

A docs page links a repository file the way a reader browsing the repository expects (`../CONTRIBUTING.md`,
`../benchmarks/results/search_cpu.json`), and a repository page links docs pages as `docs/<page>.md`. Both
are rewritten to the site's layout (repo/<path> for repository files), so the same Markdown works in the
repository and on the site, and `mkdocs build --strict` still fails on any link whose target does not exist.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
REPO_PREFIX = "repo/"
# Single repository files and whole folders that the site carries (everything else stays out of the site).
REPO_FILES = ("CONTRIBUTING.md", "CHANGELOG.md", "benchmarks/README.md")
REPO_TREES = ("benchmarks/results",)
# The repository README is the site's home page: one text for both, so they cannot drift apart.
HOME = ("README.md", "index.md")

# Markdown link or image target: ](target) or ](target "title"); fenced code is left alone (see below).
_LINK = re.compile(r"\]\(([^)\s]+)((?:\s+\"[^\"]*\")?)\)")
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


def on_files(files: Files, config) -> Files:
    paths = [ROOT / p for p in REPO_FILES]
    for tree in REPO_TREES:
        paths += sorted(p for p in (ROOT / tree).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"repo_files hook: {path} is listed for the site but does not exist")
        files.append(File.generated(config, REPO_PREFIX + path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    files.append(File.generated(config, HOME[1], abs_src_path=str(ROOT / HOME[0])))
    return files


def _repo_path_of(src_uri: str) -> str:
    """Where a site page lives in the repository."""
    if src_uri == HOME[1]:
        return HOME[0]
    return src_uri[len(REPO_PREFIX):] if src_uri.startswith(REPO_PREFIX) else "docs/" + src_uri


def _site_path_of(repo_path: str) -> str:
    if repo_path == HOME[0]:
        return HOME[1]
    return repo_path[len("docs/"):] if repo_path.startswith("docs/") else REPO_PREFIX + repo_path


def _rewrite(target: str, src_uri: str) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target  # external, in-page or absolute: mkdocs validates what it can
    path, hash_, fragment = target.partition("#")
    if not path:
        return target
    page_dir = posixpath.dirname(src_uri)
    repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(_repo_path_of(src_uri)), path))
    if repo_target.startswith("../"):
        return target  # outside the repository: left for mkdocs to report
    site_target = _site_path_of(repo_target)
    return posixpath.relpath(site_target, page_dir or ".") + hash_ + fragment


def on_page_markdown(markdown: str, page, config, files) -> str:
    parts = _FENCE.split(markdown)
    # _FENCE.split alternates text, fence marker, text...; text after an odd number of fences is code.
    out, inside = [], False
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a fence marker
            inside = not inside
            out.append(part)
        elif inside:
            out.append(part)
        else:
            out.append(_LINK.sub(lambda m: f"]({_rewrite(m.group(1), page.file.src_uri)}{m.group(2)})", part))
    return "".join(out)
