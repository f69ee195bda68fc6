"""The ``ncfast`` command line."""
import argparse
import sys

from rich.console import Console
from rich.markup import escape


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ncfast", description="Measure neural collapse of trained networks' features.")
    commands = parser.add_subparsers(dest="command", required=True)
    from ncfast.harness.commands import add_commands as add_harness_commands

    add_harness_commands(commands)  # train, demo, reproduce: parsed without importing torch
    from ncfast.analyze import add_commands  # analyze, merge

    add_commands(commands)
    return parser


def main(argv=None):
    """Entry point of the ``ncfast`` console script."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return args.handler(args, console)
    except (ValueError, TypeError, OSError) as error:
        console.print(f"[red]ncfast {args.command}: {escape(str(error))}[/red]",
                      highlight=False, soft_wrap=True)  # one line, names intact
        return 1


if __name__ == "__main__":
    sys.exit(main())
