"""Save partial pass states to small files, load them back, and merge them.

Processes or machines that each stream part of the rows save their state
(``ClassSums`` of pass 1; ``ResidualStats`` or ``ResidualPass`` of pass 2)
with ``save_state``; ``merge_states`` adds them up, exactly and in any order,
because every state is a set of sums (docs/algorithm.md). The workflow:

1. each worker: ``ClassSums`` over its rows -> ``save_state``;
2. ``merge_states`` (or ``ncfast merge``) -> the pass-1 state of all rows,
   saved again; ``ncfast.finalize_pass1`` gives its ``Geometry`` (and the clean
   rows' one, with label noise);
3. each worker: ``ResidualPass(geometry, ...)`` over its rows -> ``save_state``;
4. ``merge_states`` -> one pass-2 state; ``report_of`` -> ``CollapseReport``.

A state file is a safetensors file (no pickle): the state's arrays, and for
pass 2 the class means it was built on (and the clean-row means, with label
noise) and the classifier, so a loaded state refuses to merge with one built
on other means. Metadata: ``ncfast_state`` (the kind), ``version``,
``global_mean`` and the geometry fingerprints, checked on loading.
"""
import os

import numpy as np

from ncfast.accumulators import ClassSums, ResidualStats
from ncfast.dumps import write_atomically
from ncfast.engine import ResidualPass
from ncfast.geometry import PINV_RTOL, Geometry

#: Version 3: the "features" route's NC1 state is ``eigen_scatter`` (D,), no longer a D×D
#: ``scatter``.
STATE_VERSION = "3"
STATE_KINDS = ("ClassSums", "ResidualStats", "ResidualPass")
_PASS2_PARTS = ("stats", "clean_stats", "corrupted_stats")


def _geometry_tensors(prefix, geometry, tensors, metadata):
    tensors[f"{prefix}/means"] = geometry.means
    if geometry.counts is not None:
        tensors[f"{prefix}/counts"] = geometry.counts
    metadata[f"{prefix}/global_mean"] = geometry.global_mean_option
    metadata[f"{prefix}/fingerprint"] = geometry.fingerprint


def _state_tensors(state):
    """``(kind, tensors, metadata)`` of a state."""
    tensors, metadata = {}, {}
    if isinstance(state, ClassSums):
        for name in ("counts", "sums", "clean_counts", "clean_sums"):
            if getattr(state, name) is not None:
                tensors[name] = getattr(state, name)
        return "ClassSums", tensors, metadata
    if isinstance(state, ResidualStats):
        kind, parts = "ResidualStats", {"stats": state}
    elif isinstance(state, ResidualPass):
        kind = "ResidualPass"
        parts = {name: getattr(state, name) for name in _PASS2_PARTS
                 if getattr(state, name) is not None}
    else:
        raise TypeError(f"cannot save a {type(state).__name__}; save a ClassSums, "
                        "ResidualStats or ResidualPass")
    stats = parts["stats"]
    _geometry_tensors("geometry", stats.geometry, tensors, metadata)
    if "clean_stats" in parts:
        _geometry_tensors("clean_geometry", parts["clean_stats"].geometry, tensors, metadata)
    if stats.weights is not None:
        tensors["weights"], tensors["bias"] = stats.weights, stats.bias
    for part, part_stats in parts.items():
        for name in part_stats.sum_names:
            tensors[f"{part}/{name}"] = getattr(part_stats, name)
    return kind, tensors, metadata


def save_state(path, state):
    """Write a pass state to a safetensors file, atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination (conventionally ``*.safetensors``).
    state : ClassSums, ResidualStats or ResidualPass
    """
    from safetensors.numpy import save

    kind, tensors, metadata = _state_tensors(state)
    metadata.update({"ncfast_state": kind, "version": STATE_VERSION})
    data = save({name: np.ascontiguousarray(array) for name, array in tensors.items()},
                metadata=metadata)
    write_atomically(os.fspath(path), lambda stream: stream.write(data))


def _load_geometry(path, prefix, tensors, metadata):
    geometry = Geometry.from_means(tensors[f"{prefix}/means"], tensors.get(f"{prefix}/counts"),
                                   global_mean=metadata[f"{prefix}/global_mean"])
    if geometry.fingerprint != metadata[f"{prefix}/fingerprint"]:
        raise ValueError(f"{path}: the stored class means do not match their fingerprint; the "
                         "file is corrupt: save the state again")
    return geometry


def _fill(path, target, prefix, tensors):
    """Copy the stored sums of ``prefix`` into a fresh state ``target``."""
    names = ("counts", "sums", "clean_counts", "clean_sums") if isinstance(target, ClassSums) \
        else target.sum_names
    for name in names:
        mine = getattr(target, name)
        if mine is None:
            continue
        stored = tensors[f"{prefix}{name}"]
        if stored.shape != mine.shape or stored.dtype != mine.dtype:
            raise ValueError(f"{path}: {prefix}{name} has shape {stored.shape} {stored.dtype}, "
                             f"expected {mine.shape} {mine.dtype}; the file is corrupt")
        mine[...] = stored
    return target


_EXPECTED_STATE = ("a pass state written by ncfast.states.save_state (one .safetensors file "
                   "per worker and pass)")


def _other_file_kind(path):
    """What ``path`` is when it is plainly not a state file (a folder, an array, text), else None.

    A state file is safetensors: an 8-byte header length, then a JSON header.
    """
    if os.path.isdir(path):
        states = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
        hint = (f" holding {len(states)} .safetensors file(s): pass those "
                f"({os.path.join(path, '*.safetensors')})" if states else "")
        return f"a folder{hint}"
    with open(path, "rb") as stream:
        head = stream.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array (features or labels?), not a state"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a NumPy .npz or a torch checkpoint), not a state"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file, not a state"
    if len(head) > 8 and head[8:9] == b"{":
        return None  # safetensors
    try:
        first_line = head.decode("utf-8").splitlines()[0].strip()
    except (UnicodeDecodeError, IndexError):
        return None  # unknown binary: safetensors' own error says more
    kind = "JSON" if first_line.startswith(("{", "[")) else "CSV" if "," in first_line else ""
    return (f"a {kind + ' ' if kind else ''}text file starting {first_line[:40]!r} (results "
            "such as metrics.csv or metrics.json?), not a state")


def load_state(path):
    """Read a state written by ``save_state``.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    ClassSums, ResidualStats or ResidualPass

    Raises
    ------
    ValueError
        The file is missing, not a state file, truncated or corrupt.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such state file")
    found = _other_file_kind(path)
    if found is not None:
        raise ValueError(f"{path}: {found}; expected {_EXPECTED_STATE}")
    try:
        with safe_open(path, framework="numpy") as stored:
            metadata = stored.metadata() or {}
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    except Exception as error:  # safetensors raises its own error types on bad files
        raise ValueError(f"{path}: not a readable state file ({type(error).__name__}: "
                         f"{error}); it may be truncated: save the state again") from None
    kind = metadata.get("ncfast_state")
    if kind is None:
        names = ", ".join(sorted(tensors)[:4]) + (", ..." if len(tensors) > 4 else "")
        raise ValueError(f"{path}: not an ncfast state but a safetensors file without its "
                         f"metadata (tensors {names or 'none'}: model weights or features?); "
                         f"expected {_EXPECTED_STATE}")
    if kind not in STATE_KINDS or metadata.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: not an ncfast state file of version {STATE_VERSION} "
                         f"(found kind {kind!r}, version {metadata.get('version')!r}); write it "
                         "with ncfast.states.save_state")
    try:
        if kind == "ClassSums":
            sums = tensors["sums"]
            state = ClassSums(sums.shape[0], sums.shape[1], track_clean="clean_sums" in tensors)
            return _fill(path, state, "", tensors)
        geometry = _load_geometry(path, "geometry", tensors, metadata)
        classifier = {"weights": tensors.get("weights"), "bias": tensors.get("bias")}
        if kind == "ResidualStats":
            return _fill(path, ResidualStats(geometry, **classifier), "stats/", tensors)
        clean_geometry = None
        if "clean_geometry/means" in tensors:
            clean_geometry = _load_geometry(path, "clean_geometry", tensors, metadata)
        state = ResidualPass(geometry, clean_geometry, **classifier)
        for part in _PASS2_PARTS:
            if getattr(state, part) is not None:
                _fill(path, getattr(state, part), f"{part}/", tensors)
        return state
    except KeyError as error:
        raise ValueError(f"{path}: the state file lacks {error}; it is incomplete or corrupt: "
                         "save the state again") from None


def merge_states(paths):
    """Load state files and add them up.

    Parameters
    ----------
    paths : sequence of str or PathLike
        States of one kind; pass-2 states must be built on the same class
        means and classifier.

    Returns
    -------
    ClassSums, ResidualStats or ResidualPass
    """
    if not paths:
        raise ValueError("no state files given; pass at least one")
    merged, first_path = None, None
    for path in paths:
        state = load_state(path)
        if merged is None:
            merged, first_path = state, os.fspath(path)
            continue
        if type(state) is not type(merged):
            raise ValueError(f"{os.fspath(path)}: a {type(state).__name__} state cannot merge "
                             f"with {first_path}, a {type(merged).__name__}; merge states of "
                             "one pass at a time")
        try:
            merged += state
        except (ValueError, TypeError) as error:
            raise ValueError(f"{os.fspath(path)}: cannot merge with {first_path}: {error}") \
                from None
    return merged


def report_of(state, *, pinv_rtol=PINV_RTOL):
    """The ``CollapseReport`` of a merged pass-2 state.

    Parameters
    ----------
    state : ResidualStats or ResidualPass
    pinv_rtol : float

    Returns
    -------
    CollapseReport
    """
    if isinstance(state, ResidualStats):
        whole = ResidualPass(state.geometry, weights=state.weights, bias=state.bias)
        whole.stats += state
        state = whole
    if not isinstance(state, ResidualPass):
        raise TypeError(f"a report needs a pass-2 state; found {type(state).__name__} (pass 1: "
                        "build the Geometry with ncfast.finalize_pass1 and run pass 2)")
    return state.report(pinv_rtol=pinv_rtol)
