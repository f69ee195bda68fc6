"""The markdown report of a reproduction: claim, verdicts, grid, tables, figures, runs.

Every report says the command that made it, the comparison rule, what its
grid can and cannot decide, how long it took and on what, and lists every
run with its seed, its folder and the ``ncfast train`` command that
reproduces it alone.
"""
import collections
import datetime
import os
import statistics
from dataclasses import dataclass

from ncfast import __version__
from ncfast.dumps import write_atomically
from ncfast.harness.training import TrainConfig
from ncfast.harness.verdicts import (CONTRADICTED, HELD, RULE, UNDECIDED, combine,
                                     resolution_in_stds)

#: Each verdict as a sentence says it: "the claim held", "... is undecided".
VERDICT_WORDS = {HELD: "held", CONTRADICTED: "did NOT hold", UNDECIDED: "is undecided"}


@dataclass(frozen=True)
class Statement:
    """One statement of a claim and its verdict.

    Attributes
    ----------
    key : str
        Short label, e.g. ``"M2"``.
    text : str
    verdict : {"held", "contradicted", "undecided"}
    evidence : str
        One line: the numbers or tally behind the verdict.
    """

    key: str
    text: str
    verdict: str
    evidence: str


@dataclass
class Reproduction:
    """Outcome of one reproduction.

    Attributes
    ----------
    name : str
    claim : str
    verdict : {"held", "contradicted", "undecided"}
        Of the whole claim.
    statements : list of Statement
    report : str
        Path of ``report.md``.
    tables : dict of str to list of dict
        The report's tables by name, one dict per row.
    """

    name: str
    claim: str
    verdict: str
    statements: list
    report: str
    tables: dict

    @property
    def held(self):
        return self.verdict == HELD


def markdown_table(table):
    """A GitHub markdown table of a list of dicts with the same keys (floats to 4 digits);
    ``"(none)"`` for an empty list."""
    if not table:
        return "(none)"
    headers = list(table[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table:
        cells = [f"{value:.4g}" if isinstance(value, float) else
                 "-" if value is None else str(value) for value in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_command(config, out, *, device="cpu"):
    """The ``ncfast train`` command line that reproduces one run."""
    words = ["ncfast", "train", out]
    for key, value in config.to_dict().items():
        if value == getattr(TrainConfig, key) and key != "epochs":
            continue
        flag = "--" + key.replace("_", "-")
        if key == "bias":
            words.append("--no-bias")
        elif isinstance(value, bool):
            words.append(flag)
        elif value is None:  # only batch_size defaults to a number and may be None
            words += [flag, "0"]
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    if device != "cpu":
        words += ["--device", device]
    return " ".join(words)


def reproduce_command(name, *, grid, seeds, workers, device, out):
    """The ``ncfast reproduce`` command line of a reproduction (None for a custom grid)."""
    if not isinstance(grid, str):
        return None
    return (f"ncfast reproduce {name} --grid {grid} --seeds {seeds} --workers {workers} "
            f"--device {device} --out {out}")


def statement_verdict(statements):
    """The claim's verdict from its statements' (``verdicts.combine``)."""
    return combine(statement.verdict for statement in statements)


def _load(load):
    return ", ".join(f"{value:.2f}" for value in load)


def _runtime_lines(timing, records, measure_seconds):
    seconds = [record.seconds for record in records.values()]
    cpu_seconds = sum(record.cpu_seconds for record in records.values())
    return [
        f"- Wall clock of this command: {timing.seconds + measure_seconds:.0f} s "
        f"({timing.seconds:.0f} s training, {measure_seconds:.0f} s measuring and "
        f"reporting), on {timing.device} with {timing.workers} worker process(es); "
        f"{timing.cpus} CPUs available.",
        f"- Load average (1, 5, 15 min) when it started: {_load(timing.load_before)}; when "
        f"training ended: {_load(timing.load_after)}. A load above the CPU count means other "
        "work shared the CPUs and stretched the wall-clock times here.",
        f"- Runs trained by this command: {timing.trained}; read back finished from an "
        f"earlier command: {timing.reused}.",
        f"- Training time the grid holds (sum over runs of the call that finished each): "
        f"{sum(seconds):.0f} s wall clock (per run median {statistics.median(seconds):.1f} s, "
        f"longest {max(seconds):.1f} s) and {cpu_seconds:.0f} s of CPU time. On "
        f"{timing.workers} idle core(s) the training would take about {cpu_seconds:.0f} / "
        f"{timing.workers} = {cpu_seconds / timing.workers:.0f} s (an estimate from the CPU "
        "time, which sharing the CPUs hardly changes).",
    ]


def _undecided_reason(records, command):
    """Why statements were left undecided, as the grid that ran can say it."""
    per_setting = collections.Counter(record.run.setting for record in records.values())
    fewest = min(per_setting.values(), default=0)
    if fewest < 2:
        return (f"with {fewest} seed{'' if fewest == 1 else 's'} in a setting no two "
                "settings can be compared (the rule needs 2 seeds a side); more seeds "
                "(`--seeds`) may decide them.")
    if all(record.terminal_epoch is None for record in records.values()):
        return (f"none of the {len(records)} runs reached the terminal phase (zero training "
                "error), and comparisons that need it are not counted: longer training, not "
                "more seeds, may decide them.")
    larger = "" if command and "--grid full" in command else " or the full grid (`--grid full`)"
    return ("none of their comparisons was contradicted but not all held: the others are "
            "within two standard errors, or not counted (their evidence says which); more "
            f"seeds{larger} may decide them.")


def write_report(out, *, title, claim, command, verdict, statements, scope, grid_lines,
                 sections, plots, records, run_values, timing, measure_seconds, notes=(),
                 folder=None):
    """Write ``report.md`` of the reproduction in ``out`` atomically into ``folder``; returns
    its path in ``out``.

    Parameters
    ----------
    out : str
        The reproduction's folder: its links lead from there.
    title, claim : str
    command : str or None
        The ``ncfast reproduce`` command that made it (None: a grid built in Python).
    verdict : str
        Of the whole claim, as one markdown sentence.
    statements : list of Statement
    scope : str
        What this grid can and cannot decide, before seeing any result; ``{seeds}`` in it
        becomes the number of seeds run, ``{resolution}`` the least difference the rule
        counts with them, in standard deviations (``verdicts.resolution_in_stds``).
    grid_lines : list of str
        Markdown bullet points describing the grid.
    sections : list of (str, str)
        Heading and markdown body of each results section.
    plots : sequence of str
        PNG files in ``out`` (missing ones are skipped).
    records : dict of str to RunRecord
    run_values : dict of str to dict
        Run name to the values of that run the verdicts read (columns of the
        runs table).
    timing : GridTiming
    measure_seconds : float
    notes : sequence of str
    folder : str, optional
        Where the report (and ``plots``) are written: ``out`` by default, or a folder whose
        files move into ``out`` (``ncfast.harness.grid.published``).
    """
    folder = out if folder is None else folder
    undecided = [statement.key for statement in statements if statement.verdict == UNDECIDED]
    seeds = sorted({record.run.seed for record in records.values()})
    lines = [f"# {title}", "", f"**Claim.** {claim}", "",
             f"**Made by** `{command}`" if command else "**Made by** a grid built in Python",
             f"(ncfast {__version__}, {datetime.date.today().isoformat()}); seeds "
             f"{', '.join(map(str, seeds))}.", "", "## Verdicts", "",
             markdown_table([{"": statement.key, "statement": statement.text,
                              "verdict": f"**{statement.verdict}**",
                              "evidence": statement.evidence} for statement in statements]),
             "", f"**Verdict: {verdict}**", "",
             "**What this grid can and cannot decide.** "
             + scope.format(seeds=len(seeds), resolution=resolution_in_stds(len(seeds)))]
    if undecided:
        lines[-1] += f" In this run it could not decide {', '.join(undecided)}: " + \
            _undecided_reason(records, command)
    lines += ["", "## Grid", "", *grid_lines, "", f"**Comparison rule.** {RULE}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body, ""]
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    shown = [plot for plot in plots if os.path.exists(os.path.join(folder, plot))]
    if shown:
        lines += ["## Figures", "", *[f"![{plot}]({plot})\n" for plot in shown]]
    lines += ["## Runtime", "", *_runtime_lines(timing, records, measure_seconds), "",
              "## Runs", "",
              "Each run's folder (features at every checkpoint, `manifest.json`, "
              "`result.json`) is under `runs/`; `metrics.json` and `metrics.csv` hold every "
              "measured checkpoint.", "",
              markdown_table([{
                  "run": f"[{name}]({os.path.relpath(record.path, out)})",
                  "seed": record.run.seed,
                  "terminal epoch": record.terminal_epoch,
                  "train acc": record.train_accuracy, "test acc": record.test_accuracy,
                  **run_values[name], "seconds": round(record.seconds, 1),
                  "CPU seconds": round(record.cpu_seconds, 1), "device": record.device}
                  for name, record in records.items()]),
              "", "<details><summary>The <code>ncfast train</code> command of each run"
              "</summary>", "", "```bash",
              *[train_command(record.run.config, os.path.relpath(record.path, out),
                              device=record.device) for record in records.values()],
              "```", "", "</details>"]
    text = "\n".join(lines) + "\n"
    write_atomically(os.path.join(folder, "report.md"), lambda stream: stream.write(text.encode()))
    return os.path.join(out, "report.md")
