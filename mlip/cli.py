"""The `mlip` command: info, train, eval, serve, ipi.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
heavy imports happen inside ``run`` so `mlip --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": ("mlip.info", "print a checkpoint's model card and config"),
    "serve": ("mlip.server.cli", "serve checkpoints over HTTP and WebSocket"),
    "train": ("mlip.training.train", "train a potential from a YAML config"),
    "eval": ("mlip.training.evaluate", "evaluate a checkpoint on extended-XYZ data"),
    "ipi": ("mlip.ipi", "answer an i-PI server's force requests (socket client)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        sub.choices[name].set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ValueError as err:
        print(f"mlip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
