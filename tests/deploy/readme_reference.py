"""Generates README.md's configuration and metrics reference sections from the code.

The configuration table comes from `gateway.config.Settings` (the single source of defaults; flag
and environment names follow `gateway.cli`: field `foo_bar` -> `--foo-bar`, `GATEWAY_FOO_BAR`);
the metrics table from the metric facades in `gateway.metrics` and `gateway.eldr.metrics`, each
built on a fresh registry. `tests/deploy/test_readme_reference.py` fails when README.md is stale.

    python -m tests.deploy.readme_reference          # rewrite README.md in place
    python -m tests.deploy.readme_reference --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

README = Path(__file__).resolve().parents[2] / "README.md"
METRIC_MODULES = ("gateway.metrics", "gateway.eldr.metrics")
SECTIONS = ("CONFIG", "METRICS")


def markers(section: str) -> tuple[str, str]:
    return (
        f"<!-- BEGIN GENERATED {section} (python -m tests.deploy.readme_reference) -->",
        f"<!-- END GENERATED {section} -->",
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "none" if not value else ", ".join(map(str, value))
    return f"`{value}`"


def render_config() -> str:
    from gateway.config import Settings

    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("kind") == "prefill":
            flag += " URL [PORT\\|none]"
        elif f.metadata.get("kind") == "append":
            flag += " URL"
        elif f.default is True:  # on by default: the CLI adds the --no- form (gateway/cli.py)
            flag = f"{flag}`, `--no-{flag[2:]}"
        help_text = str(f.metadata.get("help", ""))
        choices = f.metadata.get("choices")
        if choices:
            help_text += " (" + ", ".join(choices) + ")"
        rows.append(
            f"| `{flag}` | `GATEWAY_{f.name.upper()}` | {_default(f)} | {_cell(help_text)} |"
        )
    return "\n".join(rows)


def render_metrics() -> str:
    rows = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for mod_name in METRIC_MODULES:
        mod = importlib.import_module(mod_name)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod_name or list(inspect.signature(cls).parameters) != [
                "registry"
            ]:
                continue
            facade = cls(CollectorRegistry())
            for metric in vars(facade).values():
                describe = getattr(metric, "describe", None)
                if describe is None:
                    continue
                labels = ", ".join(getattr(metric, "_labelnames", ())) or "-"
                for fam in describe():
                    name = fam.name + ("_total" if fam.type == "counter" else "")
                    doc = _cell(fam.documentation)
                    rows.append(f"| `{name}` | {fam.type} | {labels} | {doc} |")
    return "\n".join(rows)


RENDERERS = {"CONFIG": render_config, "METRICS": render_metrics}


def splice(text: str, section: str, body: str) -> str:
    begin, end = markers(section)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md lacks the {section} markers {begin!r} ... {end!r}")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def current(text: str, section: str) -> str:
    begin, end = markers(section)
    m = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, flags=re.S)
    return m.group(1) if m else ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = p.parse_args(argv)
    text = README.read_text()
    new = text
    for section in SECTIONS:
        new = splice(new, section, RENDERERS[section]())
    if args.check:
        if new != text:
            print("README.md reference sections are stale: run "
                  "`python -m tests.deploy.readme_reference`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
