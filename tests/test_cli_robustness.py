"""The command line against hostile input: --out folders that cannot be created, run
manifests that point outside their run folder, Ctrl-C before a command has started.

Each is refused (or reported) up front, with a one-line message and the documented
exit status, before anything is measured or written.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cases import gaussian_classes
from ncfast import ClassSums
from ncfast.cli import main
from ncfast.dumps import MANIFEST, RunWriter
from ncfast.states import save_state

CLASSES = 3
FEATURES = 4


def _write_run(path):
    """A run folder of one checkpoint, one split, one layer and a classifier."""
    case = gaussian_classes(60, FEATURES, CLASSES, seed=1)
    RunWriter(path, config={}, num_classes=CLASSES).write_checkpoint(
        1, {"train": {"features": {"penultimate": case["features"]}, "labels": case["labels"]}},
        weights=case["weights"], bias=case["bias"])
    return path


def _caches(folder):
    return [name for _, _, names in os.walk(folder) for name in names if "cache" in name]


@pytest.mark.parametrize("out", ["", "dangling", "dangling/results"])
def test_analyze_refuses_an_out_it_cannot_create_before_measuring(tmp_path, monkeypatch, capsys,
                                                                  out):
    monkeypatch.chdir(tmp_path)
    run = _write_run(tmp_path / "run")
    os.symlink(tmp_path / "nonexistent", "dangling")
    assert main(["analyze", str(run), "--out", out, "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.startswith("ncfast analyze: ") and "--out folder" in printed.err
    assert _caches(run) == []  # nothing was measured (measuring writes the cache)


@pytest.mark.parametrize("out", ["", "dangling"])
def test_merge_refuses_an_out_it_cannot_create(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "nonexistent", "dangling")
    case = gaussian_classes(60, FEATURES, CLASSES, seed=1)
    save_state("pass1.safetensors",
               ClassSums(CLASSES, FEATURES).update(case["features"], case["labels"]))
    assert main(["merge", "pass1.safetensors", "--out", out]) == 1
    printed = capsys.readouterr().err
    assert printed.startswith("ncfast merge: ") and "--out folder" in printed
    assert sorted(os.listdir(tmp_path)) == ["dangling", "pass1.safetensors"]


def test_a_folder_where_a_command_writes_is_one_line_on_stderr_and_status_1(tmp_path, capsys):
    """``merge`` writing its state where a folder of that name is: an IsADirectoryError that
    named a hidden temporary file, now the path and the fix."""
    case = gaussian_classes(60, FEATURES, CLASSES, seed=1)
    save_state(tmp_path / "pass1-0.safetensors",
               ClassSums(CLASSES, FEATURES).update(case["features"], case["labels"]))
    (tmp_path / "merged" / "pass1.safetensors").mkdir(parents=True)
    assert main(["merge", str(tmp_path / "pass1-0.safetensors"),
                 "--out", str(tmp_path / "merged")]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1
    assert printed.err.startswith(f"ncfast merge: cannot write "
                                  f"'{tmp_path / 'merged' / 'pass1.safetensors'}': it is a "
                                  "folder, not a file")


def test_square_brackets_in_an_error_are_printed_as_they_are(tmp_path, capsys):
    """Rich markup in a file name (``[b]``) is text: unescaped, it vanished and turned bold."""
    path = tmp_path / "state[b]x.safetensors"
    path.write_bytes(b"junk")
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"ncfast merge: {path}: a text file starting 'junk'")


@pytest.mark.parametrize("path", ["../victim", "VICTIM"])
def test_analyze_writes_nothing_where_a_manifest_points_outside_its_run(tmp_path, capsys, path):
    run = _write_run(tmp_path / "run")
    victim = tmp_path / "victim"
    victim.mkdir()
    path = path.replace("VICTIM", str(victim))  # an absolute path
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["checkpoints"][0]["path"] = path
    (run / MANIFEST).write_text(json.dumps(manifest))
    assert main(["analyze", str(run), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert f"manifest.json: checkpoints[0].path is {path!r}" in capsys.readouterr().err
    assert os.listdir(victim) == []
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_commands_are_imported_exits_130(monkeypatch, capsys):
    def interrupted(commands):
        raise KeyboardInterrupt

    monkeypatch.setattr("ncfast.harness.commands.add_commands", interrupted)
    try:
        status = main(["analyze", "run", "--out", "out"])
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt while building the parser escaped main()")
    assert status == 130
    assert capsys.readouterr().err == "ncfast: interrupted\n"


def test_the_command_line_loads_without_numpy_or_numba():
    """``import ncfast`` loads its names on first use, so the console script reaches its
    Ctrl-C handling (and ``--help``) before the seconds numpy, Numba and the kernels take."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ncfast.cli; print(sorted(m for m in sys.modules "
                               "if m.split('.')[0] in ('numpy', 'numba', 'torch', 'scipy')))"],
        capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_thread_count_numba_cannot_use_is_one_line(capsys, monkeypatch):
    """NUMBA_NUM_THREADS=0 failed with Numba's traceback in its import, even for --help."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "0")
    assert main(["analyze", "--help"]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1
    assert printed.err.startswith("ncfast: NUMBA_NUM_THREADS='0': ")


@pytest.mark.parametrize("sizes", [["--dataset", "gaussian", "--num-features", "1000000000"],
                                   ["--width", "1000000000"]], ids=["numpy", "torch"])
def test_sizes_beyond_memory_are_one_line(tmp_path, capsys, sizes):
    """numpy's MemoryError and torch's allocator error printed tracebacks."""
    assert main(["train", *sizes, "--epochs", "1", "--no-progress", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("ncfast train: not enough memory for the sizes asked for (")
    assert error.count("\n") == 1 and "Traceback" not in error


@pytest.mark.parametrize("words, command", [
    (["merge", "state.safetensors", "--bogus"], "merge"),
    (["analyze", "run", "-v"], "analyze"),
    (["train", "out", "--bogus", "3"], "train"),
])
def test_an_option_the_command_does_not_know_shows_the_commands_usage(capsys, words, command):
    """argparse printed the top-level usage (``ncfast [-h] {train,...}``) instead."""
    with pytest.raises(SystemExit) as stop:
        main(words)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"usage: ncfast {command} ")
    assert f"ncfast {command}: error: unrecognized arguments: {' '.join(words[2:])}" in error


def test_version():
    from ncfast import __version__

    done = subprocess.run([sys.executable, "-m", "ncfast", "--version"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"ncfast {__version__}"


def _write_npz(path, seed=1):
    case = gaussian_classes(60, FEATURES, CLASSES, seed=seed)
    np.savez(path, features=case["features"], labels=case["labels"])
    return path


@pytest.mark.parametrize("stdout", ["closed pipe", "/dev/full"])
@pytest.mark.parametrize("format", ["table", "json"])
def test_a_stdout_that_refuses_the_results_loses_no_file(tmp_path, stdout, format):
    """The results were printed before --out was written: ``| head`` (a closed pipe) or a
    full disk stopped the run, and no file was written."""
    if stdout == "/dev/full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    paths = [str(_write_npz(tmp_path / f"a_epoch{epoch}.npz", epoch)) for epoch in (1, 2)]
    out = tmp_path / "out"
    if stdout == "/dev/full":
        sink = open("/dev/full", "w")
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)  # nobody reads: the first write meets a broken pipe
        sink = os.fdopen(write_end, "w")
    with sink:
        done = subprocess.run([sys.executable, "-m", "ncfast", "analyze", *paths, "--out",
                               str(out), "--no-progress", "--no-plots", "--format", format],
                              stdout=sink, stderr=subprocess.PIPE, text=True)
    wrote = f"ncfast analyze: wrote 2 files to {out}\n"
    if stdout == "closed pipe":  # the reader took what it wanted: no error
        assert (done.returncode, done.stderr) == (0, wrote)
    else:
        assert (done.returncode, done.stderr) == (1, (
            "ncfast analyze: cannot print the results on stdout (No space left on device); "
            f"they are written to {out}\n{wrote}"))
    assert len(json.loads((out / "metrics.json").read_text())["rows"]) == 2


def test_paths_with_newlines_or_terminal_escapes_are_printed_on_one_line(tmp_path, capsys):
    """A path was printed as it is: a newline broke the one-line error (and the "wrote" line),
    and an escape sequence reached the terminal."""
    name = tmp_path / "red\x1b[31m two\nlines_epoch1.npz"
    _write_npz(name)
    out = tmp_path / "out\nfolder"
    assert main(["analyze", str(name), "--out", str(out)]) == 0
    bad = tmp_path / "bad\nfile.npz"
    bad.write_bytes(b"junk")
    assert main(["analyze", str(bad), str(name), "--out", str(out), "--no-plots"]) == 1
    assert main(["analyze", str(tmp_path / "no\nsuch.npz")]) == 1
    assert main(["merge", str(tmp_path / "no\nsuch.safetensors")]) == 1
    error = capsys.readouterr().err
    assert "\x1b" not in error
    lines = error.splitlines()
    assert all(line.startswith(("ncfast analyze: ", "ncfast merge: ")) for line in lines), lines
    assert f"ncfast analyze: wrote 3 files to {tmp_path}/out folder" in lines
    assert any(line.startswith(f"ncfast analyze: FAILED {tmp_path}/bad file.npz")
               for line in lines)
    assert any(f"{tmp_path}/no such.npz: no such file or folder" in line for line in lines)


TINY_TRAIN = ["--dataset", "gaussian", "--num-samples", "200", "--epochs", "2", "--no-progress"]


def test_train_prints_a_path_with_brackets_as_it_is(tmp_path, capsys):
    """Rich read ``[red]`` in the run folder as markup: the path printed was another (and
    ``[/]`` ended the command with a MarkupError after the training)."""
    for name in ("mk[red]x", "mk[/]y"):
        path = tmp_path / name
        assert main(["train", *TINY_TRAIN, str(path)]) == 0
        printed = capsys.readouterr()
        assert printed.out.startswith(f"run folder {path}: checkpoints at epochs [1, 2];")
        assert printed.err == f"ncfast train: measure it with: ncfast analyze {path}\n"


def test_train_into_a_closed_pipe_ends_quietly(tmp_path):
    """Rich exits with status 1, silently, when stdout's reader has gone (``| head -c 0``)."""
    done = subprocess.run(
        f"set -o pipefail; {sys.executable} -m ncfast train {' '.join(TINY_TRAIN)} "
        f"{tmp_path / 'run'} | head -c 0", shell=True, capture_output=True, text=True,
        timeout=300, executable="/bin/bash")
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("ncfast train: measure it with: ")
