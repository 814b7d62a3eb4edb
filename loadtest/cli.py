"""`python -m loadtest SUBCOMMAND`: one entry point, one module per subcommand.

Each subcommand module exposes `configure_parser(parser: argparse.ArgumentParser) -> None` and
`main(args: argparse.Namespace) -> int`. Modules are imported only when their subcommand runs, so
a broken or heavy optional dependency of one subcommand never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "cluster": ("loadtest.emulator.cluster", "run an emulated SGLang PD cluster in one process"),
    "workloads": ("loadtest.workloads", "build and inspect offline text workloads"),
    "run": ("loadtest.driver", "drive load at a router URL and record TTFT/TPOT"),
    "compare": ("loadtest.compare", "compare routers side by side on identical arrivals"),
    "report": ("loadtest.report", "render a comparison's markdown report and plots"),
    "seeds": ("loadtest.multiseed", "the eldr headline over several seeds, with 95% intervals"),
    "demo": ("loadtest.demo", "emulated cluster + fitted zones + gateway, ready for requests"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / the error for an unknown subcommand
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"python -m loadtest {name}")
    module.configure_parser(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.main(args))
