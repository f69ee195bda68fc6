"""Measure every checkpoint × split × layer of saved feature dumps.

``analyze`` takes run folders (``ncfast.dumps``) and single files
(``ncfast.readers``), streams each feature array through ``ncfast.collapse``
in row blocks, and returns one row of metrics per (checkpoint, split, layer):

- the ``train`` split of a checkpoint is measured against its own class means
  (and, when it has clean labels, with the label-noise metrics); every other
  split (``test``, ...) against the train means of the same checkpoint and
  layer (NCC generalisation); a checkpoint without a train split measures
  each split against its own means;
- the classifier (``weights``, ``bias``) is applied to the layer it reads.

A checkpoint that cannot be read or measured is reported in
``Analysis.failures`` with a one-line reason naming the file; the others are
still measured.

**Cache.** The rows of each (checkpoint, layer) are cached in a JSON file next
to the checkpoint (``ncfast-cache.json`` in a run's checkpoint folder,
``FILE.ncfast-cache.json`` beside a single file), keyed by the SHA-256 of
every input file's content and the analysis settings, so re-running on a
growing run measures only new checkpoints. A file's digest is computed once
and remembered in its cache with the file's size, modification time and
status-change time (``st_ctime``, which every write, replacement, rename into
place or ``cp -p`` sets to the present): a file whose three differ is hashed
again. A digest the run manifest recorded is trusted for a file not yet
remembered whose size and status-change time are those the manifest recorded
when the run wrote it. A cache is used only when it is exactly
what ncfast wrote (its recorded digest of its content matches); any other cache
(edited, corrupt, of another cache version) is treated as missing and rewritten.
"""
import csv
import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.filesize import decimal as decimal_size
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                           ProgressColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn)

from ncfast import __version__
from ncfast.api import collapse
from ncfast.dumps import (UnwritablePathError, check_output_folder, ctrl_c_held,
                          move_staged_files, open_run, staging_folder, write_json_atomically,
                          write_text_atomically)
from ncfast.engine import resolve_num_classes
from ncfast.errors import CLEAN_LABEL, LABEL
from ncfast.geometry import PINV_RTOL, Geometry
from ncfast.inputs import (LabelSummary, check_chunk_size, file_problem, one_line,
                           plain_markup, tell, to_kernel_labels)
from ncfast.kernels.cpu import largest_label, mark_labels
from ncfast.progress import NO_PROGRESS, StageProgress
from ncfast.readers import CheckpointArrays, file_layout, file_sha256, read_file
from ncfast.report import DRAWN_CLASSES, METRICS

#: Bumped when the cache's layout, the rows' form or what a metric's value is changes (3: the
#: "features" route's NC1 from exact eigen-coordinates, no longer a float32 scatter; 4: the
#: cache records its own digest, and file stamps the status-change time; 5: cosine histograms
#: over the range the cosines span, no longer over [-1, 1]; 6: rows carry nc2_etf_w); a cache
#: of another version is not used. Cached rows are also keyed by the ncfast version.
CACHE_VERSION = 6
CACHE_NAME = "ncfast-cache.json"

#: Bins of a cosine histogram (at most; of equal width over the range the cosines span).
COSINE_BINS = 40

#: Even bins over [-1, 1] the cosines are first counted in (width 3e-5): the range of a
#: histogram is known to this width.
COSINE_FINE_BINS = 1 << 16

#: Class means per tile of the cosine histogram (memory: tile × C' float64).
COSINE_TILE = 512

#: Row keys kept in the cache and in memory but not in ``metrics.json`` (large).
UNWRITTEN_KEYS = ("cosine_matrix",)

#: Columns of every result row before the metrics.
ROW_KEYS = ("source", "epoch", "split", "layer", "measured_against", "num_samples",
            "num_classes", "num_features")

ANCHOR_SPLIT = "train"


@dataclass
class Checkpoint:
    """One checkpoint to measure.

    Attributes
    ----------
    path : str
        The run folder or file it is read from.
    source : str
        The run it belongs to (its rows' ``source``): ``path``, or for a file of a series
        (``discover``) the series' name.
    arrays : CheckpointArrays
    cache_path : str
        JSON file where its results are cached.
    """

    path: str
    source: str
    arrays: CheckpointArrays
    cache_path: str

    @property
    def epoch(self):
        return self.arrays.epoch

    @property
    def name(self):
        return self.path if self.epoch is None else f"{self.path} epoch {self.epoch}"


@dataclass
class Failure:
    """A checkpoint (or input path) that could not be measured, and why."""

    name: str
    reason: str


@dataclass
class Analysis:
    """Result of ``analyze``.

    Attributes
    ----------
    rows : list of dict
        One per (checkpoint, split, layer): ``ROW_KEYS`` then every field of
        ``CollapseReport.to_dict`` (scalar metrics, per-class lists).
    failures : list of Failure
    measured, cached : int
        (checkpoint, layer) groups measured now, and taken from the cache.
    """

    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    measured: int = 0
    cached: int = 0


def _last_number(path):
    """The last run of digits in a file's name before its extension (a ``re.Match`` in the
    name), or None."""
    name = os.path.basename(path)
    numbers = list(re.finditer(r"\d+", os.path.splitext(name)[0]))
    return numbers[-1] if numbers else None


def epoch_from_name(path):
    """The last integer in a file's name (``feats_epoch12.npz`` -> 12), or None."""
    number = _last_number(path)
    return None if number is None else int(number.group())


def _series_sources(paths):
    """The run of each file of a series: files in one folder whose names differ only in the
    epoch (``run_epoch1.npz``, ``run_epoch2.npz``), named after them with the epoch taken
    out (``run_epoch.npz``).

    A name shared by one file, by files of the same epoch (``a01.npz``, ``a1.npz``) or by a
    path given itself makes no series.

    Parameters
    ----------
    paths : sequence of str

    Returns
    -------
    dict of str to str
        File path -> series name, for the files of a series.
    """
    series = {}
    for path in paths:
        number = _last_number(path)
        if number is None or os.path.isdir(path):
            continue
        folder, name = os.path.split(path)
        unnumbered = name[:number.start()] + name[number.end():]
        key = os.path.join(os.path.realpath(folder or "."), unnumbered)
        series.setdefault(key, []).append((path, os.path.join(folder, unnumbered)))
    given = {os.path.realpath(path) for path in paths}
    sources = {}
    for key, files in series.items():
        epochs = {epoch_from_name(path) for path, _ in files}
        if len(files) > 1 and len(epochs) == len(files) and key not in given:
            sources.update((path, files[0][1]) for path, _ in files)
    return sources


def _single_array(path, what):
    arrays = read_file(path)
    if len(arrays) != 1:
        raise ValueError(f"{path}: holds {len(arrays)} arrays; --{what} needs a file with one "
                         "array")
    return next(iter(arrays.values()))


def discover(paths, *, labels=None, clean_labels=None, weights=None, bias=None):
    """Find the checkpoints behind each path.

    Parameters
    ----------
    paths : sequence of str or PathLike
        Run folders and single files (one checkpoint each; its epoch is the
        last number in the file name). Files in one folder whose names differ
        only in that number (``run_epoch1.npz``, ``run_epoch2.npz``) are the
        checkpoints of one run (``_series_sources``), named after them with the
        number taken out (``run_epoch.npz``); each keeps its own cache.
    labels, clean_labels, weights, bias : str or PathLike, optional
        Files of one array each, for single files holding only features (a
        ``.npy``, a bare torch tensor).

    Returns
    -------
    checkpoints : list of Checkpoint
    failures : list of Failure
        Paths that could not be opened.
    """
    extras = {"labels": labels, "clean_labels": clean_labels, "weights": weights, "bias": bias}
    paths = list(map(os.fspath, paths))
    series = _series_sources(paths)
    checkpoints, failures = [], []
    for path in paths:
        try:
            if os.path.isdir(path):
                run = open_run(path)  # first: a folder that is not a run is named as such
                given = [name for name, value in extras.items() if value is not None]
                if given:
                    raise ValueError(f"{path}: a run folder has its own labels and classifier; "
                                     f"--{given[0].replace('_', '-')} applies to feature files")
                checkpoints.extend(
                    Checkpoint(path, _source_name(path), arrays,
                               os.path.join(run.folders[arrays.epoch], CACHE_NAME))
                    for arrays in run.checkpoints)
                continue
            arrays = file_layout(path)
            arrays.epoch = epoch_from_name(path)
            _attach_extras(path, arrays, {key: value for key, value in extras.items()
                                          if value is not None})
            checkpoints.append(Checkpoint(path, _source_name(series.get(path, path)), arrays,
                                          f"{path}.{CACHE_NAME}"))
        except (ValueError, TypeError, OSError) as error:
            failures.append(Failure(_source_name(path), one_line(error)))
    return checkpoints, failures


def _source_name(path):
    """A path as results and failures name it: bytes of the name that are not UTF-8 (which Python
    keeps as lone surrogates, and no file or terminal encoding takes) as ``\\xNN`` escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _attach_extras(path, arrays, extras):
    """Give a single-file checkpoint the labels and classifier passed separately; refused
    where the file holds that array already, or (labels) several splits of rows."""
    for what, extra_path in extras.items():
        option = "--" + what.replace("_", "-")
        holders = [arrays] if what in ("weights", "bias") else list(arrays.splits.values())
        if any(getattr(holder, what) is not None for holder in holders):
            raise ValueError(f"{path}: holds its own {what.replace('_', ' ')}; {option} applies "
                             "to files that lack them (leave it out, or drop the array from "
                             "the file)")
        if len(holders) > 1:
            raise ValueError(f"{path}: holds the splits {sorted(arrays.splits)}; {option} gives "
                             "one array for the rows of a single split")
        array = _single_array(os.fspath(extra_path), option[2:])
        for holder in holders:
            setattr(holder, what, array)
    if arrays.weights is not None and arrays.classifier_layer is None:
        layers = {layer for split in arrays.splits.values() for layer in split.features}
        if len(layers) != 1:
            raise ValueError(f"{path}: has layers {sorted(layers)}; --weights applies to a "
                             "file with one layer")
        arrays.classifier_layer = layers.pop()


class _Digests:
    """SHA-256 of input files, each computed at most once and remembered with its stamp.

    A file's stamp is its size, modification and status-change times: any write,
    replacement or ``cp -p`` over it sets the status-change time to the present,
    which ``utime`` cannot set back, so a remembered digest is reused only while
    its stamp holds. A file not remembered yet takes the digest the run manifest recorded
    when its size and status-change time are those recorded when it was written; else it
    is hashed, and a run-folder file whose digest is not the recorded one is an error
    (changed or corrupted since the checkpoint was written).
    """

    def __init__(self, on_hashing):
        self.on_hashing = on_hashing
        self.known = {}

    def __call__(self, array, checkpoint, remembered):
        """The digest of ``array``'s file, remembered in ``remembered`` (a cache's digests)."""
        path = array.path
        if path in self.known:
            return self.known[path]
        status = os.stat(path)
        stamp = [status.st_size, status.st_mtime_ns, status.st_ctime_ns]
        name = os.path.relpath(path, os.path.dirname(os.path.abspath(checkpoint.cache_path)))
        entry = remembered.get(name)
        if entry is not None and entry["stamp"] == stamp:
            digest = entry["sha256"]
        elif entry is None and array.recorded_sha256 is not None \
                and status.st_size == getattr(array, "recorded_bytes", None) \
                and status.st_ctime_ns == getattr(array, "recorded_changed_ns", None):
            digest = array.recorded_sha256
        else:
            self.on_hashing(path)
            digest = file_sha256(path)
            if array.recorded_sha256 is not None and digest != array.recorded_sha256:
                raise ValueError(
                    f"{path}: its content does not match the SHA-256 the run manifest recorded "
                    "when the checkpoint was written (the file was changed or corrupted since); "
                    "restore it, or write the checkpoint again")
        remembered[name] = {"stamp": stamp, "sha256": digest}
        self.known[path] = digest
        return digest


class _RowBlocks:
    """Re-iterable ``(features, labels[, clean_labels])`` row blocks of stored arrays.

    ``ncfast.collapse`` reads it once per pass; ``on_bytes`` hears the bytes of
    every feature block read.
    """

    def __init__(self, features, labels, clean_labels, chunk_size, on_bytes):
        self.features, self.labels, self.clean_labels = features, labels, clean_labels
        self.chunk_size, self.on_bytes = chunk_size, on_bytes

    def __iter__(self):
        for start in range(0, self.features.num_rows, self.chunk_size):
            stop = min(start + self.chunk_size, self.features.num_rows)
            block = self.features.rows(start, stop)
            self.on_bytes(block.nbytes)
            labels = self.labels.rows(start, stop)
            if self.clean_labels is None:
                yield block, labels
            else:
                yield block, labels, self.clean_labels.rows(start, stop)


def _check_arrays(checkpoint, layers):
    """Check shapes and dtypes of everything a checkpoint's analysis reads.

    Returns
    -------
    dict
        Layer -> list of splits that have it (in the checkpoint's order).
    """
    arrays = checkpoint.arrays
    by_layer = {}
    for split, split_arrays in arrays.splits.items():
        if not split_arrays.features:
            raise ValueError(f"{checkpoint.name}: split {split!r} has labels but no features; "
                             f"store them as '{split}/features[/LAYER]'")
        if split_arrays.labels is None:
            raise ValueError(f"{checkpoint.path}: split {split!r} has no labels; pass "
                             "--labels FILE or store a 'labels' array with the features")
        for array in (split_arrays.labels, split_arrays.clean_labels):
            if array is None:
                continue
            array.check()
            if len(array.shape) != 1 or not array.is_integer:
                raise TypeError(f"{array.name}: labels must be a 1-D integer array; found "
                                f"{array.dtype} of shape {array.shape}: save class indices "
                                "(e.g. labels.astype(np.int64))")
        for layer, features in split_arrays.features.items():
            if layers is not None and layer not in layers:
                continue
            features.check()
            if len(features.shape) != 2:
                raise ValueError(f"{features.name}: features must be 2-D (n_samples, "
                                 f"n_features); found shape {features.shape}: flatten with "
                                 "reshape(len(features), -1)")
            if not features.is_float:
                raise TypeError(f"{features.name}: features must be floating point; found "
                                f"{features.dtype}: save them with .astype(np.float32)")
            for labels in (split_arrays.labels, split_arrays.clean_labels):
                if labels is not None and labels.shape[0] != features.shape[0]:
                    raise ValueError(f"{labels.name}: has {labels.shape[0]} labels but "
                                     f"{features.name} has {features.shape[0]} rows; pass one "
                                     "label per feature row")
            by_layer.setdefault(layer, []).append(split)
    for array, expected in ((arrays.weights, 2), (arrays.bias, 1)):
        if array is None:
            continue
        array.check()
        if len(array.shape) != expected or not array.is_float:
            raise TypeError(f"{array.name}: the classifier must be float, {expected}-D; found "
                            f"{array.dtype} of shape {array.shape}")
    if arrays.bias is not None and arrays.weights is None:
        raise ValueError(f"{arrays.bias.name}: a classifier bias without weights; store the "
                         "'weights' (C, D) beside it (with --bias, pass --weights FILE too)")
    if not by_layer:
        found = sorted({layer for split in arrays.splits.values() for layer in split.features})
        raise ValueError(f"{checkpoint.path}: none of the layers {sorted(layers)} is here "
                         f"(found {found}); check --layers")
    return by_layer


#: Labels read per block while C is inferred (32 MiB of int64).
LABEL_BLOCK_ROWS = 1 << 22


class _CheckpointLabels:
    """The labels and clean labels of every split of a checkpoint, read once: the label source
    from which ``ncfast.engine.resolve_num_classes`` infers C (as ``ncfast.collapse`` does).

    The classes with rows are flagged in an array of C = largest label + 1 flags when C is at
    most twice the rows; a larger C leaves most classes empty whatever the labels, and the
    distinct labels are then gathered (to say how many there are) instead.

    Attributes
    ----------
    summary : LabelSummary
        Its row counts within ``largest``.
    largest : StoredArray or None
        The array holding the largest label; None when no label is at least 0.
    """

    def __init__(self, arrays):
        self.arrays = [(array, what, kind) for split in arrays.splits.values()
                       for array, what, kind in ((split.labels, "labels", LABEL),
                                                 (split.clean_labels, "clean_labels", CLEAN_LABEL))
                       if array is not None]
        max_label, max_row, max_kind, self.largest, num_rows = -1, 0, LABEL, None, 0
        for array, kind, start, block in self._blocks():
            block_max, block_row = largest_label(block)
            if block_max > max_label:
                max_label, max_row, max_kind = block_max, start + block_row, kind
                self.largest = array
            num_rows += block.size
        if max_label + 1 <= 2 * num_rows:
            seen = np.zeros(max_label + 1, bool)
            for *_, block in self._blocks():
                mark_labels(block, seen)
            labelled = int(seen.sum())
        else:
            distinct = np.zeros(0, np.int64)
            for *_, block in self._blocks():
                distinct = np.union1d(distinct, block[block >= 0])
            labelled = distinct.size
        self.summary = LabelSummary(int(max_label), int(max_row), max_kind, labelled)

    def _blocks(self):
        """``(array, kind, start, int64 labels of rows start...)`` of every array, in blocks."""
        for array, what, kind in self.arrays:
            for start in range(0, array.num_rows, LABEL_BLOCK_ROWS):
                rows = array.rows(start, start + LABEL_BLOCK_ROWS)
                try:
                    block = to_kernel_labels(rows, what, start)
                except ValueError as error:  # a uint64 label beyond any int64
                    raise ValueError(f"{array.name}: {error}") from None
                yield array, kind, start, block

    def label_summary(self):
        """``summary`` (what ``resolve_num_classes`` asks a label source for)."""
        return self.summary


def _num_classes(checkpoint):
    """C from the run manifest, else the classifier's rows, else inferred from the labels and
    clean labels of every split as ``ncfast.collapse`` infers it.

    A largest label beyond the classifier's rows that would leave most of the classes it
    implies empty (a stray label) is refused as ``ncfast.collapse`` refuses it, naming the
    array that holds it.
    """
    arrays = checkpoint.arrays
    if arrays.num_classes is not None:
        return arrays.num_classes
    labels = _CheckpointLabels(arrays)
    classifier_rows = 0 if arrays.weights is None else arrays.weights.shape[0]
    if labels.largest is None or labels.summary.max_label < classifier_rows:
        return classifier_rows  # without labels at least 0, measuring says what is wrong
    try:
        return resolve_num_classes(None, labels, None, accept_empty=None)
    except ValueError as error:
        raise ValueError(f"{labels.largest.name}: {error}") from None


def _cache_digest(cache):
    """SHA-256 of a cache's results and digests, and of ``CACHE_VERSION``."""
    content = [CACHE_VERSION, cache["results"], cache["digests"]]
    return hashlib.sha256(json.dumps(content, sort_keys=True, allow_nan=False).encode()
                          ).hexdigest()


def _load_cache(path):
    """The cache at ``path``: ``{"results": {key: rows}, "digests": {file: entry}}``.

    A cache file is valid when it is what ``_save_cache`` wrote: ``results``,
    ``digests`` and ``sha256``, the digest of the other two. Anything else (no
    file, not JSON, nested too deep to parse, edited, corrupt, another cache
    version, not a regular file: a named pipe would block ``open``) gives an empty cache,
    which measuring then rewrites.
    """
    try:
        if file_problem(path) is not None:
            return {"results": {}, "digests": {}}
        with open(path, encoding="utf-8") as stream:
            cache = json.load(stream)
        if isinstance(cache, dict) and set(cache) == {"results", "digests", "sha256"} \
                and cache["sha256"] == _cache_digest(cache):
            return {"results": cache["results"], "digests": cache["digests"]}
    except (OSError, ValueError, RecursionError):
        pass
    return {"results": {}, "digests": {}}


def _save_cache(path, cache, errors):
    """Write a cache (see ``_load_cache``) atomically; warn when it cannot be written, once
    per reason in ``errors`` (a set, updated), not once per checkpoint."""
    try:
        write_json_atomically(path, {**cache, "sha256": _cache_digest(cache)})
    except (OSError, UnwritablePathError) as error:
        reason = error.reason if isinstance(error, UnwritablePathError) else (
            error.strerror or str(error))
        if reason not in errors:
            errors.add(reason)
            warnings.warn(f"cannot write analysis caches beside the checkpoints ({reason}, "
                          f"first {path}); results are not cached", stacklevel=2)


def _measure_layer(checkpoint, layer, splits, num_classes, *, chunk_size, global_mean,
                   pinv_rtol, on_bytes, stages):
    """Rows of one (checkpoint, layer): the anchor split first, others against its means."""
    arrays = checkpoint.arrays
    classifier = {}
    if arrays.weights is not None and layer == arrays.classifier_layer:
        classifier["weights"] = arrays.weights.read()
        classifier["bias"] = None if arrays.bias is None else arrays.bias.read()
    order = sorted(splits, key=lambda split: split != ANCHOR_SPLIT)
    anchor = None
    rows = []
    for split in order:
        split_arrays = arrays.splits[split]
        features = split_arrays.features[layer]
        clean = split_arrays.clean_labels if split == ANCHOR_SPLIT else None
        if features.num_rows == 0:
            if anchor is None:
                raise ValueError(f"{features.name}: holds no rows; save the features of at "
                                 "least one row per class")
            # A split without rows (an empty test set) leaves the others measured.
            warnings.warn(f"{features.name}: holds no rows; the {split} split is left out",
                          stacklevel=2)
            continue
        blocks = _RowBlocks(features, split_arrays.labels, clean,
                            check_chunk_size(chunk_size, features.shape[1]), on_bytes)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = collapse(blocks, num_classes=num_classes, means=anchor,
                                  global_mean=global_mean, pinv_rtol=pinv_rtol,
                                  progress=stages, **classifier)
        except (ValueError, TypeError) as error:
            named = str(error).startswith(features.name)  # the reader's errors name it
            raise ValueError(str(error) if named else f"{features.name}: {error}") from None
        finally:
            for array in (features, split_arrays.labels, clean):
                if array is not None:
                    array.close()
        for warning in caught:  # say which features they are about
            warnings.warn(f"{features.name}: {warning.message}", warning.category,
                          stacklevel=2)
        if split == ANCHOR_SPLIT:
            anchor = report
        row = {"source": checkpoint.source, "epoch": checkpoint.epoch, "split": split,
               "layer": layer, "measured_against": ANCHOR_SPLIT if anchor is not None else split,
               **report.to_dict(), **class_mean_cosines(report)}
        rows.append(row)
    return rows


def cosine_histogram(cosines):
    """Counts of cosines in ``COSINE_FINE_BINS`` even bins over [-1, 1].

    Returns
    -------
    int64 array of shape (COSINE_FINE_BINS,)
    """
    bins = np.clip(((np.asarray(cosines) + 1.0) * (COSINE_FINE_BINS / 2.0)).astype(np.int64),
                   0, COSINE_FINE_BINS - 1)
    return np.bincount(bins.ravel(), minlength=COSINE_FINE_BINS)


def _over_their_range(fine_counts):
    """The counts of ``cosine_histogram`` merged into at most ``COSINE_BINS`` bins of equal
    width, from the first fine bin holding a cosine to the last (at collapse the cosines
    fill a narrow range around the simplex ETF's value that fixed bins would lump together).

    Returns
    -------
    counts : int64 array of shape (B,), B <= COSINE_BINS
    edges : float64 array of shape (B + 1,)
    """
    filled = np.flatnonzero(fine_counts)
    first, span = filled[0], filled[-1] + 1 - filled[0]
    merged = -(-span // COSINE_BINS)  # fine bins per bin
    num_bins = -(-span // merged)
    padded = np.zeros(num_bins * merged, np.int64)
    padded[:span] = fine_counts[first:first + span]
    edges = -1.0 + (first + merged * np.arange(num_bins + 1)) * (2.0 / COSINE_FINE_BINS)
    return padded.reshape(num_bins, merged).sum(axis=1), np.minimum(edges, 1.0)


def class_mean_cosines(report):
    """Cosines between the centred class means of a report, for snapshot figures.

    Parameters
    ----------
    report : CollapseReport

    Returns
    -------
    dict
        ``{"cosine_matrix": C'×C' nested lists (4 decimals)}`` over the present
        classes when C' <= ``DRAWN_CLASSES``, else ``{"cosine_histogram":
        {"edges": [...], "counts": [...]}}`` over the C'(C'-1)/2 pairs
        (``_over_their_range``; tiles of ``COSINE_TILE`` means, never a C'×C' matrix).
    """
    geometry = Geometry.from_means(report.means, report.mean_counts,
                                   global_mean=report.global_mean)
    norms = np.sqrt(geometry.centred_sq_norms)
    units = geometry.centred / np.where(norms > 0, norms, 1.0)[:, None]
    num_means = units.shape[0]
    if num_means <= DRAWN_CLASSES:
        cosines = np.clip(units @ units.T, -1.0, 1.0)
        return {"cosine_matrix": np.round(cosines, 4).tolist()}
    fine_counts = np.zeros(COSINE_FINE_BINS, np.int64)
    for start in range(0, num_means, COSINE_TILE):
        tile = units[start:start + COSINE_TILE] @ units[start:].T
        later = np.arange(tile.shape[1])[None, :] > np.arange(tile.shape[0])[:, None]
        fine_counts += cosine_histogram(tile[later])
    counts, edges = _over_their_range(fine_counts)
    return {"cosine_histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def analyze(paths, *, layers=None, chunk_size=None, labels=None, clean_labels=None,
            weights=None, bias=None, use_cache=True, global_mean="classes",
            pinv_rtol=PINV_RTOL, progress=True):
    """Measure neural collapse of every checkpoint × split × layer in ``paths``.

    Parameters
    ----------
    paths : sequence of str or PathLike
        Run folders (``ncfast.dumps``) and single files (``ncfast.readers``).
    layers : sequence of str, optional
        Measure only these layers (default: all).
    chunk_size : int, optional
        Rows per block read; chosen from the row width by default.
    labels, clean_labels, weights, bias : str or PathLike, optional
        One-array files for single files holding only features.
    use_cache : bool
        Read and write the per-checkpoint result caches.
    global_mean : {"classes", "samples"}
    pinv_rtol : float
        As in ``ncfast.collapse``.
    progress : bool
        Show a progress bar over checkpoints and bytes (on stderr).

    Returns
    -------
    Analysis

    Raises
    ------
    ValueError
        A file or run folder given twice (its rows would be measured twice), by the same
        path or another (``./a.npz``, a symbolic link): nothing is measured.
    """
    _refuse_repeated_paths(paths)
    layers = None if layers is None else set(layers)
    checkpoints, failures = discover(paths, labels=labels, clean_labels=clean_labels,
                                     weights=weights, bias=bias)
    analysis = Analysis(failures=failures)
    settings = {"cache_version": CACHE_VERSION, "ncfast": __version__,
                "global_mean": global_mean, "pinv_rtol": pinv_rtol}
    total_bytes = sum(_feature_bytes(checkpoint, layers) for checkpoint in checkpoints)
    with _Progress(len(checkpoints), total_bytes, enabled=progress) as shown:
        digests = _Digests(shown.hashing)
        cache_errors = set()  # why caches could not be written: each said once
        for checkpoint in checkpoints:
            shown.start(checkpoint.name)
            before = (analysis.measured, analysis.cached)
            try:
                _analyze_checkpoint(checkpoint, analysis, layers=layers, chunk_size=chunk_size,
                                    settings=settings, use_cache=use_cache,
                                    digests=digests, on_bytes=shown.read,
                                    stages=shown.stages,
                                    cache_errors=cache_errors)
                outcome = (f"{analysis.measured - before[0]} layer group(s) measured, "
                           f"{analysis.cached - before[1]} from cache")
            except (ValueError, TypeError, OSError) as error:
                analysis.failures.append(Failure(_source_name(checkpoint.name), one_line(error)))
                outcome = "FAILED (reason below)"
            # Cached and failed layer groups count as done, so that the bar ends full.
            shown.finish(checkpoint.name, outcome, _feature_bytes(checkpoint, layers))
    analysis.rows.sort(key=lambda row: (row["source"], -1 if row["epoch"] is None
                                        else row["epoch"], row["layer"], row["split"]))
    return analysis


def _refuse_repeated_paths(paths):
    """Raise ValueError when two paths lead to the same file or run folder (followed links,
    ``.`` and ``..`` resolved)."""
    seen = {}
    for path in map(os.fspath, paths):
        real = os.path.realpath(path)
        if real in seen:
            again = "" if path == seen[real] else f" (the second time as {path})"
            raise ValueError(f"{seen[real]} is given twice{again}; pass each file or run folder "
                             "once (measured twice, its rows would be repeated; nothing was "
                             "measured)")
        seen[real] = path


class _TaskColumn(ProgressColumn):
    """A progress column shown only for the byte task (``in_bytes``), or only for the other."""

    def __init__(self, column, *, in_bytes):
        super().__init__()
        self.column, self.in_bytes = column, in_bytes

    def render(self, task):
        shown = bool(task.fields.get("in_bytes")) == self.in_bytes
        return self.column.render(task) if shown else ""


class _Progress:
    """What ``analyze`` tells while it works, on stderr.

    On a terminal, a rich bar of checkpoints (counted) and features done
    (bytes: read, or their checkpoint's layer groups came from the cache or
    failed, so that the bar ends full), with the stages of the measurement
    under way below them (``stages``, as ``collapse(progress=...)`` tells
    them); elsewhere (a log file, a pipe), one plain line per checkpoint, with
    the bytes done and those really read.
    """

    def __init__(self, num_checkpoints, total_bytes, *, enabled):
        console = Console(stderr=True)
        self.enabled, self.console = enabled, console
        self.num_checkpoints, self.done = num_checkpoints, 0
        self.total_bytes, self.finished_bytes, self.read_bytes = total_bytes, 0, 0
        self.bar = None
        if enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(),
                _TaskColumn(MofNCompleteColumn(), in_bytes=False),
                *(_TaskColumn(column, in_bytes=True) for column in (
                    DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())),
                console=console, transient=True)
            self.checkpoint_task = self.bar.add_task("checkpoints", total=num_checkpoints)
            self.byte_task = self.bar.add_task("features done (2 passes)", total=total_bytes,
                                               in_bytes=True)
        # Each measurement's stages (the rows of its passes, the tiles of its class-pair
        # sweep, the longest stage at many classes) as bars under these, on a terminal.
        self.stages = StageProgress(True, bars=self.bar) if self.bar is not None \
            else NO_PROGRESS

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exception):
        if self.bar is not None:
            self.bar.stop()

    def start(self, name):
        """A checkpoint begins."""
        self._describe(f"[bold]{plain_markup(name)}")

    def hashing(self, path):
        """A file's content digest is being computed (a long read)."""
        self._describe(f"[bold]hashing {plain_markup(os.path.basename(path))}")

    def read(self, count):
        """``count`` bytes of features were read."""
        self.read_bytes += count
        if self.bar is not None:
            self.bar.advance(self.byte_task, count)

    def finish(self, name, outcome, checkpoint_bytes):
        """A checkpoint is done; its bytes count as done whether measured, cached or failed."""
        self.done += 1
        self.finished_bytes += checkpoint_bytes
        if self.bar is not None:
            self.bar.update(self.byte_task, completed=self.finished_bytes)
            self.bar.advance(self.checkpoint_task)
        elif self.enabled:
            self.console.print(
                f"ncfast analyze: [{self.done}/{self.num_checkpoints}] {one_line(name)}: "
                f"{outcome} ({decimal_size(self.finished_bytes)} of "
                f"{decimal_size(self.total_bytes)} of features done, "
                f"{decimal_size(self.read_bytes)} read)", markup=False,
                highlight=False, soft_wrap=True)

    def _describe(self, description):
        if self.bar is not None:
            self.bar.update(self.checkpoint_task, description=description)


def _feature_bytes(checkpoint, layers):
    """Bytes of features the two passes over a checkpoint read."""
    return 2 * sum(features.nbytes for split in checkpoint.arrays.splits.values()
                   for layer, features in split.features.items()
                   if (layers is None or layer in layers) and features.is_float)


def _analyze_checkpoint(checkpoint, analysis, *, layers, chunk_size, settings, use_cache,
                        digests, on_bytes, stages, cache_errors):
    by_layer = _check_arrays(checkpoint, layers)
    num_classes = _num_classes(checkpoint)
    arrays = checkpoint.arrays
    cache = _load_cache(checkpoint.cache_path) if use_cache else None
    saved_digests = None if cache is None else dict(cache["digests"])
    remembered = cache["digests"] if use_cache else {}

    def digest(array):
        # Without a cache, only run-folder files are hashed (when changed since their
        # manifest), to check them against the digests it recorded.
        if use_cache or array.recorded_sha256 is not None:
            return digests(array, checkpoint, remembered)
        return None

    for layer, splits in by_layer.items():
        inputs = {}
        for split in splits:
            split_arrays = arrays.splits[split]
            for role, array in (("features", split_arrays.features[layer]),
                                ("labels", split_arrays.labels),
                                ("clean_labels", split_arrays.clean_labels)):
                if array is not None:
                    inputs[f"{split}/{role}"] = [digest(array), array.key]
        if layer == arrays.classifier_layer:
            for role in ("weights", "bias"):
                array = getattr(arrays, role)
                if array is not None:
                    inputs[role] = [digest(array), array.key]
        key = None
        if use_cache:
            key = hashlib.sha256(json.dumps(
                {"inputs": inputs, "num_classes": num_classes, "layer": layer, **settings},
                sort_keys=True).encode()).hexdigest()
            if key in cache["results"]:
                analysis.rows.extend(_with_source(row, checkpoint)
                                     for row in cache["results"][key])
                analysis.cached += 1
                continue
        rows = _measure_layer(checkpoint, layer, splits, num_classes, chunk_size=chunk_size,
                              global_mean=settings["global_mean"],
                              pinv_rtol=settings["pinv_rtol"], on_bytes=on_bytes,
                              stages=stages)
        analysis.rows.extend(rows)
        analysis.measured += 1
        if use_cache:
            cache["results"][key] = rows
            _save_cache(checkpoint.cache_path, cache, cache_errors)
            saved_digests = dict(cache["digests"])
    if use_cache and cache["digests"] != saved_digests:
        _save_cache(checkpoint.cache_path, cache, cache_errors)  # digests of cached rows


def _with_source(row, checkpoint):
    """A cached row, named after the path it was reached by this time."""
    return {**row, "source": checkpoint.source, "epoch": checkpoint.epoch}


def scalar_metrics(rows, metrics=None):
    """The scalar metrics present in ``rows`` (in ``METRICS`` order), or those asked for.

    Parameters
    ----------
    rows : list of dict
    metrics : sequence of str, optional
        Names from ``ncfast.METRICS``.

    Returns
    -------
    list of str
    """
    if metrics is not None:
        unknown = [name for name in metrics if name not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(METRICS)}")
        return list(metrics)
    return [name for name in METRICS if any(row.get(name) is not None for row in rows)]


def results_document(analysis, metrics=None):
    """The JSON document of an analysis (``metrics.json``, ``--format json``).

    ``{"rows": [...], "failures": [{"name", "reason"}]}``: each row keeps
    ``ROW_KEYS``, the asked metrics (default: all), the run facts and
    per-class lists of ``CollapseReport.to_dict``, and ``cosine_histogram``
    where the classes are too many for ``cosine_matrix`` (kept in the cache
    only).
    """
    dropped = (set(METRICS) - set(scalar_metrics(analysis.rows, metrics))) | set(UNWRITTEN_KEYS)
    return {"rows": [{key: value for key, value in row.items() if key not in dropped}
                     for row in analysis.rows],
            "failures": [{"name": failure.name, "reason": failure.reason}
                         for failure in analysis.failures]}


def results_csv(analysis, metrics=None):
    """The CSV text of an analysis: ``ROW_KEYS`` then one column per scalar metric."""
    names = scalar_metrics(analysis.rows, metrics)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([*ROW_KEYS, *names])
    for row in analysis.rows:
        writer.writerow([_csv_value(row.get(key)) for key in (*ROW_KEYS, *names)])
    return text.getvalue()


def write_results(analysis, out, metrics=None):
    """Write ``metrics.json`` and ``metrics.csv`` into ``out`` (atomically).

    Parameters
    ----------
    analysis : Analysis
    out : str or PathLike
        Folder; created if missing.
    metrics : sequence of str, optional
        Metrics to write (default: every metric some row defines). The JSON
        rows also keep the run facts and per-class arrays of
        ``CollapseReport.to_dict``.

    Returns
    -------
    list of str
        The files written.
    """
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    csv_path, json_path = os.path.join(out, "metrics.csv"), os.path.join(out, "metrics.json")
    write_text_atomically(csv_path, results_csv(analysis, metrics))
    write_json_atomically(json_path, results_document(analysis, metrics))
    return [json_path, csv_path]


def write_analysis(analysis, out, metrics=None, *, plots=True):
    """Write an analysis into ``out``: results, figures, and no figure of an earlier one.

    Nothing is written when nothing was measured, so that a run whose every
    input failed leaves the results of an earlier one as they were.

    Every file (``metrics.json``, ``metrics.csv``, the figures) is first written in full
    into a hidden folder ``.ncfast-staged-*`` in ``out``; only when all are there are they
    renamed into ``out`` (renames need no space), taking the modes of the files they
    replace, and the figures of an earlier analysis removed. An error while staging (a full
    disk) or Ctrl-C then leaves ``out`` as it was, and the staged files are removed; Ctrl-C
    during the renames is held until they are done (when called from the main thread).
    What can still leave ``out`` mixed, some files of the earlier analysis beside new
    ones: the process killed during the renames (SIGKILL, power loss). A process killed
    while staging leaves its hidden folder behind.

    Parameters
    ----------
    analysis, out, metrics :
        As in ``write_results``; the figures are drawn for the same metrics.
    plots : bool
        Draw figures (``ncfast.plots.write_plots``). Either way the figures an
        earlier analysis left in ``out`` and this one does not draw are removed.

    Returns
    -------
    written : list of str
    removed : list of str
        Figures of an earlier analysis removed from ``out``.

    Raises
    ------
    ValueError
        No row was measured.
    OSError
        A file could not be staged (``out`` is then as it was).
    """
    from ncfast.plots import remove_stale_plots, write_plots

    out = os.fspath(out)
    if not analysis.rows:
        raise ValueError(f"nothing was measured; {out} is left as it was")
    os.makedirs(out, exist_ok=True)
    with staging_folder(out) as staging:
        write_results(analysis, staging, metrics)
        if plots:
            write_plots(analysis.rows, staging, scalar_metrics(analysis.rows, metrics))
        with ctrl_c_held():
            written = move_staged_files(staging, out)
            removed = remove_stale_plots(out, written)
    return written, removed


def _csv_value(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


#: Metrics the ``analyze`` table shows when ``--metrics`` is not given (files keep all).
TABLE_METRICS = ("nc1", "nc2_etf", "nc3", "nc4", "ncc_accuracy", "accuracy", "memorization",
                 "dilation")

#: Printed forms of results (``--format``).
FORMATS = ("table", "csv", "json")

ANALYZE_DESCRIPTION = """\
Measure neural collapse of every checkpoint x split x layer in run folders (written by
ncfast.dumps.RunWriter, with a manifest.json) and feature files (.npy, .npz, .safetensors,
.pt/.pth, .h5/.hdf5). Arrays in a file are named [SPLIT/]features[/LAYER], [SPLIT/]labels,
[SPLIT/]clean_labels, weights, bias; a file of features alone takes --labels (and
--weights/--bias). A file's epoch is the last number in its name: files in one folder whose
names differ only in it (run_epoch1.npz, run_epoch2.npz, ...) are one run, run_epoch.npz.
Files are streamed in row blocks, never loaded whole.

The train split is measured against its own class means (with memorization and dilation when
clean labels exist); other splits against the train means of the same checkpoint and layer;
the classifier against the layer it reads. Results of each checkpoint are cached next to it,
keyed by the SHA-256 of its files' content and the settings: rerunning on a growing run
measures only new checkpoints. A file is hashed once; its digest is reused while the file keeps
its size, modification time and status-change time (ctime), which any edit or replacement of
the file changes (cp -p included). A cache file edited or corrupted is ignored and rewritten.

Prints the results (stdout) and writes OUT/metrics.json, OUT/metrics.csv, OUT/METRIC.png (each
metric against epoch on a log axis, when a run has two checkpoints or more),
OUT/memorization_vs_dilation.png (label noise) and OUT/snapshot-RUN-epochE-LAYER-SPLIT.png
(the last checkpoint: cosines between class means against the simplex ETF, per-class
variance, norm and accuracy). OUT is checked before anything is measured and written only
when at least one input was measured; figures of those names that an earlier analysis left
in OUT are removed. Every file is written into a hidden folder in OUT first and renamed into
place only when all are written, so Ctrl-C or a full disk while writing leaves OUT as it was.
The results are printed after the files are written. A file or run folder given twice is
refused. Progress, messages and errors go to stderr."""

MERGE_DESCRIPTION = """\
Merge partial pass states saved by ncfast.states.save_state on several processes or machines
(one file per worker and pass; README "Streaming states" shows the workflow).

Pass-1 states (ClassSums) merge into OUT/pass1.safetensors, from which each worker builds the
class means for pass 2. Pass-2 states (ResidualStats, ResidualPass) merge into one report:
printed (stdout) and written to OUT/metrics.json and OUT/metrics.csv.

A pass-2 state records the row count of every class behind the means it was built on. The
merged pass-2 states must hold exactly those rows: when a worker's state is missing (or one
is given twice) the merge stops and says which classes fall short, instead of reporting on
part of the rows. Pass --held-out when the pass-2 rows are other rows than those behind the
means (held-out features measured against training means). The same file given twice is
refused."""


def add_commands(commands):
    """Add the ``analyze`` and ``merge`` subcommands to the CLI's subparsers."""
    import argparse

    parser = commands.add_parser(
        "analyze", help="measure every checkpoint x split x layer of saved features",
        description=ANALYZE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run folders and feature files")
    parser.add_argument("--metrics", nargs="+", metavar="METRIC",
                        help="metrics to show, write and plot (default: the table shows "
                             f"{', '.join(TABLE_METRICS)}; files and plots every metric the "
                             "data define); choose from: "
                             f"{', '.join(name for name in METRICS if name != 'nc5')}")
    parser.add_argument("--layers", nargs="+", metavar="LAYER",
                        help="measure only these layers (default: every layer)")
    parser.add_argument("--out", default="ncfast-analysis", metavar="DIR",
                        help="folder for metrics.json, metrics.csv and the PNG plots "
                             "(default: ./ncfast-analysis)")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="how the results are printed: a table readable at any width, "
                             "or the CSV / JSON of metrics.csv / metrics.json "
                             "(default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, metavar="ROWS",
                        help="rows read per block (default: about 256 MiB of float32 rows, at "
                             "least 256 rows); bounds memory, results do not depend on it")
    for name, what in (("labels", "labels"), ("clean-labels", "true labels (label noise)"),
                       ("weights", "classifier weights (C, D)"), ("bias", "classifier bias")):
        parser.add_argument(f"--{name}", metavar="FILE",
                            help=f"file of the {what}, for feature files that lack them "
                                 "(refused for a file that holds them)")
    parser.add_argument("--global-mean", choices=("classes", "samples"), default="classes",
                        help="global mean as the mean of class means (default) or of all rows")
    parser.add_argument("--no-cache", action="store_true",
                        help="measure everything again; neither read nor write the caches")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress (a bar on a terminal, one line per checkpoint "
                             "otherwise)")
    parser.set_defaults(handler=run_analyze)

    merge = commands.add_parser(
        "merge", help="merge partial pass states from several processes into one",
        description=MERGE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("states", nargs="+", metavar="STATE",
                       help="state files of one pass, written by ncfast.states.save_state")
    merge.add_argument("--out", default="ncfast-merged", metavar="DIR",
                       help="folder for the merged pass-1 state or the report "
                            "(default: ./ncfast-merged)")
    merge.add_argument("--held-out", action="store_true",
                       help="the pass-2 rows are not the rows behind the class means (e.g. "
                            "test features against training means): skip the check that "
                            "every worker's state is here")
    merge.add_argument("--format", choices=FORMATS, default="table",
                       help="how the report is printed (default: %(default)s)")
    merge.set_defaults(handler=run_merge)


def _number(value):
    return "-" if value is None else f"{value:.4g}"


def results_tables(rows, metrics, width):
    """Rich tables of result rows, readable at ``width`` columns.

    No cell wraps inside a number. One row gives a vertical table (metric,
    value, meaning) titled with its run, epoch, layer and split; several rows
    give the key columns (run when there are several, epoch, split, layer)
    and as many metric columns as fit, repeated over further tables for the
    metrics left.

    Parameters
    ----------
    rows : list of dict
    metrics : sequence of str
    width : int
        Columns of the console.

    Returns
    -------
    list of rich.table.Table
    """
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table

    from ncfast.plots import source_labels

    labels = source_labels(row["source"] for row in rows)
    if len(rows) == 1:
        (row,) = rows
        epoch = "" if row["epoch"] is None else f" epoch {row['epoch']}"
        where = " / ".join(part for part in (row["layer"], row["split"]) if part)
        table = Table(title=plain_markup(f"{labels[row['source']]}{epoch}"
                                         + (f", {where}" if where else "")),
                      box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column("metric", no_wrap=True)
        table.add_column("value", justify="right", no_wrap=True)
        table.add_column("meaning", overflow="fold")
        for name in metrics:
            table.add_row(name, _number(row.get(name)), escape(METRICS[name]))
        return [table]
    keys = (["run"] if len(labels) > 1 else []) + ["epoch", "split", "layer"]
    key_cells = [([labels[row["source"]]] if len(labels) > 1 else [])
                 + ["" if row["epoch"] is None else str(row["epoch"]), row["split"], row["layer"]]
                 for row in rows]

    def table_of(names):
        table = Table(box=box.SIMPLE_HEAD)
        for key in keys:
            table.add_column(key, overflow="fold", max_width=30 if key == "run" else None)
        for name in names:
            table.add_column(name, justify="right", no_wrap=True)
        for row, cells in zip(rows, key_cells):
            table.add_row(*map(plain_markup, cells),
                          *(_number(row.get(name)) for name in names))
        return table

    measuring = Console(width=1 << 16)  # a table's natural width, not clamped to ``width``
    groups = [[]]
    for name in metrics:
        fits = Measurement.get(measuring, measuring.options,
                               table_of([*groups[-1], name])).maximum <= width
        if fits or not groups[-1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return [table_of(names) for names in groups]


def print_results(analysis, metrics, shown, args, console, title):
    """Print results on stdout in ``args.format``: a title and tables of the ``shown``
    metrics, or the CSV / JSON of ``metrics`` (the files' content).

    Raises
    ------
    OSError
        stdout refused the text (``BrokenPipeError``: its reader closed the pipe).
    """
    if args.format == "csv":
        text = results_csv(analysis, metrics)
    elif args.format == "json":
        text = json.dumps(results_document(analysis, metrics), indent=1, allow_nan=False) + "\n"
    else:
        write_captured(console, escape(title), *results_tables(analysis.rows, shown,
                                                                console.width))
        return
    console.file.write(text)
    console.file.flush()


def write_captured(console, *renderables):
    """Print rich ``renderables`` (markup strings, tables) on ``console``'s file, one after
    another, through a capture: rich itself exits the process (status 1) when the file's
    reader has closed its pipe, whereas this raises the ``OSError`` for
    ``print_on_stdout`` to handle.
    """
    with console.capture() as captured:
        for renderable in renderables:
            console.print(renderable, highlight=False, soft_wrap=isinstance(renderable, str))
    console.file.write(captured.get())
    console.file.flush()


def print_on_stdout(print_them, console, errors, command, kept):
    """Call ``print_them()``, which prints results on ``console`` (stdout) once their files
    are written; return the exit status this leaves: 1 when stdout refused them, else 0.

    A reader that stops reading (``ncfast analyze RUN | head``) closes its pipe: that is no
    error, and the rest of the results is dropped quietly, as most Unix tools do. Any other
    failed write (``> /dev/full``) is told on ``errors`` in one line ending with ``kept``
    (where the results are). Either way what stdout did not take is dropped
    (``_drop_unwritten``).
    """
    try:
        print_them()
    except OSError as error:
        _drop_unwritten(console.file)
        if isinstance(error, BrokenPipeError):
            return 0
        tell(errors, f"{command}: cannot print the results on stdout "
                     f"({error.strerror or error}); {kept}", style="red")
        return 1
    return 0


def _drop_unwritten(stream):
    """Point ``stream``'s file descriptor at ``os.devnull``, so that what its buffer still
    holds is dropped, not refused again when Python flushes it at exit (which prints a
    message and exits with status 120). A stream without a descriptor (captured output)
    has nothing to flush at exit and is left as it is."""
    try:
        descriptor = stream.fileno()
    except io.UnsupportedOperation:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def _results_not_written(out, error, cached=""):
    """The ValueError of results that could not be staged or moved into ``out`` (left as
    it was): ``error``, an OSError, names the file (one staged in a hidden folder, now
    gone, or the one in ``out`` in the way); ``cached`` ends the advice to run again."""
    failed = f": {os.path.basename(error.filename)}" if error.filename else ""
    return ValueError(f"cannot write the results into {out} ({error.strerror or error}"
                      f"{failed}); free space or choose another --out, and run again{cached}; "
                      f"{out} is left as it was")


def run_analyze(args, console, errors):
    """``ncfast analyze``: check the arguments and --out, measure, write, print.

    The files are written before the results are printed, so that a stdout that cannot
    take them (``| head``, a full disk) loses none of them (``print_on_stdout``).
    """
    if args.metrics is not None:
        scalar_metrics([], args.metrics)  # reject unknown names before measuring
        if "nc5" in args.metrics:
            raise ValueError("nc5 needs out-of-distribution rows, which ncfast analyze does not "
                             "read: measure it in Python, ncfast.collapse(..., ood=ood_rows)")
    if args.chunk_size is not None:
        check_chunk_size(args.chunk_size, 1)
    check_output_folder(args.out, what="--out folder", create=False)
    _check_paths_exist(args)
    analysis = analyze(args.paths, layers=args.layers, chunk_size=args.chunk_size,
                       labels=args.labels, clean_labels=args.clean_labels,
                       weights=args.weights, bias=args.bias, use_cache=not args.no_cache,
                       global_mean=args.global_mean, progress=not args.no_progress)
    cached = "" if args.no_cache else " (the measured checkpoints are cached)"
    status = 1 if analysis.failures else 0
    if analysis.rows:
        earlier = [name for name in ("metrics.json", "metrics.csv")
                   if os.path.exists(os.path.join(args.out, name))]
        written, removed = None, []
        if not (analysis.failures and earlier):
            try:
                written, removed = write_analysis(analysis, args.out, args.metrics,
                                                  plots=not args.no_plots)
            except OSError as error:
                raise _results_not_written(args.out, error, cached) from None
        metrics = scalar_metrics(analysis.rows, args.metrics)
        shown = metrics if args.metrics is not None else [
            name for name in TABLE_METRICS if name in metrics]
        title = (f"ncfast analyze: {len(analysis.rows)} measurements ({analysis.measured} "
                 f"layer groups measured, {analysis.cached} from cache)")
        kept = (f"they are written to {args.out}" if written is not None else
                "they are not written either (below)")
        status = max(status, print_on_stdout(
            lambda: print_results(analysis, args.metrics, shown, args, console, title),
            console, errors, "ncfast analyze", kept))
        if written is None:
            tell(errors, f"ncfast analyze: {args.out} holds an earlier analysis "
                         f"({', '.join(earlier)}), left as it was: {len(analysis.failures)} "
                         "input(s) failed (below): fix or leave out the failed inputs and run "
                         f"again{cached}, or write to a new --out", style="red")
        else:
            stale = f"; removed {len(removed)} figures of an earlier analysis" if removed else ""
            tell(errors, f"ncfast analyze: wrote {len(written)} files to {args.out}{stale}")
    for failure in analysis.failures:
        name = one_line(failure.name)
        where = "" if name in failure.reason else f" {name}:"
        tell(errors, f"ncfast analyze: FAILED{where} {failure.reason}", style="red")
    if not analysis.rows:
        found = "measured nothing" if analysis.failures else "found no checkpoints to measure"
        tell(errors, f"ncfast analyze: {found}; {args.out} is left as it was", style="red")
        return 1
    return status


def _check_paths_exist(args):
    """Raise ValueError, before anything is measured, for a PATH or option file that does
    not exist (a typo would otherwise show only after every other input was measured)."""
    options = [(f"--{name.replace('_', '-')}", getattr(args, name))
               for name in ("labels", "clean_labels", "weights", "bias")]
    for what, path in [("", path) for path in args.paths] + options:
        if path is not None and not os.path.exists(path):
            broken = " (a broken symbolic link)" if os.path.islink(path) else ""
            raise ValueError(f"{what + ' ' if what else ''}{path}: no such file or folder"
                             f"{broken}; check the path (nothing was measured; {args.out} is "
                             "left as it was)")


def run_merge(args, console, errors):
    """``ncfast merge``: add up state files; save pass 1, or report pass 2."""
    from ncfast.accumulators import ClassSums
    from ncfast.states import check_pass2_coverage, merge_states, report_of, save_state

    check_output_folder(args.out, what="--out folder", create=False)
    merged = merge_states(args.states)
    if isinstance(merged, ClassSums):
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "pass1.safetensors")
        for state in args.states:
            if os.path.exists(path) and os.path.samefile(state, path):
                raise ValueError(f"{state}: is the file this merge writes ({path}); merging "
                                 "it into itself would count its rows again: choose another "
                                 "--out folder")
        try:
            save_state(path, merged)
        except OSError as error:  # written atomically: an earlier state is left as it was
            raise _results_not_written(args.out, error) from None
        tell(errors, f"ncfast merge: {len(args.states)} pass-1 states, "
                     f"{int(merged.counts.sum()):,} rows in {int((merged.counts > 0).sum())} of "
                     f"{merged.num_classes} classes -> {path}")
        return 0
    coverage = ("held-out rows (--held-out): not checked against the rows behind the means"
                if args.held_out else check_pass2_coverage(merged, held_out_option="--held-out"))
    report = report_of(merged, held_out=args.held_out)
    # Pass-2 states carry no layer or split: the row names its merge alone.
    row = {"source": "merged", "epoch": None, "split": "",
           "layer": "", "measured_against": "merged", **report.to_dict()}
    analysis = Analysis(rows=[row])
    os.makedirs(args.out, exist_ok=True)
    try:
        with staging_folder(args.out) as staging:  # both files, or neither (as analyze)
            write_results(analysis, staging)
            with ctrl_c_held():
                written = move_staged_files(staging, args.out)
    except OSError as error:
        raise _results_not_written(args.out, error) from None
    status = print_on_stdout(
        lambda: print_results(analysis, None, scalar_metrics(analysis.rows), args, console,
                              f"ncfast merge: {len(args.states)} pass-2 states"),
        console, errors, "ncfast merge", f"they are written to {args.out}")
    tell(errors, f"ncfast merge: {len(args.states)} pass-2 states, {coverage}; wrote "
                 f"{', '.join(written)}")
    return status
