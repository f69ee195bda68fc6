"""Saved pass states: a file whose bytes changed, or that holds arrays no pass could have
summed, is refused by name instead of merging into wrong results.

``save_state`` stores a digest of the whole state; ``load_state`` verifies it
whenever a file carries one, and checks every array against the invariants of
``ClassSums`` and ``ResidualStats``, and the arrays against the identities
between them (the only check of version-3 files, written before the digest).
"""
import hashlib
import json
import os
import platform
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors
from safetensors import safe_open
from safetensors.numpy import save_file

from cases import gaussian_classes, with_label_noise
from ncfast import ClassSums, ResidualStats
from ncfast.cli import main
from ncfast.engine import ResidualPass, finalize_pass1
from ncfast.geometry import Geometry
from ncfast.states import (STATE_VERSION, SUMS_ONLY_STATE_VERSION, UNDIGESTED_STATE_VERSION, load_state, merge_states,
                           report_of, save_state)

CLASSES, FEATURES = 3, 6
CORRUPT = "the file is corrupt: save the state again, or re-run the worker that wrote it"


def _noisy_case():
    return with_label_noise(gaussian_classes(300, FEATURES, CLASSES, seed=4), rate=0.25)


@pytest.fixture
def pass1_path(tmp_path):
    """A worker's pass-1 state with clean-row sums."""
    case = _noisy_case()
    sums = ClassSums(CLASSES, FEATURES, track_clean=True)
    sums.update(case["features"], case["labels"], case["clean_labels"])
    save_state(tmp_path / "pass1-0.safetensors", sums)
    return tmp_path / "pass1-0.safetensors"


@pytest.fixture
def pass2_path(tmp_path):
    """A worker's pass-2 state with a classifier and label noise (three parts)."""
    case = _noisy_case()
    sums = ClassSums(CLASSES, FEATURES, track_clean=True)
    sums.update(case["features"], case["labels"], case["clean_labels"])
    state = ResidualPass(*finalize_pass1(sums), weights=case["weights"], bias=case["bias"])
    state.update(case["features"], case["labels"], case["clean_labels"])
    save_state(tmp_path / "pass2-0.safetensors", state)
    return tmp_path / "pass2-0.safetensors"


def _read(path):
    with safe_open(path, framework="numpy") as stored:
        return {name: stored.get_tensor(name) for name in stored.keys()}, stored.metadata()


def _tensor_names(path):
    return sorted(_read(path)[0])


def _flip_byte(path, name):
    """Flip every bit of one byte in the middle of tensor ``name``'s data, in place."""
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    start, stop = json.loads(data[8:8 + header_size])[name]["data_offsets"]
    data[8 + header_size + (start + stop) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite(path, change, *, version=SUMS_ONLY_STATE_VERSION):
    """Rewrite the state file with ``change(tensors, metadata)`` applied, keeping its digest,
    or as a version-3 file without one."""
    tensors, metadata = _read(path)
    change(tensors, metadata)
    if version == UNDIGESTED_STATE_VERSION:
        metadata.pop("digest", None)
    save_file(tensors, path, metadata={**metadata, "version": version})


def _set(name, make):
    """A ``change`` for ``_rewrite`` that sets tensor ``name`` to ``make(tensors)``."""
    return lambda tensors, metadata: tensors.__setitem__(name, make(tensors))


def _plus_one(name, index=0):
    def make(tensors):
        changed = tensors[name].copy()
        changed[index] += 1
        return changed
    return make


# --- the digest ------------------------------------------------------------------------------

def test_a_saved_state_carries_its_digest_and_loads_unchanged(pass1_path, pass2_path):
    for path in (pass1_path, pass2_path):
        _, metadata = _read(path)
        assert metadata["version"] == SUMS_ONLY_STATE_VERSION and len(metadata["digest"]) == 64
        again = path.with_name("again.safetensors")
        save_state(again, load_state(path))
        assert _read(again)[1]["digest"] == metadata["digest"]


@pytest.mark.parametrize("which", ["pass1", "pass2"])
def test_one_flipped_byte_in_any_tensor_is_refused(pass1_path, pass2_path, which):
    path = pass1_path if which == "pass1" else pass2_path
    original = path.read_bytes()
    for name in _tensor_names(path):
        path.write_bytes(original)
        _flip_byte(path, name)
        with pytest.raises(ValueError, match=rf"{path.name}: the state's arrays or metadata do "
                                             rf"not match the digest .*{CORRUPT}"):
            load_state(path)


@pytest.mark.parametrize("change", [
    lambda tensors, metadata: metadata.__setitem__("geometry/global_mean", "samples"),
    lambda tensors, metadata: tensors.__setitem__("stats/counts", tensors["stats/counts"] + 1),
    lambda tensors, metadata: tensors.pop("clean_stats/norm_sums"),
    lambda tensors, metadata: tensors.__setitem__("extra", np.zeros(2)),
], ids=["metadata", "in-range counts", "a tensor removed", "a tensor added"])
def test_any_change_to_a_saved_state_is_refused(pass2_path, change):
    _rewrite(pass2_path, change)
    with pytest.raises(ValueError, match=f"pass2-0.safetensors: the state's arrays or metadata "
                                         f"do not match the digest .*{CORRUPT}"):
        load_state(pass2_path)


def test_a_current_state_without_its_digest_is_refused(pass1_path):
    _rewrite(pass1_path, lambda tensors, metadata: metadata.pop("digest"))
    with pytest.raises(ValueError, match=f"pass1-0.safetensors: a version-{SUMS_ONLY_STATE_VERSION} "
                                         f"state without its digest; {CORRUPT}"):
        load_state(pass1_path)


def test_a_digest_is_checked_whatever_the_version(pass2_path):
    """Arrays edited consistently, and the version set to 3, in a state that keeps its digest."""
    tensors, metadata = _read(pass2_path)
    for name in ("stats/sq_norm_sums", "stats/eigen_scatter"):
        tensors[name] = tensors[name] * 50
    save_file(tensors, pass2_path, metadata={**metadata, "version": UNDIGESTED_STATE_VERSION})
    with pytest.raises(ValueError, match="pass2-0.safetensors: the state's arrays or metadata "
                                         f"do not match the digest .*{CORRUPT}"):
        load_state(pass2_path)


def test_merge_refuses_a_flipped_worker_state_and_writes_nothing(pass1_path, tmp_path, capsys):
    case = gaussian_classes(90, FEATURES, CLASSES, seed=6)
    other = tmp_path / "pass1-1.safetensors"
    save_state(other, ClassSums(CLASSES, FEATURES, track_clean=True).update(
        case["features"], case["labels"], case["labels"]))
    _flip_byte(pass1_path, "counts")
    out = tmp_path / "merged"
    assert main(["merge", str(pass1_path), str(other), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "pass1-0.safetensors: the state's arrays or metadata do not match" in printed.err
    assert printed.out == "" and not out.exists()


# --- version-3 states, written before the digest: the invariants -----------------------------

def test_running_out_of_memory_is_not_called_a_truncated_state(pass1_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 8.00 TiB")

    monkeypatch.setattr(safetensors, "safe_open", out_of_memory)
    with pytest.raises(MemoryError, match="8.00 TiB"):
        load_state(pass1_path)


def test_a_version_3_state_still_loads(pass1_path, pass2_path, tmp_path, capsys):
    saved_pass1, saved_pass2 = load_state(pass1_path), load_state(pass2_path)
    for path in (pass1_path, pass2_path):
        _rewrite(path, lambda tensors, metadata: None, version=UNDIGESTED_STATE_VERSION)
    assert load_state(pass1_path) == saved_pass1
    loaded_pass2 = load_state(pass2_path)
    assert all(getattr(loaded_pass2, part) == getattr(saved_pass2, part)
               for part in ("stats", "clean_stats", "corrupted_stats"))
    assert main(["merge", str(pass1_path), "--out", str(tmp_path / "merged")]) == 0
    assert _read(tmp_path / "merged/pass1.safetensors")[1]["version"] == SUMS_ONLY_STATE_VERSION


def test_a_version_3_state_with_negative_nan_rows_loads(tmp_path):
    """The fingerprint of a version-3 file was taken of the means as stored; a geometry
    writes its NaN rows as numpy's NaN, so a file whose empty classes hold -NaN (what
    0/0 gives on x86) was refused as corrupt once the geometry formed its NaN rows itself."""
    case = gaussian_classes(200, FEATURES, CLASSES, seed=9)
    means = np.array([case["features"][case["labels"] == c].mean(axis=0)
                      for c in range(CLASSES)])
    means[1] = -np.nan
    assert np.signbit(means[1]).all()
    state = ResidualPass(Geometry.from_means(means))
    kept = case["labels"] != 1
    state.update(case["features"][kept], case["labels"][kept])
    path = tmp_path / "pass2-v3.safetensors"
    save_state(path, state)

    def as_written_then(tensors, metadata):
        tensors["geometry/means"] = means  # the -NaN row, as the older geometry kept it
        metadata["geometry/fingerprint"] = hashlib.sha1(
            means.tobytes() + state.stats.geometry.global_mean.tobytes()).hexdigest()

    _rewrite(path, as_written_then, version=UNDIGESTED_STATE_VERSION)
    loaded = load_state(path)
    assert loaded.stats == state.stats
    assert report_of(loaded) == report_of(state)


def test_a_state_of_a_newer_version_is_refused_by_name(pass1_path):
    """A version this ncfast does not know (a newer ncfast's) is named, with the way out."""
    _rewrite(pass1_path, lambda tensors, metadata: None, version="6")
    with pytest.raises(ValueError, match=r"pass1-0.safetensors: not an ncfast state file of "
                                         rf"version 3, 4, {STATE_VERSION} \(found kind "
                                         r"'ClassSums', version '6'\); a newer ncfast may have "
                                         r"written it: upgrade ncfast"):
        load_state(pass1_path)


@pytest.mark.parametrize("change, message", [
    (_set("sums", lambda t: t["sums"][:, 0].copy()),
     r"sums has shape \(3,\), expected 2-D \(classes, features\), at least one of each"),
    (_set("sums", lambda t: t["sums"][:0].copy()),
     r"sums has shape \(0, 6\), expected 2-D \(classes, features\), at least one of each"),
    (_set("counts", lambda t: t["counts"].astype(np.float64)),
     r"counts has shape \(3,\) float64, expected \(3,\) int64"),
    (_set("counts", lambda t: -t["counts"]), r"counts\[0\] is -\d+, negative"),
    (_set("sums", lambda t: np.full_like(t["sums"], np.nan)), r"sums\[0, 0\] is nan, not finite"),
    (_set("counts", lambda t: np.zeros_like(t["counts"])),
     r"sums\[0, 0\] is \S+, nonzero in a class without rows"),
    (_set("clean_counts", lambda t: t["counts"] + 1),
     r"clean_counts\[0\] is \d+, more than the class's rows \(counts\)"),
    (_set("extra", lambda t: np.zeros(2)),
     r"holds tensors a ClassSums state does not have \(extra\)"),
    (_set("sum_errors", lambda t: np.full_like(t["sums"], np.inf)),
     r"sum_errors\[0, 0\] is inf, not finite"),
], ids=["sums 1-D", "no classes", "counts float", "counts negative", "sums NaN",
        "sums without rows", "more clean rows than rows", "extra tensor", "sum_errors inf"])
def test_impossible_pass1_arrays_are_refused(pass1_path, change, message):
    _rewrite(pass1_path, change, version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=f"pass1-0.safetensors: {message}; {CORRUPT}"):
        load_state(pass1_path)


@pytest.mark.parametrize("change, message", [
    (_set("stats/counts", lambda t: -t["stats/counts"]), r"stats/counts\[0\] is -\d+, negative"),
    (_set("stats/eigen_scatter", lambda t: np.full_like(t["stats/eigen_scatter"], np.inf)),
     r"stats/eigen_scatter\[0\] is inf, not finite"),
    (_set("stats/sq_norm_sums", lambda t: -t["stats/sq_norm_sums"]),
     r"stats/sq_norm_sums\[0\] is -\S+, negative or not finite"),
    (_set("clean_stats/norm_sums", lambda t: np.full_like(t["clean_stats/norm_sums"], np.nan)),
     r"clean_stats/norm_sums\[0\] is nan, negative or not finite"),
    (_set("stats/ncc_hits", lambda t: t["stats/counts"] + 1),
     r"stats/ncc_hits\[0\] is \d+, negative or more than the class's rows \(counts\)"),
    (_set("stats/totals", lambda t: t["stats/totals"] * [1, 1, 0]
          + [0, 0, t["stats/totals"][1] + 1]),
     r"stats/totals\[2\] \(corrupted fits\) is \d+, more than the corrupted rows"),
    (_set("clean_stats/counts", _plus_one("stats/counts")),
     r"clean_stats/counts\[0\] is \d+, more than the class's rows \(stats/counts\)"),
    (_set("corrupted_stats/counts", lambda t: t["corrupted_stats/counts"] + t["stats/totals"][1]),
     r"the sum of corrupted_stats/counts is \d+, more than the corrupted rows"),
    (_set("geometry/counts", lambda t: t["geometry/counts"][:2].copy()),
     r"geometry/counts has shape \(2,\) int64, expected \(3,\) int64"),
    (_set("geometry/means", lambda t: t["geometry/means"][:, 0].copy()),
     r"the stored geometry is unusable \(means must be 2-D"),
    (_set("weights", lambda t: np.full_like(t["weights"], np.nan)),
     r"the stored classifier is unusable \(weights or bias contain NaN"),
    (lambda tensors, metadata: tensors.pop("bias"), None),
], ids=["counts negative", "eigen_scatter inf", "sq_norm_sums negative", "norm_sums NaN",
        "more hits than rows", "more corrupted fits than corrupted rows",
        "more clean rows than rows", "more corrupted rows measured than flagged",
        "geometry counts short", "means 1-D", "weights NaN", "bias missing"])
def test_impossible_pass2_arrays_are_refused(pass2_path, change, message):
    _rewrite(pass2_path, change, version=UNDIGESTED_STATE_VERSION)
    if message is None:
        message = "the state file lacks 'bias'; it is incomplete or corrupt"
    else:
        message += f".*; {CORRUPT}"
    with pytest.raises(ValueError, match=f"pass2-0.safetensors: {message}"):
        load_state(pass2_path)


def test_classifier_tallies_without_a_classifier_are_refused(tmp_path):
    case = gaussian_classes(120, FEATURES, CLASSES, seed=5)
    geometry, _ = finalize_pass1(ClassSums(CLASSES, FEATURES).update(case["features"],
                                                                     case["labels"]))
    path = tmp_path / "pass2.safetensors"
    save_state(path, ResidualStats(geometry).update(case["features"], case["labels"]))
    _rewrite(path, _set("stats/classifier_hits", lambda t: np.ones_like(t["stats/counts"])),
             version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=r"pass2.safetensors: stats/classifier_hits\[0\] is 1, "
                                         "nonzero without a classifier"):
        load_state(path)


# --- version-3 states: identities between the sums ------------------------------------------

def _pass2_state(num_classes, num_features, features, labels, *, corrupted=None,
                 weights=None, bias=None):
    """A ``ResidualStats`` of ``features`` against the means of their classes."""
    sums = ClassSums(num_classes, num_features).update(features, labels)
    geometry, _ = finalize_pass1(sums)
    return ResidualStats(geometry, weights=weights, bias=bias).update(features, labels,
                                                                      corrupted)


@pytest.fixture(params=["classes", "features"])
def route_path(request, tmp_path):
    """A pass-2 state with a classifier, on the route of the parameter (C' <= D or not)."""
    num_classes, num_features = (CLASSES, FEATURES) if request.param == "classes" else (8, 3)
    case = gaussian_classes(400, num_features, num_classes, seed=7)
    state = _pass2_state(num_classes, num_features, case["features"], case["labels"],
                         weights=case["weights"], bias=case["bias"])
    assert state.route == request.param
    save_state(tmp_path / "pass2.safetensors", state)
    return tmp_path / "pass2.safetensors"


@pytest.mark.parametrize("change, message", [
    (_set("stats/eigen_scatter", lambda t: t["stats/eigen_scatter"] * -1e6),
     r"stats/eigen_scatter\[\d\] is -\S+, below 0 by more than rounding"),
    (_set("stats/eigen_scatter", lambda t: t["stats/eigen_scatter"] * 50),
     r"stats/eigen_scatter\[\d\] is \S+, more than the sum of stats/sq_norm_sums allows for "
     "its coordinate"),
    (_set("stats/sq_norm_sums", lambda t: t["stats/sq_norm_sums"] / 50),
     r"stats/eigen_scatter\[\d\] is \S+, more than the sum of stats/sq_norm_sums allows"),
], ids=["negative", "50 times", "residuals 50 times smaller"])
def test_eigen_scatter_beyond_what_the_residuals_allow_is_refused(route_path, change, message):
    _rewrite(route_path, change, version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=f"pass2.safetensors: {message}.*; {CORRUPT}"):
        load_state(route_path)


@pytest.mark.parametrize("route_path", ["features"], indirect=True)
def test_an_eigen_scatter_whose_sum_exceeds_the_residuals_is_refused(route_path):
    """Half the squared norms in each of the 3 unit directions: each entry possible, not all."""
    _rewrite(route_path, _set("stats/eigen_scatter", lambda t: np.full_like(
        t["stats/eigen_scatter"], t["stats/sq_norm_sums"].sum() / 2)),
        version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=r"pass2.safetensors: the sum of stats/eigen_scatter is "
                                         r"\S+, more than the sum of stats/sq_norm_sums allows"):
        load_state(route_path)


@pytest.mark.parametrize("route, num_classes, num_features",
                         [("classes", 3, 6), ("classes", 10, 600), ("features", 8, 3)])
def test_states_at_the_limits_of_the_identities_load(tmp_path, route, num_classes,
                                                     num_features):
    """Every residual along one eigen-direction: its coordinate is as large as the residuals
    allow, up to rounding (the classes route's float32 coordinates exceed it by about 1e-7)."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(num_classes, num_features)) * 3.0
    centred = means - means.mean(axis=0)
    if route == "classes":
        direction = centred.T @ np.linalg.eigh(centred @ centred.T)[1][:, -1]
    else:
        direction = np.linalg.eigh(centred.T @ centred)[1][:, 0]
    direction /= np.linalg.norm(direction)
    labels = np.repeat(np.arange(num_classes), 4)
    # Offsets of zero mean per class keep the class means.
    offsets = np.tile([1.0, -1.0, 2.0, -2.0], num_classes)
    features = (means[labels] + offsets[:, None] * direction).astype(np.float32)
    state = _pass2_state(num_classes, num_features, features, labels)
    assert state.route == route
    scale = state.geometry.gram_eigenvalues[-1] if route == "classes" else 1.0
    ratio = state.eigen_scatter.max() / (scale * state.sq_norm_sums.sum())
    assert ratio == pytest.approx(1.0, abs=1e-6)
    save_state(tmp_path / "pass2.safetensors", state)
    _rewrite(tmp_path / "pass2.safetensors", lambda tensors, metadata: None,
             version=UNDIGESTED_STATE_VERSION)
    load_state(tmp_path / "pass2.safetensors")


@pytest.mark.parametrize("change, message", [
    (_set("clean_stats/norm_sums", lambda t: t["clean_stats/norm_sums"] * 2),
     r"clean_stats/norm_sums\[0\] is \S+, more than sqrt\(clean_stats/counts \* "
     r"clean_stats/sq_norm_sums\) \(Cauchy-Schwarz\)"),
    (_set("stats/sq_norm_sums", lambda t: t["stats/sq_norm_sums"] * 1e5),
     r"stats/sq_norm_sums\[0\] is \S+, more than stats/norm_sums squared"),
    (_set("stats/totals", lambda t: t["stats/totals"] * [0, 1, 1]),
     r"stats/totals\[0\] \(disagreements\) is 0, fewer than the rows counted in only one of "
     r"ncc_hits and classifier_hits"),
    (_set("stats/totals", lambda t: t["stats/totals"] * [0, 1, 1]
          + [t["stats/counts"].sum(), 0, 0]),
     r"stats/totals\[0\] \(disagreements\) is \d+, more than the rows that the classifier "
     r"or the nearest class centre predicts wrong"),
    (_set("stats/counts", _plus_one("stats/counts")),
     r"the sum of stats/counts is \d+, not the clean rows \(the sum of clean_stats/counts\) "
     r"plus the corrupted rows \(stats/totals\[1\]\)"),
    (_set("geometry/counts", lambda t: -t["geometry/counts"]),
     r"the stored geometry is unusable \(counts must be whole numbers of rows, 0 or more; "
     r"class 0 has -\d+\)"),
], ids=["norm_sums beyond Cauchy-Schwarz", "sq_norm_sums beyond norm_sums squared",
        "too few disagreements", "too many disagreements", "rows neither clean nor corrupted",
        "mean counts negative"])
def test_pass2_arrays_that_break_an_identity_are_refused(pass2_path, change, message):
    _rewrite(pass2_path, change, version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=f"pass2-0.safetensors: {message}.*; {CORRUPT}"):
        load_state(pass2_path)


def _every_corrupted_row_fits_and_no_row_hits(tensors, metadata):
    disagreements, corrupted_rows, _ = tensors["stats/totals"]
    tensors["stats/totals"] = np.array([disagreements, corrupted_rows, corrupted_rows])
    tensors["stats/ncc_hits"] = np.zeros_like(tensors["stats/ncc_hits"])


@pytest.mark.parametrize("change, message", [
    (_every_corrupted_row_fits_and_no_row_hits,
     r"stats/totals\[2\] \(corrupted fits\) is \d+, more than the rows predicted as their "
     r"label \(the sum of stats/ncc_hits\)"),
    (_set("stats/totals", lambda t: t["stats/totals"] * [1, 0, 1]
          + [0, t["stats/counts"].sum(), 0]),
     r"stats/totals\[1\] - totals\[2\] \(corrupted rows not fitted\) is \d+, more than the "
     r"rows not predicted as their label \(counts less stats/ncc_hits\)"),
], ids=["more fits than hits", "more misfits than misses"])
def test_corrupted_fits_that_break_the_hits_are_refused(tmp_path, change, message):
    """Without a classifier a corrupted row fits when its nearest class centre is its label."""
    case = _noisy_case()
    corrupted = case["labels"] != case["clean_labels"]
    path = tmp_path / "pass2.safetensors"
    save_state(path, _pass2_state(CLASSES, FEATURES, case["features"], case["labels"],
                                  corrupted=corrupted))
    _rewrite(path, change, version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=f"pass2.safetensors: {message}.*; {CORRUPT}"):
        load_state(path)


def _at_cauchy_schwarz_equality(tmp_path):
    """A pass-2 state whose rows lie at one distance from their class mean, saved without
    a digest (version 3): ``sum ||r|| = sqrt(n sum ||r||^2)`` up to float64 rounding."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(CLASSES, FEATURES)) * 3.0
    labels = np.repeat(np.arange(CLASSES), 2 * FEATURES)
    axes = np.tile(np.concatenate([np.eye(FEATURES), -np.eye(FEATURES)]), (CLASSES, 1))
    state = _pass2_state(CLASSES, FEATURES, means[labels] + 0.37 * axes, labels)
    assert state.norm_sums ** 2 == pytest.approx(state.counts * state.sq_norm_sums, rel=1e-14)
    path = tmp_path / "pass2.safetensors"
    save_state(path, state)
    _rewrite(path, lambda tensors, metadata: None, version=UNDIGESTED_STATE_VERSION)
    return path


def test_rows_at_one_distance_from_their_mean_load_and_norm_sums_beyond_do_not(tmp_path):
    """Cauchy-Schwarz at equality loads; norm sums 1e-6 larger, far beyond float64
    rounding, are no sums of norms."""
    path = _at_cauchy_schwarz_equality(tmp_path)
    load_state(path)
    _rewrite(path, _set("stats/norm_sums", lambda t: t["stats/norm_sums"] * (1 + 1e-6)),
             version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=r"stats/norm_sums\[0\] is \S+, more than sqrt\("
                                         rf"stats/counts \* stats/sq_norm_sums\).*; {CORRUPT}"):
        load_state(path)


def test_a_version_3_state_whose_means_do_not_match_their_fingerprint_is_refused(tmp_path):
    """A version-3 file carries no digest: only the fingerprint ties its class means to the
    sums summed against them."""
    path = _at_cauchy_schwarz_equality(tmp_path)
    _rewrite(path, _set("geometry/means", lambda t: t["geometry/means"] * 1.001),
             version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=r"pass2.safetensors: the stored class means do not "
                                         rf"match their fingerprint; {CORRUPT}"):
        load_state(path)


def test_the_rounding_errors_of_float64_sums_are_saved_where_there_are_any(tmp_path):
    """Float64 rows far from the origin in small chunks leave rounding errors beside the
    sums (ClassSums.sum_errors); a state of float32 rows has none and saves none."""
    case = _noisy_case()
    rows = 1e6 + case["features"].astype(np.float64) * 1e-7
    far = ClassSums(CLASSES, FEATURES, track_clean=True)
    for start in range(0, len(rows), 8):
        far.update(rows[start:start + 8], case["labels"][start:start + 8],
                   case["clean_labels"][start:start + 8])
    assert np.any(far.sum_errors) and np.any(far.clean_sum_errors)
    save_state(tmp_path / "far.safetensors", far)
    tensors, metadata = _read(tmp_path / "far.safetensors")
    assert {"sum_errors", "clean_sum_errors"} <= set(tensors)
    # Version 5 marks the errors: an ncfast that reads version 4 says it does not know the
    # version, instead of calling the tensors corruption.
    assert metadata["version"] == STATE_VERSION
    assert load_state(tmp_path / "far.safetensors") == far
    near = ClassSums(CLASSES, FEATURES)
    near.update(case["features"], case["labels"])
    save_state(tmp_path / "near.safetensors", near)
    tensors, metadata = _read(tmp_path / "near.safetensors")
    assert set(tensors) == {"counts", "sums"} and metadata["version"] == SUMS_ONLY_STATE_VERSION
    assert load_state(tmp_path / "near.safetensors") == near
    # Stored as zeros (another writer): the same state.
    _rewrite(tmp_path / "near.safetensors", _set("sum_errors", lambda t: np.zeros_like(t["sums"])),
             version=UNDIGESTED_STATE_VERSION)
    assert load_state(tmp_path / "near.safetensors") == near


def test_states_of_two_passes_refuse_to_merge_by_kind(tmp_path):
    """The refusal names both kinds and says to merge one pass at a time."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, FEATURES)).astype(np.float32)
    labels = np.arange(30) % CLASSES
    save_state(tmp_path / "pass1.safetensors",
               ClassSums(CLASSES, FEATURES).update(features, labels))
    save_state(tmp_path / "pass2.safetensors",
               _pass2_state(CLASSES, FEATURES, features, labels))
    with pytest.raises(ValueError, match=r"pass2.safetensors: a ResidualStats state cannot "
                                         r"merge with .*pass1.safetensors, a ClassSums; merge "
                                         "states of one pass at a time"):
        merge_states([tmp_path / "pass1.safetensors", tmp_path / "pass2.safetensors"])


def test_one_eigen_coordinate_beyond_its_own_limit_is_refused(tmp_path):
    """On the "classes" route
    eigen_scatter[j] <= lambda_j sum ||r||^2 (Cauchy-Schwarz, column M~^T v_j of squared
    norm lambda_j). Twice that on a weak coordinate, the others 0, keeps the sum below
    lambda_max sum ||r||^2, so only the per-coordinate limit can refuse it."""
    rng = np.random.default_rng(0)
    num_classes, num_features = 5, 12
    means = rng.normal(size=(num_classes, num_features)) * 3.0
    labels = np.repeat(np.arange(num_classes), 20)
    features = means[labels] + rng.normal(size=(labels.size, num_features))
    state = _pass2_state(num_classes, num_features, features, labels)
    assert state.route == "classes"
    eigenvalues = state.geometry.gram_eigenvalues
    weak = 1  # index 0 is the direction centring removes (rounding)
    assert 2.5 * eigenvalues[weak] < eigenvalues[-1]
    total = state.sq_norm_sums.sum()
    path = tmp_path / "pass2.safetensors"
    save_state(path, state)

    def one_coordinate(tensors, metadata):
        scatter = np.zeros_like(tensors["stats/eigen_scatter"])
        scatter[weak] = 2.0 * eigenvalues[weak] * total
        tensors["stats/eigen_scatter"] = scatter

    _rewrite(path, one_coordinate, version=UNDIGESTED_STATE_VERSION)
    with pytest.raises(ValueError, match=rf"stats/eigen_scatter\[{weak}\] is \S+, more than the "
                                         "sum of stats/sq_norm_sums allows for its coordinate"):
        load_state(path)


def test_save_state_names_the_path_and_the_fix_where_it_cannot_write(tmp_path):
    """The errors named the hidden temporary file: IsADirectoryError "'.folder.<hex>.tmp' ->
    'folder'", FileNotFoundError "'missing/.x.safetensors.<hex>.tmp'"."""
    state = ClassSums(CLASSES, FEATURES)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for path, problem in (
            (tmp_path / "folder", "it is a folder, not a file; name a file instead"),
            (tmp_path / "missing" / "x.safetensors",
             f"{str(tmp_path / 'missing')!r} does not exist; create it first"),
            (tmp_path / "file" / "x.safetensors",
             f"{str(tmp_path / 'file')!r} is a file, not a folder")):
        with pytest.raises(ValueError) as error:
            save_state(path, state)
        assert str(error.value).startswith(f"cannot write {str(path)!r}: {problem}")
        assert ".tmp" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"]
    assert os.listdir(tmp_path / "folder") == []


# --- merging ---------------------------------------------------------------------------------

def test_a_state_saved_again_under_another_name_is_refused_once_merged(pass2_path, tmp_path):
    """``ncfast merge`` compared the files' bytes, and safetensors writes the metadata in
    another order each time: a state saved twice was merged twice (300 held-out rows
    counted where there were 200)."""
    again = tmp_path / "again.safetensors"
    save_state(again, load_state(pass2_path))
    _rewrite(again, lambda tensors, metadata: None)  # written again: the same state
    with pytest.raises(ValueError, match=r"again.safetensors holds the same state as .*"
                                         r"pass2-0.safetensors; merging it twice would count "
                                         "its rows twice"):
        merge_states([pass2_path, again])


def test_states_without_rows_merge_however_often_they_repeat(tmp_path):
    """Two workers that had no rows write the same empty state; when the bytes matched,
    the merge refused them as one state given twice."""
    paths = [tmp_path / f"pass1-{worker}.safetensors" for worker in range(3)]
    for path in paths:
        save_state(path, ClassSums(CLASSES, FEATURES))
    paths[2].write_bytes(paths[1].read_bytes())
    assert merge_states(paths).counts.sum() == 0
    assert main(["merge", *map(str, paths), "--out", str(tmp_path / "merged")]) == 0


def test_merge_states_refuses_an_empty_iterable_of_paths(tmp_path):
    """Only an empty list was refused: a generator, or a glob that matched nothing, merged
    into None."""
    for paths in ([], (path for path in []), tmp_path.glob("pass2-*.safetensors")):
        with pytest.raises(ValueError, match="^no state files given; pass at least one$"):
            merge_states(paths)


def test_merge_states_takes_one_path(pass1_path):
    """A str was merged character by character ("/: a folder"), a Path was not iterable."""
    for path in (str(pass1_path), pass1_path):
        assert merge_states(path) == load_state(pass1_path)


def _worker_pass2_paths(tmp_path, case, num_workers=3):
    """Pass-2 states of ``num_workers`` workers, each over its share of ``case``'s rows,
    against the class means of all rows."""
    geometry, _ = finalize_pass1(ClassSums(CLASSES, FEATURES).update(case["features"],
                                                                      case["labels"]))
    paths = []
    for worker, rows in enumerate(np.array_split(np.arange(case["labels"].size), num_workers)):
        state = ResidualPass(geometry, weights=case["weights"], bias=case["bias"])
        state.update(case["features"][rows], case["labels"][rows])
        paths.append(tmp_path / f"pass2-{worker}.safetensors")
        save_state(paths[-1], state)
    return paths


def test_report_of_refuses_a_merge_without_every_row_behind_the_means(tmp_path, capsys):
    """``report_of(merge_states(paths))``, which the README gives as ``ncfast merge`` in
    Python, reported on 2 workers' rows of 3 against the means of all rows."""
    case = gaussian_classes(300, FEATURES, CLASSES, seed=4)
    paths = _worker_pass2_paths(tmp_path, case)
    assert report_of(merge_states(paths)).num_samples == 300
    two_of_three = merge_states(paths[:2])
    for state in (two_of_three, two_of_three.stats):
        with pytest.raises(ValueError, match=r"^the pass-2 states hold 200 rows but the class "
                                             r"means were built on 300 \(class 0: .*\): a "
                                             r"worker's state is missing\. Pass every worker's "
                                             r"pass-2 state once; or held_out=True if these "
                                             "rows are not the ones behind the means"):
            report_of(state)
        assert report_of(state, held_out=True).num_samples == 200
    counted_twice = merge_states(paths)
    counted_twice += load_state(paths[0])
    with pytest.raises(ValueError, match="a state may be given twice, or belong to another run"):
        report_of(counted_twice)
    # ncfast merge names its own option.
    assert main(["merge", *map(str, paths[:2]), "--out", str(tmp_path / "merged")]) == 1
    assert "or --held-out if these rows" in " ".join(capsys.readouterr().err.split())
    assert main(["merge", *map(str, paths[:2]), "--out", str(tmp_path / "merged"),
                 "--held-out"]) == 0


def test_report_of_means_without_counts_is_not_checked():
    """Means given without their row counts cannot tell whether rows are missing: the
    report is not refused."""
    case = gaussian_classes(300, FEATURES, CLASSES, seed=4)
    sums = ClassSums(CLASSES, FEATURES).update(case["features"], case["labels"])
    geometry = Geometry.from_means(sums.sums / sums.counts[:, None])
    state = ResidualStats(geometry).update(case["features"][:100], case["labels"][:100])
    assert report_of(state).num_samples == 100


def test_a_pass_that_cannot_merge_is_left_as_it_was():
    """ResidualPass added ``stats`` before ``clean_stats`` refused other clean means: a caller
    that skipped the refused state kept its every-row sums (800 rows where 600 were)."""
    case = _noisy_case()
    sums = ClassSums(CLASSES, FEATURES, track_clean=True)
    sums.update(case["features"], case["labels"], case["clean_labels"])
    geometry, clean_geometry = finalize_pass1(sums)
    other_clean = finalize_pass1(ClassSums(CLASSES, FEATURES, track_clean=True).update(
        case["features"][:200], case["labels"][:200], case["clean_labels"][:200]))[1]
    total = ResidualPass(geometry, clean_geometry)
    total.update(case["features"], case["labels"], case["clean_labels"])
    stray = ResidualPass(geometry, other_clean)
    stray.update(case["features"], case["labels"], case["clean_labels"])
    before = [array.copy() for array in total.sum_arrays()]
    with pytest.raises(ValueError, match=r"^the clean rows \(against the clean-row class means\)"
                                         ": cannot merge pass-2 states built on different "
                                         "class means"):
        total += stray
    assert all(np.array_equal(array, old) for array, old in zip(total.sum_arrays(), before))
    with pytest.raises(TypeError, match="cannot merge a ResidualPass with a ResidualStats"):
        total += stray.stats


def test_pass2_states_add_up_with_sum(tmp_path):
    """``sum(states)`` starts from 0, as it does for ClassSums."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, FEATURES)).astype(np.float32)
    labels = np.arange(60) % CLASSES
    whole = _pass2_state(CLASSES, FEATURES, features, labels)
    first = ResidualStats(whole.plan).update(features[:25], labels[:25])
    second = ResidualStats(whole.plan).update(features[25:], labels[25:])
    total = sum([first, second])
    for name in whole.sum_names:
        np.testing.assert_allclose(getattr(total, name), getattr(whole, name), rtol=1e-12)


def test_a_named_pipe_is_refused_without_waiting(tmp_path, fail_instead_of_hanging):
    """``load_state`` opened the path to read its first bytes: on a pipe that waits for a
    writer forever (``ncfast merge`` too)."""
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(ValueError, match=r"pipe.safetensors: not a regular file \(a pipe, "
                                         r"socket or device\); expected a pass state"):
        load_state(tmp_path / "pipe.safetensors")


_SAMPLES_FINGERPRINT = """
import numpy as np
from ncfast import ClassSums, finalize_pass1
rng = np.random.default_rng(0)
labels = rng.integers(0, 300, 20000)
features = (rng.normal(size=(300, 64))[labels] * 3
            + rng.normal(size=(20000, 64))).astype(np.float32)
print(finalize_pass1(ClassSums(300, 64).update(features, labels), global_mean="samples")[0]
      .fingerprint)
"""


def _has_avx512():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " avx512f" in cpuinfo.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not _has_avx512(),
                    reason="OpenBLAS's SkylakeX kernel (AVX-512) beside its older ones")
def test_the_samples_global_mean_is_the_same_under_every_blas_kernel():
    """global_mean="samples" took the count-weighted mean with a BLAS product, whose
    kernel differs between CPUs: under OPENBLAS_CORETYPE=Haswell or Sandybridge one of 64
    entries differed by 2e-16 from SkylakeX's (the default on an AVX-512 CPU; Haswell's,
    Sandybridge's, Nehalem's and Prescott's agreed with each other), so the geometry's
    fingerprint did, and a pass-2 state saved on one CPU was refused on another as corrupt
    (and would not merge)."""
    fingerprints = set()
    for core in ("", "Haswell", "Sandybridge"):
        environment = {**os.environ, "OPENBLAS_CORETYPE": core} if core else dict(os.environ)
        result = subprocess.run([sys.executable, "-c", _SAMPLES_FINGERPRINT], env=environment,
                                capture_output=True, text=True, check=True)
        fingerprints.add(result.stdout.strip())
    assert len(fingerprints) == 1, fingerprints


def test_a_digested_state_loads_where_its_global_mean_rounds_otherwise_here(pass2_path):
    """A state saved before the samples global mean was taken row by row carries the
    fingerprint of a BLAS product: its digest, verified, is what says the file is intact."""
    from ncfast.states import _state_digest

    def blas_fingerprint(tensors, metadata):
        metadata["geometry/fingerprint"] = "0" * 40
        metadata["digest"] = _state_digest(tensors, metadata)

    _rewrite(pass2_path, blas_fingerprint)
    assert load_state(pass2_path).stats.counts.sum() == 300
