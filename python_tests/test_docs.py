"""The documentation: every public name has an API entry, every console script a page shows exists and
answers --help (and every `-m oclear_ext.X` module runs), every docs/<page>.md#<anchor> the code points
at exists, the generated oclear-train reference cannot outlive the code, the README stays short and no
page names a commit, and the site builds with `mkdocs build --strict` (no broken link, anchor or page;
.ci/run also runs that build, before the extension is compiled)."""

from __future__ import annotations

import contextlib
import importlib
import io
import importlib.util
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import oclear_ext

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
# Pages whose code blocks show commands to a user.
COMMAND_PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]

_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_DOC_ANCHOR = re.compile(r"docs/([\w/-]+\.md)#([\w-]+)")


def _documented() -> set[str]:
    """Every object an API page renders (the `::: dotted.path` directives of mkdocstrings)."""
    return {m.group(1) for page in API_PAGES for m in _DIRECTIVE.finditer(page.read_text())}


def _public_names(module) -> list[str]:
    """A module's __all__, or (without one) what it defines itself: functions, classes and UPPER constants."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, type(sys)):
            continue
        defined_here = getattr(value, "__module__", None) == module.__name__
        if defined_here or (name.isupper() and not callable(value)):
            names.append(name)
    return names


# Modules of the package that are not API, and why.
INTERNAL = {
    "cli_errors": "the console scripts' shared error handling",
    "examples": "runnable example scripts (python -m oclear_ext.examples.*), shown on the distributed page",
}


def _submodules() -> list[str]:
    """Every public module or package directly under oclear_ext (found on disk: a new one needs a page)."""
    found = sorted(m.name for m in pkgutil.iter_modules(oclear_ext.__path__) if not m.name.startswith("_"))
    return [name for name in found if name not in INTERNAL]


def test_every_public_name_is_on_an_api_page():
    documented = _documented()
    tails = {path.rsplit(".", 1)[-1] for path in documented}
    missing = []
    for name in oclear_ext.__all__:
        if name in oclear_ext._SUBMODULES:
            if f"oclear_ext.{name}" not in documented:
                missing.append(f"oclear_ext.{name} (submodule: no `::: oclear_ext.{name}` page)")
        elif name not in tails:  # the ops are rendered from oclear_ext._ops.<family>.<name>
            missing.append(f"oclear_ext.{name}")
    for sub in _submodules():
        module = importlib.import_module(f"oclear_ext.{sub}")
        if f"oclear_ext.{sub}" not in documented:
            missing.append(f"oclear_ext.{sub} (no `::: oclear_ext.{sub}` module entry)")
        missing += [f"oclear_ext.{sub}.{name}" for name in _public_names(module)
                    if f"oclear_ext.{sub}.{name}" not in documented]
    assert not missing, f"public names without an entry in docs/api/*.md: {missing}"


def test_api_pages_are_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert not [p.name for p in API_PAGES if f"api/{p.name}" not in nav]


def _console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _commands_in_code_blocks() -> dict[str, set[str]]:
    """Console-script-like words (oclear-*) that start a command in a code block: name -> pages."""
    found: dict[str, set[str]] = {}
    for page in COMMAND_PAGES:
        for block in _FENCE.findall(page.read_text()):
            for command in re.split(r"&&|\|\||[;|\n]", block):
                words = command.split()
                while words and ("=" in words[0] or words[0] in ("torchrun", "time", "sudo")):
                    words = words[1:]  # VAR=value prefixes
                if words and words[0].startswith("oclear-"):
                    found.setdefault(words[0], set()).add(page.relative_to(ROOT).as_posix())
    return found


def test_readme_stays_an_entry_point():
    # Reference material belongs in docs/, history in CHANGELOG.md: the README is what a newcomer reads first.
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference sections to docs/"


def test_user_documentation_names_no_commits():
    # A commit hash means history (CHANGELOG.md says what changed, in words) or a pointer users cannot follow.
    commit = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
    found = [f"{page.relative_to(ROOT)}:{i}: {line.strip()[:80]}"
             for page in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
             for i, line in enumerate(page.read_text().splitlines(), 1) if commit.search(line)]
    assert not found, found


def test_readme_shows_console_scripts():
    # The scan below would pass vacuously if the code blocks could not be read.
    assert {"oclear-demo", "oclear-train", "oclear-serve"} <= set(_commands_in_code_blocks())


def test_every_command_shown_is_a_console_script_that_answers_help():
    scripts = _console_scripts()
    shown = _commands_in_code_blocks()
    unknown = {name: sorted(pages) for name, pages in shown.items() if name not in scripts}
    assert not unknown, f"commands in code blocks that are not console scripts of pyproject.toml: {unknown}"
    # Each entry point is called as its installed script calls it, with --help, in this process (they share
    # the torch import; a subprocess per script costs 5-10 s each on 2 cores).
    failed = {}
    for name in sorted(shown):
        module, func = scripts[name].split(":")
        out = io.StringIO()
        argv = sys.argv
        sys.argv = [name, "--help"]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                getattr(importlib.import_module(module), func)()
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        finally:
            sys.argv = argv
        if code != 0 or "usage:" not in out.getvalue():
            failed[name] = f"exit {code}: {out.getvalue()[-600:]}"
    assert not failed, failed


def test_every_python_m_module_shown_runs_as_a_script():
    # `python -m oclear_ext.X` / `torchrun -m oclear_ext.X` in the pages: X must exist and be runnable
    # (a module with a __main__ guard, or a package with __main__.py).
    shown = {m.group(1) for page in COMMAND_PAGES for m in re.finditer(r"-m (oclear_ext(?:\.\w+)+)", page.read_text())}
    assert shown, "no `-m oclear_ext...` command found: the scan is broken"
    broken = []
    for name in sorted(shown):
        spec = importlib.util.find_spec(name)
        if spec is None:
            broken.append(f"{name}: no such module")
            continue
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            if importlib.util.find_spec(f"{name}.__main__") is None:
                broken.append(f"{name}: a package without __main__.py")
        elif "__main__" not in Path(spec.origin).read_text():
            broken.append(f"{name}: no `if __name__ == \"__main__\"` entry")
    assert not broken, broken


def _slug(heading: str) -> str:
    """Python-Markdown toc's default slug of a heading."""
    from markdown.extensions.toc import slugify  # installed with mkdocs (requirements-test.txt)

    return slugify(heading, "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(re.sub(r"[`*]", "", m.group(1)).strip()) for m in re.finditer(r"^#+\s+(.+?)\s*#*$", text, re.MULTILINE)}


def _tracked_files() -> list[Path]:
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        out = subprocess.run([git, "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines()]
    return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


def test_design_references_in_code_exist():
    pytest.importorskip("markdown")
    suffixes = {".py", ".cpp", ".h", ".cu", ".md", ".sh", ".txt", ".toml", ".yml", ""}
    missing = []
    for path in _tracked_files():
        if path.suffix not in suffixes or not path.is_file() or "emoji_builtin" in path.parts:
            continue
        for m in _DOC_ANCHOR.finditer(path.read_text(errors="replace")):
            page = DOCS / m.group(1)
            if not page.is_file() or m.group(2) not in _anchors(page):
                missing.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)}#{m.group(2)}")
    assert not missing, f"references to documentation sections that do not exist: {sorted(set(missing))}"


def _train_config_hook():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hook_train_config", DOCS / "hooks" / "train_config.py")
    hook = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = hook  # its dataclass looks its module up there
    spec.loader.exec_module(hook)
    return hook


def test_train_config_reference_describes_every_field():
    hook = _train_config_hook()
    from oclear_ext.train import TrainConfig
    from dataclasses import fields

    read = hook.read_fields()
    assert [f.name for f in read] == [f.name for f in fields(TrainConfig)]
    undocumented = [f.name for f in read if not f.description and f.name not in hook.SUPPLEMENT]
    assert not undocumented, f"TrainConfig fields without a comment in oclear_ext/train/config.py: {undocumented}"
    names = {f.name for f in read}
    stale = [k for k in hook.SUPPLEMENT if k not in names]
    assert not stale, f"docs/hooks/train_config.py SUPPLEMENT names fields that no longer exist: {stale}"
    superseded = [f.name for f in read if f.description and f.name in hook.SUPPLEMENT]
    assert not superseded, f"these fields now have a comment in the source; drop them from SUPPLEMENT: {superseded}"
    page = hook.render(read)
    assert all(f"`--{f.name.replace('_', '-')}`" in page for f in read)


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    mkdocs = pytest.importorskip("mkdocs")  # noqa: F841
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "ops" / "index.html").is_file()
