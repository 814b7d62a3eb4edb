"""Extract the committed text corpus from files every Debian/Ubuntu Python image carries.

`python -m loadtest workloads build-corpus` reruns this; its output is committed as
`loadtest/corpus/corpus.jsonl` so that workloads are identical on every machine (a fresh CI image
may ship a different Python patch release or different locale packages). Nothing is downloaded.

Sources (provenance and licence are recorded on every document, see README.md here):
- code: the Python standard library's own `.py` sources (PSF License 2.0);
- legal: licence texts in `/usr/share/common-licenses` (each permits verbatim copying);
- languages: translated message strings (`msgstr`) from gettext `.mo` catalogues under
  `/usr/share/locale`, read with Python's `gettext` module (each under its package's licence).
"""

from __future__ import annotations

import gettext
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

LICENSES_DIR = Path("/usr/share/common-licenses")
LOCALE_DIR = Path("/usr/share/locale")
LANGUAGES = ("de", "fr", "es", "it", "pt_BR", "ru", "ja", "zh_CN")
# Widely translated GNU/GNOME catalogues present for every language above in this image.
CATALOGUES: dict[str, str] = {
    "coreutils": "GPL-3.0-or-later",
    "glib20": "LGPL-2.1-or-later",
    "grep": "GPL-3.0-or-later",
    "sed": "GPL-3.0-or-later",
    "findutils": "GPL-3.0-or-later",
    "diffutils": "GPL-3.0-or-later",
}
CODE_FILES = 36
CODE_CHARS = 2500
LEGAL_CHARS = 6000
LANGUAGE_CHARS = 1800
MIN_MESSAGE_CHARS = 20


class CorpusSourceError(RuntimeError):
    """A source directory the corpus is extracted from is missing on this machine."""


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    domain: str  # "code" | "legal" | "language"
    language: str  # "en" or a gettext locale name
    source: str  # where on a stock image the text came from
    licence: str
    text: str


def _clip_lines(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a line boundary so passages stay readable."""
    if len(text) <= limit:
        return text.strip()
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > limit // 2 else limit].strip()


def code_documents(stdlib: Path | None = None) -> Iterator[Document]:
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusSourceError(f"Python stdlib sources not found at {root}")
    files = sorted(
        p
        for p in root.glob("*.py")
        if not p.name.startswith("_") and p.stat().st_size >= 2 * CODE_CHARS  # skip stubs
    )
    # Every k-th module in name order: spread over the alphabet, deterministic for a stdlib.
    step = max(1, len(files) // CODE_FILES)
    for path in files[::step][:CODE_FILES]:
        text = path.read_text(encoding="utf-8", errors="replace")
        yield Document(
            doc_id=f"code/{path.name}",
            domain="code",
            language="en",
            source=f"python{sysconfig.get_python_version()} stdlib {path.name}",
            licence="PSF-2.0",
            text=_clip_lines(text, CODE_CHARS),
        )


def legal_documents(root: Path = LICENSES_DIR) -> Iterator[Document]:
    if not root.is_dir():
        raise CorpusSourceError(f"licence texts not found at {root} (Debian base-files)")
    seen: set[Path] = set()
    for path in sorted(root.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue  # GPL -> GPL-3 and friends are symlinks: keep each text once
        seen.add(real)
        text = real.read_text(encoding="utf-8", errors="replace")
        yield Document(
            doc_id=f"legal/{real.name}",
            domain="legal",
            language="en",
            source=f"{root}/{real.name}",
            licence=f"{real.name} (verbatim copying permitted by the text itself)",
            text=_clip_lines(text, LEGAL_CHARS),
        )


def catalogue_messages(path: Path) -> list[str]:
    """Translated strings of one `.mo` catalogue, sorted by msgid, whitespace collapsed."""
    with path.open("rb") as fp:
        catalog: dict[object, str] = gettext.GNUTranslations(fp)._catalog  # type: ignore[attr-defined]
    out: list[str] = []
    for key in sorted(catalog, key=repr):
        msgid = key[0] if isinstance(key, tuple) else key
        msgstr = re.sub(r"\s+", " ", catalog[key]).strip()
        if not msgid or msgstr == msgid or len(msgstr) < MIN_MESSAGE_CHARS:
            continue  # header entry, untranslated, or too short to be text
        out.append(msgstr)
    return out


def language_documents(root: Path = LOCALE_DIR) -> Iterator[Document]:
    if not root.is_dir():
        raise CorpusSourceError(f"gettext catalogues not found at {root}")
    for lang in LANGUAGES:
        for name, licence in CATALOGUES.items():
            path = root / lang / "LC_MESSAGES" / f"{name}.mo"
            if not path.is_file():
                raise CorpusSourceError(f"gettext catalogue missing: {path}")
            text = "\n".join(catalogue_messages(path))
            yield Document(
                doc_id=f"language/{lang}/{name}",
                domain="language",
                language=lang,
                source=str(path),
                licence=licence,
                text=_clip_lines(text, LANGUAGE_CHARS),
            )


def build_corpus() -> list[Document]:
    return [*code_documents(), *legal_documents(), *language_documents()]


def write_corpus(docs: list[Document], path: Path) -> int:
    """Write JSON lines atomically; returns the byte size."""
    data = b"".join(orjson.dumps(asdict(d)) + b"\n" for d in docs)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)
