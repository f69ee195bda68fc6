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
4. ``merge_states`` -> one pass-2 state; ``report_of`` -> ``CollapseReport`` (refused
   where a class holds other rows than its mean was built on, a worker's state missing
   or given twice, unless ``held_out=True``: held-out rows against training means).

A state file is a safetensors file (no pickle): the state's arrays, and for
pass 2 the class means it was built on (and the clean-row means, with label
noise) and the classifier, so a loaded state refuses to merge with one built
on other means. Metadata: ``ncfast_state`` (the kind), ``version``,
``global_mean``, the geometry fingerprints and ``digest``, the sha256 of the
whole state, checked on loading whenever the file has one, whatever its version.
Loading also refuses arrays no pass could have summed: each out of its range
(negative counts, non-finite sums, more hits than rows...), or two that break an
identity of the sums (``eigen_scatter`` beyond what ``sq_norm_sums`` allow,
``norm_sums`` against ``sq_norm_sums``, tallies against each other): the only
check of version-3 states, written before the digest.
"""
import hashlib
import json
import os

import numpy as np

from ncfast.accumulators import ClassSums, ResidualStats
from ncfast.dumps import write_atomically
from ncfast.engine import ResidualPass
from ncfast.geometry import PINV_RTOL, Geometry, means_fingerprint
from ncfast.readers import read_error

#: Version 5: a ``ClassSums`` state stores the rounding errors of its float64 sums
#: (``sum_errors``, ``clean_sum_errors``; float64 rows only). Version 4: metadata ``digest``
#: (``_state_digest``). Version 3: the "features" route's NC1 state is ``eigen_scatter``
#: (D,), no longer a D×D ``scatter``.
STATE_VERSION = "5"
#: The version of a state without sum errors, the same file as before version 5: an ncfast
#: that reads version 4 still reads it, and one that does not know version 5 says so about a
#: file with the errors (instead of calling their tensors corruption).
SUMS_ONLY_STATE_VERSION = "4"
#: Version-3 files, written before the digest, still load without one, their arrays checked
#: against the invariants and identities of the sums only: workers' states saved before an
#: upgrade stay mergeable instead of costing another pass over their rows, and are checked
#: more than when they were written. A version-3 file that carries a digest is verified.
UNDIGESTED_STATE_VERSION = "3"
_READ_VERSIONS = (UNDIGESTED_STATE_VERSION, SUMS_ONLY_STATE_VERSION, STATE_VERSION)
_DIGEST_KEY = "digest"
_CORRUPT = "the file is corrupt: save the state again, or re-run the worker that wrote it"
STATE_KINDS = ("ClassSums", "ResidualStats", "ResidualPass")
_PASS2_PARTS = ("stats", "clean_stats", "corrupted_stats")


def _geometry_tensors(prefix, geometry, tensors, metadata):
    tensors[f"{prefix}/means"] = geometry.means
    if geometry.counts is not None:
        tensors[f"{prefix}/counts"] = geometry.counts
    metadata[f"{prefix}/global_mean"] = geometry.global_mean_option
    metadata[f"{prefix}/fingerprint"] = geometry.fingerprint


#: A ``ClassSums``'s arrays in a state file, and those of them a file may leave out (zeros).
_CLASS_SUMS_ARRAYS = ("counts", "sums", "sum_errors", "clean_counts", "clean_sums",
                      "clean_sum_errors")
_SUM_ERRORS = ("sum_errors", "clean_sum_errors")


def _state_tensors(state):
    """``(kind, tensors, metadata)`` of a state."""
    tensors, metadata = {}, {}
    if isinstance(state, ClassSums):
        for name in _CLASS_SUMS_ARRAYS:
            array = getattr(state, name)
            # Errors are saved where there are any (float64 rows), so that the states of
            # float32 rows, and files saved before the errors were kept, stay as they were.
            if array is not None and (name not in _SUM_ERRORS or array.any()):
                tensors[name] = array
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


def _state_digest(tensors, metadata):
    """sha256 (hex) of a state: its metadata (less the digest), then its tensors' names,
    dtypes, shapes and little-endian bytes, in name order."""
    arrays = {name: np.ascontiguousarray(tensors[name], tensors[name].dtype.newbyteorder("<"))
              for name in sorted(tensors)}
    header = {"metadata": {key: value for key, value in metadata.items() if key != _DIGEST_KEY},
              "tensors": [[name, array.dtype.str, list(array.shape)]
                          for name, array in arrays.items()]}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for array in arrays.values():
        digest.update(array.data)  # no copy of the (possibly large) sums
    return digest.hexdigest()


def save_state(path, state):
    """Write a pass state to a safetensors file, atomically, with its digest.

    Parameters
    ----------
    path : str or PathLike
        Destination (conventionally ``*.safetensors``).
    state : ClassSums, ResidualStats or ResidualPass
    """
    from safetensors.numpy import save

    kind, tensors, metadata = _state_tensors(state)
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    version = STATE_VERSION if set(_SUM_ERRORS) & set(tensors) else SUMS_ONLY_STATE_VERSION
    metadata.update({"ncfast_state": kind, "version": version})
    metadata[_DIGEST_KEY] = _state_digest(tensors, metadata)
    data = save(tensors, metadata=metadata)
    write_atomically(os.fspath(path), lambda stream: stream.write(data))


def _check_digest(path, tensors, metadata):
    """Refuse a state whose tensors or metadata differ from those it was saved with.

    Only a state of ``UNDIGESTED_STATE_VERSION`` may lack the digest; one that
    carries it is verified whatever its version (the digest covers the version).

    Returns
    -------
    str
        The digest of the stored content (computed for a state without one).
    """
    digest = _state_digest(tensors, metadata)
    if _DIGEST_KEY not in metadata:
        if metadata["version"] == UNDIGESTED_STATE_VERSION:
            return digest
        raise ValueError(f"{path}: a version-{metadata['version']} state without its digest; "
                         f"{_CORRUPT}")
    if metadata[_DIGEST_KEY] != digest:
        raise ValueError(f"{path}: the state's arrays or metadata do not match the digest they "
                         f"were saved with; {_CORRUPT}")
    return digest


def _load_geometry(path, prefix, tensors, metadata):
    means, counts = tensors[f"{prefix}/means"], tensors.get(f"{prefix}/counts")
    if counts is not None and (counts.dtype != np.int64 or counts.shape != means.shape[:1]):
        raise ValueError(f"{path}: {prefix}/counts has shape {counts.shape} {counts.dtype}, "
                         f"expected {means.shape[:1]} int64, one count per class mean; "
                         f"{_CORRUPT}")
    try:
        geometry = Geometry.from_means(means, counts,
                                       global_mean=metadata[f"{prefix}/global_mean"])
    except ValueError as error:
        raise ValueError(f"{path}: the stored {prefix} is unusable ({error}); {_CORRUPT}") \
            from None
    # The digest, where the file has one, has verified the means already; the fingerprint
    # also covers the global mean that this machine derives from them, which may differ in
    # its last bits from the saving machine's where ncfast took it with BLAS (states of
    # global_mean="samples" before weighted_row_mean). It was taken of the means as stored:
    # the geometry's own writes every NaN row as numpy's NaN, where a stored row may hold
    # another (0/0 gives -NaN on x86).
    if _DIGEST_KEY not in metadata and means_fingerprint(
            means, geometry.global_mean) != metadata[f"{prefix}/fingerprint"]:
        raise ValueError(f"{path}: the stored class means do not match their fingerprint; "
                         f"{_CORRUPT}")
    return geometry


def _fill(path, target, prefix, tensors):
    """Copy the stored sums of ``prefix`` into a fresh state ``target``."""
    names = _CLASS_SUMS_ARRAYS if isinstance(target, ClassSums) else target.sum_names
    for name in names:
        mine = getattr(target, name)
        if mine is None or (name in _SUM_ERRORS and f"{prefix}{name}" not in tensors):
            continue
        stored = tensors[f"{prefix}{name}"]
        if stored.shape != mine.shape or stored.dtype != mine.dtype:
            raise ValueError(f"{path}: {prefix}{name} has shape {stored.shape} {stored.dtype}, "
                             f"expected {mine.shape} {mine.dtype}; {_CORRUPT}")
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
    if not os.path.isfile(path):  # reading a pipe or a device would wait or never end
        return "not a regular file (a pipe, socket or device)"
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


def _incomplete_state(path, name):
    return ValueError(f"{path}: the state file lacks {name!r}; it is incomplete or corrupt: "
                      "save the state again")


def _stored_state(path, kind, tensors, metadata):
    """The state of kind ``kind`` that ``tensors`` hold (KeyError for a missing tensor)."""
    if kind == "ClassSums":
        sums = tensors["sums"]
        if sums.ndim != 2 or 0 in sums.shape:
            raise ValueError(f"{path}: sums has shape {sums.shape}, expected 2-D (classes, "
                             f"features), at least one of each; {_CORRUPT}")
        state = ClassSums(sums.shape[0], sums.shape[1], track_clean="clean_sums" in tensors)
        return _fill(path, state, "", tensors)
    geometry = _load_geometry(path, "geometry", tensors, metadata)
    clean_geometry = None
    if kind == "ResidualPass" and "clean_geometry/means" in tensors:
        clean_geometry = _load_geometry(path, "clean_geometry", tensors, metadata)
    classifier = {"weights": tensors.get("weights"), "bias": tensors.get("bias")}
    try:
        state = ResidualStats(geometry, **classifier) if kind == "ResidualStats" \
            else ResidualPass(geometry, clean_geometry, **classifier)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: the stored classifier is unusable ({error}); {_CORRUPT}") \
            from None
    parts = {"stats": state} if kind == "ResidualStats" else state.parts()
    for part, part_stats in parts.items():
        _fill(path, part_stats, f"{part}/", tensors)
    return state


def _class_sums_invariants(state):
    """``_invariants`` of a ``ClassSums``."""
    checks = []
    for counts_name, sums_name, errors_name in (("counts", "sums", "sum_errors"),
                                                ("clean_counts", "clean_sums",
                                                 "clean_sum_errors")):
        counts = getattr(state, counts_name)
        if counts is not None:
            checks.append((counts_name, counts, counts < 0, "negative"))
            for name in (sums_name, errors_name):
                sums = getattr(state, name)
                checks += [(name, sums, ~np.isfinite(sums), "not finite"),
                           (name, sums, (counts == 0)[:, None] & (sums != 0),
                            "nonzero in a class without rows")]
    if state.track_clean:
        checks.append(("clean_counts", state.clean_counts, state.clean_counts > state.counts,
                       "more than the class's rows (counts)"))
    return checks


def _residual_stats_invariants(stats, prefix):
    """``_invariants`` of a ``ResidualStats`` stored under ``prefix``."""
    counts, totals = stats.counts, stats.totals
    no_rows, no_classifier = counts == 0, stats.weights is None
    checks = [(f"{prefix}eigen_scatter", stats.eigen_scatter, ~np.isfinite(stats.eigen_scatter),
               "not finite"),
              (f"{prefix}counts", counts, counts < 0, "negative"),
              (f"{prefix}counts", counts, ~no_rows & (stats.geometry.label_rows < 0),
               "nonzero in a class without a mean")]
    for name in ("sq_norm_sums", "norm_sums"):
        sums = getattr(stats, name)
        checks += [(f"{prefix}{name}", sums, ~(np.isfinite(sums) & (sums >= 0)),
                    "negative or not finite"),
                   (f"{prefix}{name}", sums, no_rows & (sums != 0),
                    "nonzero in a class without rows")]
    for name in ("ncc_hits", "classifier_hits"):
        hits = getattr(stats, name)
        checks.append((f"{prefix}{name}", hits, (hits < 0) | (hits > counts),
                       "negative or more than the class's rows (counts)"))
    disagreements, corrupted_rows, corrupted_fits = totals
    return checks + [
        (f"{prefix}classifier_hits", stats.classifier_hits,
         no_classifier & (stats.classifier_hits != 0), "nonzero without a classifier"),
        (f"{prefix}totals", totals, totals < 0, "negative"),
        (f"{prefix}totals[0] (disagreements)", disagreements,
         (disagreements > stats.num_rows) | (no_classifier & (disagreements != 0)),
         "more than the rows, or nonzero without a classifier"),
        (f"{prefix}totals[1] (corrupted rows)", corrupted_rows,
         corrupted_rows > stats.num_rows, "more than the rows"),
        (f"{prefix}totals[2] (corrupted fits)", corrupted_fits, corrupted_fits > corrupted_rows,
         "more than the corrupted rows (totals[1])")]


def _pass2_parts(state):
    """``{prefix: ResidualStats}`` of a pass-2 state, as stored."""
    if isinstance(state, ResidualStats):
        return {"stats/": state}
    return {f"{part}/": stats for part, stats in state.parts().items()}


def _invariants(state):
    """The range of each array of a state that passes summed.

    Returns
    -------
    list of (str, array, bool array, str)
        ``(name, values, bad, problem)``: ``bad`` marks the entries of
        ``values`` that break the rule, and ``problem`` says how.
    """
    if isinstance(state, ClassSums):
        return _class_sums_invariants(state)
    parts = _pass2_parts(state)
    checks = [check for prefix, stats in parts.items()
              for check in _residual_stats_invariants(stats, prefix)]
    if isinstance(state, ResidualPass) and state.has_noise:
        # Clean rows keep their label (their rows of each class are some of stats'); corrupted
        # rows go to corrupted_stats under their true label.
        stats, clean, corrupted = state.stats, state.clean_stats, state.corrupted_stats
        checks += [("clean_stats/counts", clean.counts, clean.counts > stats.counts,
                    "more than the class's rows (stats/counts)"),
                   ("the sum of corrupted_stats/counts", corrupted.num_rows,
                    corrupted.num_rows > stats.corrupted_rows,
                    "more than the corrupted rows (stats/totals[1])")]
    return checks


def _eigen_scatter_limits(stats):
    """The values of ``eigen_scatter`` that rows with these ``sq_norm_sums`` can give.

    ``eigen_scatter[j]`` is ``sum_i (p_j . r_i)^2`` over the rows, for orthogonal
    columns ``p_j``: on the "features" route the unit eigenvectors of
    ``Sigma_B``, on the "classes" route ``M~^T v_j``, whose squared norm is the
    Gram eigenvalue ``lambda_j`` (docs/algorithm.md, pass 2). With
    ``s_j = ||p_j||^2`` and ``T = sum_i ||r_i||^2``, the sum of ``sq_norm_sums``,
    Cauchy-Schwarz gives ``0 <= eigen_scatter[j] <= s_j T``, and their sum
    ``sum_i ||P^T r_i||^2`` is at most ``max_j s_j T``. The limits returned are
    these, widened by the rounding of the passes.

    Parameters
    ----------
    stats : ResidualStats
        Its sums in range (``_invariants``).

    Returns
    -------
    lowest : float
        Least value of an entry.
    highest : float64 array of shape (K,)
        Largest value of each entry.
    highest_sum : float
        Largest value of their sum.
    """
    geometry = stats.geometry
    num_rows, num_features = stats.num_rows, geometry.num_features
    num_coordinates = stats.eigen_scatter.size
    column_sq_norms = np.ones(num_coordinates) if stats.route == "features" \
        else np.maximum(geometry.gram_eigenvalues, 0.0)
    column_norms_total = np.sqrt(column_sq_norms.sum())
    # Rounding. A coordinate is a float32 dot product of D terms, the residual and the column
    # each rounded to float32 from float64, and a column is a float64 sum of C' terms (so is
    # the rotation by V of each product z = M~ r that the GPU formed before 2026-11-30: the
    # states it saved keep this slack). An n-term sum is off by at most
    # n 2^-24 (float64: n 2^-53) of the sum of its terms' magnitudes (Higham's gamma_n), so a
    # row's coordinates are within float32_slack sqrt(sum_j s_j) ||r_i|| of P^T r_i, and
    # within underflow more where float32 underflows (2^-150 a rounding).
    float32_slack = (num_features + geometry.present.size + 4) * 2.0 ** -24
    underflow = (num_features + num_coordinates) ** 1.5 * (1.0 + column_norms_total) * 2.0 ** -150
    # Then sqrt(eigen_scatter[j]) <= amplitudes[j] by Minkowski's inequality over the rows.
    amplitudes = (np.sqrt(column_sq_norms) + float32_slack * column_norms_total) \
        * np.sqrt(stats.sq_norm_sums.sum()) + np.sqrt(num_rows) * underflow
    largest = amplitudes.max(initial=0.0) ** 2
    # The float64 sums over the N rows (eigen_scatter's, and T's, whose terms sum D squares)
    # and the GPU's diag(U^T S U) of the "features" route (2K terms more) are off by at most float64_slack of their
    # terms' sum, at most largest: an entry by that, twice over with T's, their sum K times.
    float64_slack = (num_rows + num_features + 2 * num_coordinates) * 2.0 ** -53
    rounding = 2.0 * float64_slack * largest
    return (-rounding, amplitudes ** 2 + rounding,
            largest * (1.0 + (num_coordinates + 2) * float64_slack))


def _residual_stats_identities(stats, prefix):
    """``_identities`` of a ``ResidualStats`` stored under ``prefix``."""
    counts, scatter = stats.counts, stats.eigen_scatter
    lowest, highest, highest_sum = _eigen_scatter_limits(stats)
    allowed = f"the sum of {prefix}sq_norm_sums allows"
    checks = [(f"{prefix}eigen_scatter", scatter, scatter < lowest,
               "below 0 by more than rounding (a sum of squares)"),
              (f"{prefix}eigen_scatter", scatter, scatter > highest,
               f"more than {allowed} for its coordinate"),
              (f"the sum of {prefix}eigen_scatter", scatter.sum(), scatter.sum() > highest_sum,
               f"more than {allowed}")]
    # Per class, sum ||r|| <= sqrt(n sum ||r||^2) <= sqrt(n) sum ||r|| (Cauchy-Schwarz, and
    # ||r|| >= 0). The float64 sums of n terms, the square roots and this check's products
    # round by at most (1.5 n + 6) 2^-53 of a side: 4 (n + 4) 2^-53 bounds it.
    slack = 1.0 + 4.0 * (counts + 4.0) * 2.0 ** -53
    norm_sums, root_sq_norm_sums = stats.norm_sums, np.sqrt(stats.sq_norm_sums)
    checks += [(f"{prefix}norm_sums", norm_sums,
                norm_sums > np.sqrt(counts) * root_sq_norm_sums * slack,
                f"more than sqrt({prefix}counts * {prefix}sq_norm_sums) (Cauchy-Schwarz)"),
               (f"{prefix}sq_norm_sums", stats.sq_norm_sums,
                root_sq_norm_sums > norm_sums * slack,
                f"more than {prefix}norm_sums squared (a sum of squares is at most the "
                "square of the sum)")]
    num_rows = stats.num_rows
    disagreements, corrupted_rows, corrupted_fits = stats.totals
    ncc_hits, classifier_hits = stats.ncc_hits, stats.classifier_hits
    if stats.weights is not None:
        # A row of class c counts in ncc_hits[c] but not in classifier_hits[c] (or the other
        # way) only where the two predictions differ, and where they differ one is wrong.
        checks += [(f"{prefix}totals[0] (disagreements)", disagreements,
                    disagreements < np.abs(ncc_hits - classifier_hits).sum(),
                    "fewer than the rows counted in only one of ncc_hits and classifier_hits"),
                   (f"{prefix}totals[0] (disagreements)", disagreements,
                    disagreements > 2 * num_rows - ncc_hits.sum() - classifier_hits.sum(),
                    "more than the rows that the classifier or the nearest class centre "
                    "predicts wrong (counts less ncc_hits, and less classifier_hits)")]
    # A corrupted row fits when it is predicted as its label: by the classifier if there is
    # one, else by the nearest class centre.
    hits_name, hits = ("ncc_hits", ncc_hits) if stats.weights is None \
        else ("classifier_hits", classifier_hits)
    return checks + [
        (f"{prefix}totals[2] (corrupted fits)", corrupted_fits, corrupted_fits > hits.sum(),
         f"more than the rows predicted as their label (the sum of {prefix}{hits_name})"),
        (f"{prefix}totals[1] - totals[2] (corrupted rows not fitted)",
         corrupted_rows - corrupted_fits, corrupted_rows - corrupted_fits > num_rows - hits.sum(),
         f"more than the rows not predicted as their label (counts less {prefix}{hits_name})")]


def _identities(state):
    """What the arrays of a state that passes summed satisfy together.

    Checked once ``_invariants`` hold: each array is in range.

    Returns
    -------
    list of (str, array, bool array, str)
        As ``_invariants``.
    """
    if isinstance(state, ClassSums):
        return []
    parts = _pass2_parts(state)
    checks = [check for prefix, stats in parts.items()
              for check in _residual_stats_identities(stats, prefix)]
    if isinstance(state, ResidualPass) and state.has_noise:
        # Every row is clean (in clean_stats) or corrupted (flagged in stats).
        stats, clean = state.stats, state.clean_stats
        checks.append(("the sum of stats/counts", stats.num_rows,
                       stats.num_rows != clean.num_rows + stats.corrupted_rows,
                       "not the clean rows (the sum of clean_stats/counts) plus the corrupted "
                       "rows (stats/totals[1])"))
    return checks


def _check_invariants(path, state):
    """Refuse a state holding arrays that no pass could have summed."""
    for rules in (_invariants, _identities):
        for name, values, bad, problem in rules(state):
            bad = np.asarray(bad)
            if bad.any():
                index = np.unravel_index(np.flatnonzero(bad)[0], bad.shape)
                where = f"[{', '.join(map(str, index))}]" if index else ""
                raise ValueError(f"{path}: {name}{where} is {np.asarray(values)[index]}, "
                                 f"{problem}; {_CORRUPT}")


def load_state(path):
    """Read a state written by ``save_state``, verified against its digest and invariants.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    ClassSums, ResidualStats or ResidualPass

    Raises
    ------
    ValueError
        The file is missing, not a state file, truncated or corrupt (its digest
        does not match, or it holds arrays no pass could have summed).
    """
    return _load_with_digest(path)[0]


def _load_with_digest(path):
    """``load_state``, and the state's digest (``_state_digest`` of its stored content)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such state file")
    try:
        found = _other_file_kind(path)
    except OSError as error:  # e.g. not readable by this user
        raise read_error(path, "not a readable state file", error) from None
    if found is not None:
        raise ValueError(f"{path}: {found}; expected {_EXPECTED_STATE}")
    try:
        with safe_open(path, framework="numpy") as stored:
            metadata = stored.metadata() or {}
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    except MemoryError:
        raise
    except Exception as error:  # safetensors raises its own error types on bad files
        raise ValueError(f"{path}: not a readable state file ({type(error).__name__}: "
                         f"{error}); it may be truncated: save the state again") from None
    kind = metadata.get("ncfast_state")
    if kind is None:
        names = ", ".join(sorted(tensors)[:4]) + (", ..." if len(tensors) > 4 else "")
        raise ValueError(f"{path}: not an ncfast state but a safetensors file without its "
                         f"metadata (tensors {names or 'none'}: model weights or features?); "
                         f"expected {_EXPECTED_STATE}")
    if kind not in STATE_KINDS or metadata.get("version") not in _READ_VERSIONS:
        raise ValueError(f"{path}: not an ncfast state file of version "
                         f"{', '.join(_READ_VERSIONS)} (found kind {kind!r}, version "
                         f"{metadata.get('version')!r}); a newer ncfast may have written it: "
                         "upgrade ncfast, or write the state with this one's "
                         "ncfast.states.save_state")
    digest = _check_digest(path, tensors, metadata)
    try:
        state = _stored_state(path, kind, tensors, metadata)
    except KeyError as error:
        raise _incomplete_state(path, error.args[0]) from None
    expected = set(_state_tensors(state)[1])
    if kind == "ClassSums":  # the sums' errors may be stored as zeros by another writer
        expected |= set(_SUM_ERRORS) & set(tensors)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise _incomplete_state(path, missing[0])
    if unexpected:
        raise ValueError(f"{path}: holds tensors a {kind} state does not have "
                         f"({', '.join(unexpected)}); {_CORRUPT}")
    _check_invariants(path, state)
    return state, digest


def merge_states(paths):
    """Load state files and add them up.

    Parameters
    ----------
    paths : str, PathLike or iterable of them
        States of one kind (a single path is one state); pass-2 states must be
        built on the same class means and classifier. A state with rows given
        twice (under any name: its stored content is compared) is refused, as it
        would count its rows twice.

    Returns
    -------
    ClassSums, ResidualStats or ResidualPass

    Notes
    -----
    A merge of some workers' states is a state too: whether a pass-2 state
    holds every row behind its class means is checked by ``report_of``.
    """
    # A path is iterable (a str by character); an iterator (folder.glob) is true when empty.
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("no state files given; pass at least one")
    merged, first_path = None, None
    seen = {}
    for path in paths:
        state, digest = _load_with_digest(path)
        if _num_rows(state) > 0:
            if digest in seen:
                raise ValueError(f"{os.fspath(path)} holds the same state as {seen[digest]}; "
                                 "merging it twice would count its rows twice: pass each "
                                 "worker's state once")
            seen[digest] = os.fspath(path)
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


def _num_rows(state):
    """Rows a loaded state summed (every row, for a pass-2 state with label noise)."""
    counts = state.stats.counts if isinstance(state, ResidualPass) else state.counts
    return int(counts.sum())


def check_pass2_coverage(state, *, held_out_option="held_out=True"):
    """Compare the rows of a merged pass-2 state with the rows behind its class means.

    Parameters
    ----------
    state : ResidualStats or ResidualPass
    held_out_option : str
        How the caller says that the rows are not those behind the means, named
        in the error (``ncfast merge``: ``--held-out``).

    Returns
    -------
    str
        A one-line account (rows merged, rows behind the means).

    Raises
    ------
    ValueError
        Some class has another number of rows than its mean was built on: a
        worker's state is missing, or one was given twice.
    """
    stats = getattr(state, "stats", state)
    expected = stats.geometry.counts
    merged = stats.counts
    if expected is None:
        return (f"{int(merged.sum()):,} rows; the class means carry no row counts, so whether "
                "every worker's state is here cannot be checked")
    if np.array_equal(merged, expected):
        return f"{int(merged.sum()):,} rows, every row behind the class means"
    differing = np.flatnonzero(merged != expected)
    shown = ", ".join(f"class {c}: {merged[c]:,} of {expected[c]:,}" for c in differing[:5])
    more = f" and {differing.size - 5} more classes" if differing.size > 5 else ""
    problem = ("a worker's state is missing" if (merged <= expected).all()
               else "a state may be given twice, or belong to another run")
    raise ValueError(
        f"the pass-2 states hold {int(merged.sum()):,} rows but the class means were built on "
        f"{int(expected.sum()):,} ({shown}{more}): {problem}. Pass every worker's pass-2 "
        f"state once; or {held_out_option} if these rows are not the ones behind the means "
        "(held-out features measured against training means)")


def report_of(state, *, held_out=False, pinv_rtol=PINV_RTOL):
    """The ``CollapseReport`` of a merged pass-2 state.

    Parameters
    ----------
    state : ResidualStats or ResidualPass
    held_out : bool
        The rows are not those behind the class means (held-out features
        measured against training means): their counts are not checked.
    pinv_rtol : float

    Returns
    -------
    CollapseReport

    Raises
    ------
    ValueError
        Unless ``held_out``: some class has another number of rows than its
        mean was built on (``check_pass2_coverage``), as when a worker's state
        is missing from the merge. Means given without row counts are not checked.
    """
    if isinstance(state, ResidualStats):
        whole = ResidualPass(state.geometry, weights=state.weights, bias=state.bias)
        whole.stats += state
        state = whole
    if not isinstance(state, ResidualPass):
        raise TypeError(f"a report needs a pass-2 state; found {type(state).__name__} (pass 1: "
                        "geometry, clean_geometry = ncfast.finalize_pass1(class_sums), then "
                        "run pass 2 with ResidualPass(geometry, clean_geometry))")
    if not held_out:
        check_pass2_coverage(state)
    return state.report(pinv_rtol=pinv_rtol)
