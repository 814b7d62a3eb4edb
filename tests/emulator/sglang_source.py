"""Read sglang 0.5.23's own sources out of its wheel, for the contract tests.

The wheel is the source of truth for the wire contract the emulator implements. It is never
installed (it pulls in torch); the tests read `.py` files straight from the zip. Where it is
looked for, first hit wins:

1. `$SGLANG_WHEEL` (a path to the .whl; set but missing means "no wheel"),
2. `<repo>/.venv/sglang-wheel/sglang-0.5.23-*.whl` (`make sglang-wheel` downloads it there),
3. `/tmp/sgl/sglang-0.5.23-*.whl`.

Without a wheel the contract tests skip (and fail under CI=true, where `make install` fetched
it); the behavioural tests cite the same lines.
"""

from __future__ import annotations

import glob
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SGLANG_VERSION = "0.5.23"
REPO_ROOT = Path(__file__).resolve().parents[2]
_WHEEL_GLOB = f"sglang-{SGLANG_VERSION}-*.whl"

# Reads one file under `sglang/srt/` from the wheel, e.g. read("managers/io_struct.py").
SourceReader = Callable[[str], str]


def wheel_path() -> str | None:
    """The sglang wheel to read, or None when none is available."""
    env = os.environ.get("SGLANG_WHEEL")
    if env:
        return env if os.path.isfile(env) else None
    for folder in (REPO_ROOT / ".venv" / "sglang-wheel", Path("/tmp/sgl")):
        found = sorted(glob.glob(str(folder / _WHEEL_GLOB)))
        if found:
            return found[0]
    return None


@contextmanager
def sglang_reader() -> Iterator[SourceReader]:
    """A reader of the wheel's `sglang/srt/` files; skips the calling test without a wheel.

    Use from a module-scoped fixture:

        @pytest.fixture(scope="module")
        def sglang_source() -> Iterator[SourceReader]:
            with sglang_reader() as read:
                yield read
    """
    path = wheel_path()
    if path is None and os.environ.get("CI"):
        # CI installs with `make install`, which downloads the wheel: a skip there would hide
        # a contract nobody checked.
        pytest.fail(f"no sglang {SGLANG_VERSION} wheel in CI (`make sglang-wheel` failed?)")
    if path is None:
        pytest.skip(f"no sglang {SGLANG_VERSION} wheel (run `make sglang-wheel`, set "
                    f"SGLANG_WHEEL, or put it in /tmp/sgl)")
    with zipfile.ZipFile(path) as zf:
        def read(name: str) -> str:
            return zf.read(f"sglang/srt/{name}").decode()
        yield read
