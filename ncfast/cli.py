"""The ``ncfast`` command line.

Results go to stdout; progress, messages and errors to stderr, so that
``ncfast analyze RUN --format csv > results.csv`` keeps a clean file and a
terminal still shows what went wrong.
"""
import argparse
import sys
import warnings

#: Exit status of every command, shown by ``--help``.
EXIT_STATUS = """\
exit status:
  0    success
  1    bad input or options; for analyze, some input could not be measured (the others
       are measured, and written unless --out holds an earlier analysis); the reason is
       printed on stderr
  2    wrong command line (usage error){extra}
  130  interrupted (Ctrl-C)"""

#: What a command adds to ``EXIT_STATUS`` (``ncfast.harness.commands.REPRODUCE_EXIT``).
EXTRA_EXIT_STATUS = {"reproduce": "\n  3    the reproduced claim is undecided"
                                  "\n  4    the reproduced claim did NOT hold"}


def build_parser():
    from ncfast import __version__

    parser = argparse.ArgumentParser(
        prog="ncfast", description="Measure neural collapse of trained networks' features.",
        epilog=EXIT_STATUS.format(extra=""), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ncfast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    from ncfast.harness.commands import add_commands as add_harness_commands

    add_harness_commands(commands)  # train, demo, reproduce: parsed without importing torch
    from ncfast.analyze import add_commands  # analyze, merge

    add_commands(commands)
    for name, command in commands.choices.items():
        command.epilog = EXIT_STATUS.format(extra=EXTRA_EXIT_STATUS.get(name, ""))
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.set_defaults(command_parser=command)
    return parser


def parse_command_line(argv=None):
    """Parsed arguments; an option the command does not know is its own usage error (argparse
    would show the top-level usage instead of the command's)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv=None):
    """Entry point of the ``ncfast`` console script.

    Handlers are called as ``handler(args, console, errors)``: ``console``
    prints results on stdout, ``errors`` messages on stderr. Ctrl-C at any
    point, the imports of the commands included, exits with status 130.
    """
    from ncfast import thread_setting_problem

    command = "ncfast"
    problem = thread_setting_problem()
    if problem is not None:  # Numba would fail in its import, before any command
        print(f"{command}: {problem}", file=sys.stderr)
        return 1
    try:
        args = parse_command_line(argv)
        command = f"ncfast {args.command}"
        return _run_command(args, command)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _run_command(args, command):
    """Call the handler of ``args``; print an error it raises as one line, status 1.

    Errors and warnings are printed as one line of plain text (``one_line``): a path in
    them may hold newlines or terminal escapes.
    """
    from rich.console import Console

    from ncfast.inputs import tell

    console, errors = Console(), Console(stderr=True)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        tell(errors, f"{command}: warning: {message}", style="yellow")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning  # one line, without Python's source lines
            return args.handler(args, console, errors)
    except (ValueError, TypeError, OSError) as error:
        message = str(error)
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        message = (f"not enough memory for the sizes asked for ({str(error).splitlines()[0]}); "
                   "ask for smaller ones")
    tell(errors, f"{command}: {message}", style="red")
    return 1


def _out_of_memory(error):
    """Whether an error is a failed allocation: numpy's MemoryError, or torch's
    ``RuntimeError`` from its CPU allocator (``OutOfMemoryError`` on a GPU)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or \
        "DefaultCPUAllocator: can't allocate memory" in str(error)


if __name__ == "__main__":
    sys.exit(main())
