"""Run folders: the feature-dump format ncfast writes and reads.

A run folder holds the features of many checkpoints of one training run, each
split (train, test, ...) and each layer in its own memory-mappable ``.npy``
file, and a ``manifest.json`` that says what is there::

    RUN/
      manifest.json
      checkpoints/
        epoch_000010/
          classifier/weights.npy          (C, D) float, optional
          classifier/bias.npy             (C,) float, optional
          train/labels.npy                (N,) int
          train/clean_labels.npy          (N,) int, when the run had label noise
          train/features/penultimate.npy  (N, D) float, one file per layer
          train/features/linear1.npy
          test/...                        the same for every split
          ncfast-cache.json               analysis results, written by ``ncfast analyze``

``manifest.json``::

    {"format": "ncfast-run", "version": 1,
     "config": {...},                      # the run's configuration, as given
     "num_classes": 10,
     "class_names": ["airplane", ...] or null,
     "checkpoints": [                      # ascending epoch; only complete ones
       {"epoch": 10,
        "path": "checkpoints/epoch_000010",
        "classifier_layer": "penultimate" or null,
        "classifier": {"weights": FILE, "bias": FILE or null} or null,
        "splits": {"train": {"num_rows": 50000,
                             "labels": FILE,
                             "clean_labels": FILE or null,
                             "features": {"penultimate": FILE, "linear1": FILE}},
                   "test": {...}}}]}

where ``FILE`` is ``{"file": path relative to RUN, "shape": [...], "dtype":
"float32", "bytes": size, "sha256": content digest, "changed_ns": the file's
status-change time once written}`` (``changed_ns`` may be missing: readers then hash
the file to check its digest). Every path in the
manifest stays inside RUN, symbolic links followed; ``read_manifest`` refuses
a manifest that breaks the schema or points outside.

Every array file is written to a temporary name, flushed to disk and renamed
into place, with the permissions ``open()`` would give it (0o666 less the
umask for a new file); the manifest is rewritten the same way only after all files of a
checkpoint are in place. A writer interrupted at any point leaves the
previous manifest, which lists only complete checkpoints, so a reader never
sees a checkpoint that is partly written; rerunning the writer rewrites it.
Readers may open the folder while it grows; one process writes a run folder at
a time.
"""
import contextlib
import errno
import json
import os
import re
import reprlib
import secrets
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from ncfast.inputs import as_array, check_features, check_labels, file_problem
from ncfast.readers import (CheckpointArrays, SplitArrays, StoredArray, file_sha256,
                            open_npy_rows)

FORMAT_NAME = "ncfast-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: Split and layer names become file names: letters, digits, ``_``, ``-``, ``.``.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def fsync_directory(path):
    """Make the entries of folder ``path`` (files created, renamed) durable (POSIX only)."""
    if os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def ctrl_c_held():
    """Hold Ctrl-C (SIGINT) while the block runs; one pressed meanwhile is raised after it.

    Only the main thread can set a signal handler: elsewhere, or when Python
    did not install the present handler, the block runs as it would.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda number, frame: pressed.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def staging_folder(folder):
    """A hidden folder ``.ncfast-staged-*`` in ``folder``, removed with what is left in it when
    the block ends: a set of files written there in full is moved in by
    ``move_staged_files``, so that an error or Ctrl-C while writing them (a full disk) leaves
    ``folder`` as it was. A process killed meanwhile leaves the hidden folder behind.

    Yields
    ------
    str
        The staging folder's path.
    """
    with tempfile.TemporaryDirectory(prefix=".ncfast-staged-", dir=folder) as staging:
        yield staging


def move_staged_files(staging, folder):
    """Rename every file of ``staging`` (``staging_folder``) into ``folder``.

    A file of the same name in ``folder`` is replaced, its mode kept (a new file has the
    mode the umask gave it); renames need no space, so only a killed process can leave
    ``folder`` part old, part new. Call it with Ctrl-C held (``ctrl_c_held``).

    Returns
    -------
    list of str
        The files' paths in ``folder``, by name.

    Raises
    ------
    IsADirectoryError
        Where a folder has a staged file's name, before anything is moved.
    """
    names = sorted(name for name in os.listdir(staging)
                   if os.path.isfile(os.path.join(staging, name)))
    targets = [os.path.join(folder, name) for name in names]
    for name, target in zip(names, targets):
        if os.path.isdir(target):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), target)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(os.path.join(staging, name), stat.S_IMODE(os.stat(target).st_mode))
    for name, target in zip(names, targets):
        os.replace(os.path.join(staging, name), target)
    fsync_directory(folder)
    return targets


def _create_temporary(folder, name):
    """Create and open an unused hidden file ``.NAME.RANDOM.tmp`` in ``folder``.

    It is created with mode 0o666 like ``open(path, "w")`` creates a file, so
    the process's umask (and the folder's default ACL) set its permissions.

    Returns
    -------
    descriptor : int
        Open for writing.
    path : str
    """
    while True:
        temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                 | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0),
                                 0o666)
        except FileExistsError:
            continue
        return descriptor, temporary


class UnwritablePathError(ValueError):
    """``write_atomically`` could not create a file where asked.

    Attributes
    ----------
    reason : str
        Why, in a few words without the path (``"it is a folder"``, ``"Permission
        denied"``): callers that write many such files warn once per reason.
    """

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def write_atomically(path, write):
    """Write a file through a temporary file in the same folder, then rename it.

    The file gets the permissions ``open(path, "w")`` would give it: a file
    that already exists keeps its mode; a new one gets 0o666 less the umask.

    Parameters
    ----------
    path : str
        Final location; its folder must exist.
    write : callable
        Called with a binary file object open for writing.

    Raises
    ------
    UnwritablePathError
        Naming ``path``, when it is a folder, or its folder is missing or cannot be
        written into.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UnwritablePathError(f"cannot write {path!r}: it is a folder, not a file; name a "
                                  "file instead (e.g. one inside it), or remove the folder",
                                  "it is a folder")
    try:
        existing_mode = stat.S_IMODE(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        existing_mode = None
    try:
        descriptor, temporary = _create_temporary(folder, os.path.basename(path))
    except OSError as error:  # its message names the hidden temporary file
        if not os.path.exists(folder):
            reason = "its folder does not exist"
            problem = ("does not exist; create it first (os.makedirs), or give a path in an "
                       "existing folder")
        elif not os.path.isdir(folder):
            reason = "its folder is a file"
            problem = "is a file, not a folder; give a path in a folder"
        else:
            reason = error.strerror or str(error)
            problem = f"cannot be written into ({reason}); choose another folder"
        raise UnwritablePathError(f"cannot write {path!r}: {folder!r} {problem}",
                                  reason) from None
    try:
        with os.fdopen(descriptor, "wb") as stream:
            if existing_mode is not None:
                os.chmod(temporary, existing_mode)
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_directory(folder)


def write_text_atomically(path, text):
    """Write a string as UTF-8, atomically (see ``write_atomically``)."""
    write_atomically(path, lambda stream: stream.write(text.encode()))


def write_json_atomically(path, value):
    """Write ``value`` as indented JSON, atomically (see ``write_atomically``)."""
    write_text_atomically(path, json.dumps(value, indent=1, allow_nan=False) + "\n")


def _nearest_existing(path):
    """``path`` itself or its nearest parent that exists; a broken symbolic link exists."""
    probe = path
    while True:
        try:
            os.lstat(probe)
            return probe
        except FileNotFoundError:
            # Parents as given (the message shows them), then the current folder's.
            probe = os.path.dirname(probe) or os.path.dirname(os.path.abspath(probe))


def check_output_folder(path, *, what="output folder", create=True):
    """Make sure files can be written into the folder ``path``, or raise ValueError.

    Parameters
    ----------
    path : str or PathLike
    what : str
        What the folder is, for the message (``"run folder"``).
    create : bool
        Create the folder (and its parents) when missing. Without it nothing
        is created: a missing folder passes when its nearest existing parent
        is a folder that can be written into.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError(f"the {what} is an empty name; name a folder (e.g. 'results')")
    try:
        probe = _nearest_existing(path)
        if os.path.islink(probe) and not os.path.exists(probe):
            raise ValueError(f"cannot write the {what} {path!r}: {probe!r} is a broken "
                             f"symbolic link (to {os.readlink(probe)!r}); point it at a folder "
                             "or choose another folder")
        if not os.path.isdir(probe):
            raise ValueError(f"cannot write the {what} {path!r}: {probe!r} is a file, not a "
                             "folder; choose another folder")
        if create:
            os.makedirs(path, exist_ok=True)
            probe = path
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise ValueError(f"cannot write the {what} {path!r}: {error.strerror or error}; "
                         "choose another folder") from None


def _check_name(name, what):
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} name {name!r} cannot be a file name; use letters, digits, '_', '-' and '.' "
            "(e.g. 'layer4.1' or 'penultimate')")
    return name


def _difference(written, given):
    """``written`` and ``given`` in words: for two dicts, only the entries that differ."""
    if not (isinstance(written, dict) and isinstance(given, dict)):
        return f"{written!r}, now {given!r}"

    def shown(config, name):
        return repr(config[name]) if name in config else "not set"

    return "; ".join(f"{name}: {shown(written, name)}, now {shown(given, name)}"
                     for name in sorted(set(written) | set(given), key=str)
                     if (name in written, written.get(name)) != (name in given, given.get(name)))


def _json_config(config, what):
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{what} must be JSON-serialisable (dicts, lists, str, int, finite float, bool, "
            f"None): {error}") from None


class RunWriter:
    """Write the checkpoints of one training run into a run folder.

    Parameters
    ----------
    path : str or PathLike
        The run folder. Created if missing; an existing run folder is resumed
        (its checkpoints are kept) when its config, class count and class
        names equal these.
    config : dict
        The run's configuration; must be JSON-serialisable.
    num_classes : int
    class_names : sequence of str, optional

    Raises
    ------
    ValueError
        The folder holds another run (different config) or files that are not
        a run folder.
    """

    def __init__(self, path, *, config, num_classes, class_names=None):
        self.path = os.fspath(path)
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; found {num_classes!r}")
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes:
                raise ValueError(
                    f"class_names has {len(class_names)} names for num_classes={num_classes}; "
                    "pass one name per class")
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "config": _json_config(config, "config"), "num_classes": int(num_classes),
                    "class_names": class_names, "checkpoints": []}
        manifest_path = os.path.join(self.path, MANIFEST)
        if os.path.exists(manifest_path):
            existing = read_manifest(self.path)
            for key in ("config", "num_classes", "class_names"):
                if existing[key] != manifest[key]:
                    raise ValueError(
                        f"{manifest_path}: this run folder was written with a different {key} "
                        f"({_difference(existing[key], manifest[key])}); write to a new "
                        "folder, or pass the same config to resume")
            self._manifest = existing
            return
        if os.path.isdir(self.path) and any(
                not name.startswith(".") for name in os.listdir(self.path)):
            raise ValueError(
                f"{self.path}: the folder exists, is not empty and has no {MANIFEST}; "
                "choose a new or empty folder for the run")
        os.makedirs(self.path, exist_ok=True)
        write_json_atomically(manifest_path, manifest)
        self._manifest = manifest

    def checkpoints(self):
        """Epochs whose checkpoints are completely written, ascending."""
        return [entry["epoch"] for entry in self._manifest["checkpoints"]]

    def write_checkpoint(self, epoch, splits, *, weights=None, bias=None,
                         classifier_layer=None):
        """Write one checkpoint's features, labels and classifier.

        Parameters
        ----------
        epoch : int
            Training epoch (or step) of the checkpoint; not yet written.
        splits : dict
            ``{split: {"features": {layer: array of shape (N, D_layer)},
            "labels": int array of shape (N,), "clean_labels": int array of
            shape (N,) or None}}``; numpy arrays, float features.
        weights : float array of shape (C, D), optional
            Classifier applied to ``classifier_layer``'s features.
        bias : float array of shape (C,), optional
        classifier_layer : str, optional
            Layer the classifier reads; may be omitted when there is one layer.

        Returns
        -------
        str
            The checkpoint's folder.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int; found {epoch!r}")
        epoch = int(epoch)
        if epoch in self.checkpoints():
            raise ValueError(
                f"{self.path}: epoch {epoch} is already written; each checkpoint is written "
                "once (use a new epoch number or a new run folder)")
        plan = _plan_checkpoint(splits, weights, bias, classifier_layer, self.num_classes)
        relative_folder = f"checkpoints/epoch_{epoch:06d}"
        entry = {"epoch": epoch, "path": relative_folder,
                 "classifier_layer": plan["classifier_layer"], "classifier": None, "splits": {}}
        for split, arrays in plan["splits"].items():
            split_folder = f"{relative_folder}/{split}"
            features = {layer: self._write_array(f"{split_folder}/features/{layer}.npy", array)
                        for layer, array in arrays["features"].items()}
            clean = arrays["clean_labels"]
            entry["splits"][split] = {
                "num_rows": int(arrays["labels"].shape[0]),
                "labels": self._write_array(f"{split_folder}/labels.npy", arrays["labels"]),
                "clean_labels": None if clean is None else self._write_array(
                    f"{split_folder}/clean_labels.npy", clean),
                "features": features}
        if plan["weights"] is not None:
            entry["classifier"] = {
                "weights": self._write_array(f"{relative_folder}/classifier/weights.npy",
                                             plan["weights"]),
                "bias": None if plan["bias"] is None else self._write_array(
                    f"{relative_folder}/classifier/bias.npy", plan["bias"])}
        manifest = dict(self._manifest)
        manifest["checkpoints"] = sorted([*self._manifest["checkpoints"], entry],
                                         key=lambda item: item["epoch"])
        write_json_atomically(os.path.join(self.path, MANIFEST), manifest)
        self._manifest = manifest
        return os.path.join(self.path, relative_folder)

    @property
    def num_classes(self):
        return self._manifest["num_classes"]

    def _write_array(self, relative_path, array):
        path = os.path.join(self.path, relative_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, lambda stream: np.save(stream, array, allow_pickle=False))
        # Any later write, replacement or cp -p over the file moves its status-change
        # time, which utime cannot set back: while it holds, the digest is the file's.
        status = os.stat(path)
        return {"file": relative_path, "shape": list(array.shape), "dtype": str(array.dtype),
                "bytes": status.st_size, "sha256": file_sha256(path),
                "changed_ns": status.st_ctime_ns}


def _as_numpy(array, what):
    """``array`` C-contiguous in native byte order (the manifest names native dtypes)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what} must be a numpy array; found {type(array).__name__} "
                        "(torch: tensor.detach().cpu().numpy())")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


def _checked_labels(array, what, num_rows, num_classes):
    """``ncfast.inputs.check_labels``, plus the class range."""
    array = check_labels(_as_numpy(array, what), num_rows, what)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{what} holds labels outside [0, {num_classes}): found "
                         f"{array.min()}..{array.max()}")
    return array


def _checked_features(array, what):
    """``ncfast.inputs.check_features``, naming the array."""
    array = _as_numpy(array, what)
    try:
        check_features(array)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{what}: {error}") from None
    return array


def _plan_checkpoint(splits, weights, bias, classifier_layer, num_classes):
    """Validate ``write_checkpoint``'s arguments; return the arrays to write."""
    if not isinstance(splits, dict) or not splits:
        raise TypeError("splits must be a non-empty dict {split: {'features': ..., "
                        "'labels': ...}}")
    planned, widths = {}, {}
    for split, arrays in splits.items():
        _check_name(split, "split")
        if not isinstance(arrays, dict) or not isinstance(arrays.get("features"), dict) \
                or not arrays["features"]:
            raise TypeError(f"splits[{split!r}] must be a dict with 'features' (a non-empty "
                            "dict {layer: array}) and 'labels'")
        unknown = set(arrays) - {"features", "labels", "clean_labels"}
        if unknown:
            raise ValueError(f"splits[{split!r}] has unknown keys {sorted(unknown)}; expected "
                             "'features', 'labels', 'clean_labels'")
        features = {}
        for layer, array in arrays["features"].items():
            what = f"splits[{split!r}]['features'][{_check_name(layer, 'layer')!r}]"
            array = _checked_features(array, what)
            if widths.setdefault(layer, array.shape[1]) != array.shape[1]:
                raise ValueError(f"{what} has {array.shape[1]} features but another split has "
                                 f"{widths[layer]}; a layer has one width in every split")
            features[layer] = array
        num_rows = {array.shape[0] for array in features.values()}
        if len(num_rows) != 1:
            raise ValueError(f"splits[{split!r}] has layers with different row counts "
                             f"{sorted(num_rows)}; every layer holds the same samples")
        num_rows = num_rows.pop()
        if arrays.get("labels") is None:
            raise ValueError(f"splits[{split!r}] has no 'labels'")
        labels = _checked_labels(arrays["labels"], f"splits[{split!r}]['labels']", num_rows,
                                 num_classes)
        clean = arrays.get("clean_labels")
        if clean is not None:
            clean = _checked_labels(clean, f"splits[{split!r}]['clean_labels']", num_rows,
                                    num_classes)
        planned[split] = {"features": features, "labels": labels, "clean_labels": clean}
    if weights is None:
        if bias is not None:
            raise ValueError("bias was given without weights; pass weights= as well")
        return {"splits": planned, "weights": None, "bias": None,
                "classifier_layer": classifier_layer}
    if classifier_layer is None:
        if len(widths) != 1:
            raise ValueError(f"the checkpoint has layers {sorted(widths)}; pass "
                             "classifier_layer= to say which one the classifier reads")
        classifier_layer = next(iter(widths))
    if classifier_layer not in widths:
        raise ValueError(f"classifier_layer {classifier_layer!r} is not one of the layers "
                         f"{sorted(widths)}")
    weights = _as_numpy(weights, "weights")
    if weights.shape != (num_classes, widths[classifier_layer]) or \
            not np.issubdtype(weights.dtype, np.floating):
        raise ValueError(f"weights must be a float array of shape (num_classes, n_features) = "
                         f"({num_classes}, {widths[classifier_layer]}); found {weights.shape} "
                         f"{weights.dtype}")
    if bias is not None:
        bias = _as_numpy(bias, "bias")
        if bias.shape != (num_classes,) or not np.issubdtype(bias.dtype, np.floating):
            raise ValueError(f"bias must be a float array of shape ({num_classes},); found "
                             f"{bias.shape} {bias.dtype}")
    return {"splits": planned, "weights": weights, "bias": bias,
            "classifier_layer": classifier_layer}


def read_manifest(path):
    """Load and check a run folder's ``manifest.json``.

    Every field's type and structure is checked, and every path in it must
    lead inside the run folder, so that readers can trust the manifest.

    Parameters
    ----------
    path : str or PathLike
        The run folder.

    Returns
    -------
    dict
        The manifest (schema in the module docstring).

    Raises
    ------
    ValueError
        The manifest is missing, not JSON, of another format or version, or
        malformed; the message names the manifest and the field.
    """
    path = os.fspath(path)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{path}: no {MANIFEST}; a run folder is written by "
                         "ncfast.dumps.RunWriter")
    try:
        with open(manifest_path, encoding="utf-8") as stream:
            manifest = json.load(stream)
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad JSON or UTF-8
        raise ValueError(f"{manifest_path}: not readable JSON ({error}); the file is corrupt: "
                         "restore it or rewrite the run") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path}: not an ncfast run manifest (no \"format\": "
                         f"\"{FORMAT_NAME}\")")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format version {manifest.get('version')!r}; this "
                         f"ncfast reads version {FORMAT_VERSION}: upgrade ncfast")
    _ManifestCheck(manifest_path, path).run(manifest)
    return manifest


#: What ``_ManifestCheck.value`` finds for a key that is not there.
_MISSING = object()

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

#: Shows what a manifest holds in a message: strings (paths) whole, nesting and long lists cut.
_FOUND_REPR = reprlib.Repr()
_FOUND_REPR.maxstring = _FOUND_REPR.maxother = 200

#: The dtypes of features (float) and labels (int) that a manifest may record.
_DTYPE_PATTERN = re.compile(r"float(16|32|64|96|128)|bfloat16|u?int(8|16|32|64)")


def _is_count(value, minimum=0):
    """Whether ``value`` is a JSON integer (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_relative_path(value):
    return isinstance(value, str) and value != "" and "\0" not in value \
        and not os.path.isabs(value) and not os.path.splitdrive(value)[0]


class _ManifestCheck:
    """The checks of one manifest's fields; each refusal names the manifest and the field.

    Fields are named as in ``checkpoints[0].splits["train"].labels.shape``.

    Parameters
    ----------
    manifest_path : str
    run_path : str
        The run folder, which every path in the manifest must lead into.
    """

    def __init__(self, manifest_path, run_path):
        self.manifest_path = manifest_path
        self.run_path = run_path
        self.run_root = os.path.realpath(run_path)

    def refuse(self, field, found, expected):
        found = "missing" if found is _MISSING else _FOUND_REPR.repr(found)
        raise ValueError(f"{self.manifest_path}: {field} is {found}, expected {expected}; the "
                         "manifest was edited or corrupted: restore it or rewrite the run")

    def value(self, mapping, key, field, accept, expected):
        """``mapping[key]``, the manifest's ``field``, refused unless ``accept(value)``."""
        value = mapping.get(key, _MISSING)
        if value is _MISSING or not accept(value):
            self.refuse(field, value, expected)
        return value

    def path_inside(self, mapping, key, field):
        """``mapping[key]``: a relative path that stays inside the run folder, normalised.

        Symbolic links are followed: one leading out of the run folder is refused.
        """
        relative = self.value(mapping, key, field, _is_relative_path,
                              "a path relative to the run folder")
        resolved = os.path.realpath(os.path.join(self.run_path, relative))
        if os.path.commonpath([self.run_root, resolved]) != self.run_root:
            self.refuse(field, relative, f"a path inside the run folder {self.run_root!r}, "
                        f"not one leading to {resolved!r}")
        return os.path.normpath(relative)

    def file_entry(self, mapping, key, field, *, num_rows, ndim, optional=False):
        """Check the file entry ``mapping[key]`` of an array of ``ndim`` dimensions and
        ``num_rows`` rows; ``optional``: it may be null."""
        entry = self.value(mapping, key, field,
                           lambda value: isinstance(value, dict) or optional and value is None,
                           ("null or " if optional else "") + "a file entry {file, shape, "
                           "dtype, bytes, sha256}")
        if entry is None:
            return
        self.path_inside(entry, "file", f"{field}.file")
        shape = self.value(entry, "shape", f"{field}.shape",
                           lambda value: isinstance(value, list) and len(value) == ndim
                           and all(_is_count(size) for size in value),
                           f"a list of {ndim} ints >= 0")
        if shape[0] != num_rows:
            self.refuse(f"{field}.shape", shape, f"{num_rows} rows")
        self.value(entry, "dtype", f"{field}.dtype",
                   lambda value: isinstance(value, str) and _DTYPE_PATTERN.fullmatch(value),
                   "a float or int dtype name ('float32', 'int64')")
        self.value(entry, "bytes", f"{field}.bytes", _is_count, "an int >= 0")
        self.value(entry, "sha256", f"{field}.sha256",
                   lambda value: isinstance(value, str) and _SHA256_PATTERN.fullmatch(value),
                   "a SHA-256 digest (64 lowercase hex digits)")
        if "changed_ns" in entry:
            self.value(entry, "changed_ns", f"{field}.changed_ns", _is_count, "an int >= 0")

    def name(self, value, field, what):
        """Refuse a split or layer name that cannot be a file name."""
        if not _NAME_PATTERN.fullmatch(value):
            self.refuse(field, value, f"{what} names of letters, digits, '_', '-' and '.'")

    def run(self, manifest):
        """Check the whole manifest (a dict with the right format and version)."""
        self.value(manifest, "config", "config", lambda value: True, "the run's configuration")
        num_classes = self.value(manifest, "num_classes", "num_classes",
                                 lambda value: _is_count(value, 2), "an int >= 2")
        self.value(manifest, "class_names", "class_names",
                   lambda value: value is None or isinstance(value, list)
                   and len(value) == num_classes and all(isinstance(name, str) for name in value),
                   f"null or a list of {num_classes} strings")
        checkpoints = self.value(manifest, "checkpoints", "checkpoints",
                                 lambda value: isinstance(value, list), "a list")
        folders = {}
        for index, entry in enumerate(checkpoints):
            field = f"checkpoints[{index}]"
            if not isinstance(entry, dict):
                self.refuse(field, entry, "an object")
            self.checkpoint(entry, field, num_classes,
                            checkpoints[index - 1]["epoch"] if index else None)
            folder = self.path_inside(entry, "path", f"{field}.path")
            if folder in folders:
                self.refuse(f"{field}.path", entry["path"],
                            f"a folder of its own, not that of {folders[folder]}")
            folders[folder] = field

    def checkpoint(self, entry, field, num_classes, previous_epoch):
        """Check one checkpoint entry but its ``path``."""
        self.value(entry, "epoch", f"{field}.epoch",
                   lambda value: _is_count(value) and (previous_epoch is None
                                                       or value > previous_epoch),
                   "an int >= 0" + ("" if previous_epoch is None else
                                    f" after the previous checkpoint's {previous_epoch} "
                                    "(ascending, each epoch once)"))
        splits = self.value(entry, "splits", f"{field}.splits",
                            lambda value: isinstance(value, dict) and value,
                            "an object of one or more splits")
        layers = set()
        for split, arrays in splits.items():
            self.name(split, f"{field}.splits", "split")
            where = f"{field}.splits[{json.dumps(split)}]"
            if not isinstance(arrays, dict):
                self.refuse(where, arrays, "an object {num_rows, labels, clean_labels, "
                            "features}")
            num_rows = self.value(arrays, "num_rows", f"{where}.num_rows", _is_count,
                                  "an int >= 0")
            self.file_entry(arrays, "labels", f"{where}.labels", num_rows=num_rows, ndim=1)
            self.file_entry(arrays, "clean_labels", f"{where}.clean_labels", num_rows=num_rows,
                            ndim=1, optional=True)
            features = self.value(arrays, "features", f"{where}.features",
                                  lambda value: isinstance(value, dict) and value,
                                  "an object of one or more layers")
            for layer in features:
                self.name(layer, f"{where}.features", "layer")
                self.file_entry(features, layer, f"{where}.features[{json.dumps(layer)}]",
                                num_rows=num_rows, ndim=2)
            layers.update(features)
        classifier = self.value(entry, "classifier", f"{field}.classifier",
                                lambda value: value is None or isinstance(value, dict),
                                "null or an object {weights, bias}")
        if classifier is None:
            self.value(entry, "classifier_layer", f"{field}.classifier_layer",
                       lambda value: value is None or isinstance(value, str),
                       "null or a layer name")
            return
        self.value(entry, "classifier_layer", f"{field}.classifier_layer",
                   lambda value: isinstance(value, str) and value in layers,
                   f"the layer the classifier reads, one of {sorted(layers)}")
        self.file_entry(classifier, "weights", f"{field}.classifier.weights",
                        num_rows=num_classes, ndim=2)
        self.file_entry(classifier, "bias", f"{field}.classifier.bias", num_rows=num_classes,
                        ndim=1, optional=True)


@dataclass
class Run:
    """A run folder opened for reading.

    Attributes
    ----------
    path : str
    config : dict
    num_classes : int
    class_names : list of str, or None
    checkpoints : list of CheckpointArrays
        Ascending epoch; each with ``epoch``, ``num_classes`` and
        ``classifier_layer`` set.
    folders : dict of int to str
        Epoch -> the checkpoint's folder.
    """

    path: str
    config: dict
    num_classes: int
    class_names: list | None
    checkpoints: list
    folders: dict

    def checkpoint(self, epoch):
        """The checkpoint of ``epoch``."""
        for checkpoint in self.checkpoints:
            if checkpoint.epoch == epoch:
                return checkpoint
        raise KeyError(f"{self.path}: no checkpoint for epoch {epoch}; found "
                       f"{[item.epoch for item in self.checkpoints]}")


class _LazyNpy(StoredArray):
    """A run-folder ``.npy`` file, opened at its first read."""

    def __init__(self, run_path, entry):
        path = os.path.join(run_path, entry["file"])
        super().__init__(path, None, tuple(entry["shape"]), entry["dtype"],
                         lambda: open_npy_rows(path), entry["sha256"])
        self.recorded_bytes = entry["bytes"]
        self.recorded_changed_ns = entry.get("changed_ns")

    def check(self):
        """Check that the file exists and matches the manifest's shape and dtype."""
        if not os.path.exists(self.path):
            raise ValueError(f"{self.path}: listed in the run manifest but missing; restore "
                             "the file or rewrite the checkpoint")
        problem = file_problem(self.path)
        if problem is not None:
            raise ValueError(f"{self.path}: listed in the run manifest, but {problem}")
        stored = as_array(self.path, "array")
        if stored.shape != self.shape or str(stored.dtype) != self.dtype:
            raise ValueError(f"{self.path}: holds a {stored.dtype} array of shape "
                             f"{stored.shape}, but the manifest says {self.dtype} "
                             f"{self.shape}; the file was replaced: rewrite the checkpoint")


def _lazy(run_path, entry):
    """The ``_LazyNpy`` of a checked file entry, or None for a null one."""
    return None if entry is None else _LazyNpy(run_path, entry)


def open_run(path):
    """Open a run folder: manifest, checkpoints and lazily opened arrays.

    Arrays are opened at their first read; ``StoredArray.rows`` reads row
    blocks, ``StoredArray.read`` the whole array, ``memmap`` maps the file,
    and ``check`` compares the file with the manifest.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    Run
    """
    path = os.fspath(path)
    manifest = read_manifest(path)
    checkpoints, folders = [], {}
    for entry in manifest["checkpoints"]:
        splits = {split: SplitArrays({layer: _lazy(path, item)
                                      for layer, item in arrays["features"].items()},
                                     _lazy(path, arrays["labels"]),
                                     _lazy(path, arrays["clean_labels"]))
                  for split, arrays in entry["splits"].items()}
        classifier = entry["classifier"] or {}
        checkpoints.append(CheckpointArrays(
            splits, _lazy(path, classifier.get("weights")), _lazy(path, classifier.get("bias")),
            entry["classifier_layer"], entry["epoch"], manifest["num_classes"]))
        folders[entry["epoch"]] = os.path.join(path, entry["path"])
    return Run(path, manifest["config"], manifest["num_classes"], manifest["class_names"],
               checkpoints, folders)
