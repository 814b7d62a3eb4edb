"""Repository hygiene: the README's commands and links point at things that exist, scripts are
executable, and nothing large or secret-looking is committed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAKEFILE = (REPO / "Makefile").read_text()


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                         timeout=60).stdout.decode()
    return [REPO / p for p in out.split("\0") if p and (REPO / p).is_file()]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", MAKEFILE, flags=re.M))


def test_readme_make_commands_exist() -> None:
    used = {t for t in re.findall(r"`make ([\w-]+)", README) if not t.endswith("-")}  # not bench-*
    assert {"demo", "test"} <= used
    missing = used - make_targets()
    assert not missing, f"README uses make targets the Makefile lacks: {missing}"


def test_readme_test_command_is_the_makefile_one() -> None:
    assert ".venv/bin/python -m pytest -q" in README
    assert re.search(r"^test: install\n\t\$\(PY\) -m pytest -q", MAKEFILE, flags=re.M)


def test_readme_relative_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README):
        if re.match(r"[a-z]+://", target):
            continue
        assert (REPO / target).exists(), f"README links to missing {target}"


def test_makefile_scripts_exist() -> None:
    scripts = re.findall(r"\$\(PY\) ((?:benchmarks|scripts)/[\w./-]+\.py)", MAKEFILE)
    assert scripts
    missing = [s for s in scripts if not (REPO / s).is_file()]
    assert not missing, f"Makefile targets run missing scripts: {missing}"


def test_shebang_files_are_executable() -> None:
    for path in tracked_files():
        with path.open("rb") as f:
            if f.read(2) == b"#!":
                assert os.access(path, os.X_OK), f"{path.relative_to(REPO)} has a shebang "
                "but is not executable"


def test_no_large_files_committed() -> None:
    big = [(p.relative_to(REPO), p.stat().st_size) for p in tracked_files()
           if p.stat().st_size > 2 * 2**20]
    assert not big, f"files over 2 MiB are committed: {big}"


def test_no_private_keys_or_tokens_committed() -> None:
    patterns = [re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
                re.compile(rb"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face access token
                re.compile(rb"\bghp_[A-Za-z0-9]{30,}\b"),  # GitHub token
                re.compile(rb"\bAKIA[0-9A-Z]{16}\b")]  # AWS access key id
    hits = []
    for path in tracked_files():
        data = path.read_bytes()
        hits += [f"{path.relative_to(REPO)}: {p.pattern!r}" for p in patterns if p.search(data)]
    assert not hits, hits
