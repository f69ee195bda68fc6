"""``ncfast.distributed``: pass states summed over a torch.distributed group (issue 7).

Two CPU processes on the gloo backend feed uneven numbers of batches (one
rank none at all in one case); every rank's report must equal
``ncfast.collapse`` of all the batches in one process. The batches are the
kernel chunks in both runs, so only the order of the float64 sums differs
(<= 1e-10 relative).
"""
import datetime
import math
import pickle
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as torch_mp  # noqa: E402

import ncfast  # noqa: E402
from cases import ADVERSARIAL, gaussian_classes, with_label_noise  # noqa: E402
from ncfast.distributed import DistributedCollapse, collapse, split_on_grid  # noqa: E402

WORLD_SIZE = 2


def _rank_batches(case, rank, batch_counts):
    """This rank's batches (torch tensors): uneven sizes, ``batch_counts[rank]`` of them."""
    num_rows = len(case["labels"])
    cuts = np.linspace(0, num_rows, sum(batch_counts) + 1).astype(int)
    cuts[1:-1] += np.random.default_rng(0).integers(-5, 5, size=cuts.size - 2)
    first = sum(batch_counts[:rank])
    batches = []
    for start, stop in zip(cuts[first:first + batch_counts[rank]],
                           cuts[first + 1:first + 1 + batch_counts[rank]]):
        batch = [torch.from_numpy(case["features"][start:stop]),
                 torch.from_numpy(case["labels"][start:stop])]
        if "clean_labels" in case:
            batch.append(torch.from_numpy(case["clean_labels"][start:stop]))
        batches.append(tuple(batch))
    return batches


#: (case, batches per rank): random rows with a classifier and label noise,
#: adversarial rows, and a rank without rows.
CASES = {
    "gaussian_noisy": (lambda: with_label_noise(gaussian_classes(num_rows=3000)), (3, 8)),
    "relu_offset": (lambda: gaussian_classes(**ADVERSARIAL["relu_offset_1e3"]), (5, 2)),
    "classes_exceed_features": (
        lambda: gaussian_classes(**ADVERSARIAL["classes_exceed_features"]), (4, 1)),
    "idle_rank": (lambda: gaussian_classes(**ADVERSARIAL["tiny_spread_1e-4"]), (6, 0)),
    # Float64 rows: their sums carry rounding errors, reduced on a common grid.
    "float64_offset": (lambda: gaussian_classes(dtype=np.float64, offset=1e3), (4, 3)),
}


#: Arguments of ``collapse`` that differ between the ranks: their states differ in shape.
MISMATCHES = {
    "mismatched_classes": lambda rank: {
        "batches": [(torch.zeros(2, 4), torch.tensor([0, 1]))], "num_classes": 3 + rank},
    "mismatched_label_noise": lambda rank: {
        "batches": [(torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))[:3 - rank]],
        "num_classes": 3, "label_noise": rank == 0},
}


def _shifted_on_rank_one(rank):
    """Rank 1 shifts its rows in pass 2 (a model in another mode): the same rows per class,
    other rows, whose class means move."""
    case = gaussian_classes(num_rows=600)
    batches = _rank_batches(case, rank, (2, 2))
    analysis = DistributedCollapse(case["num_classes"], case["features"].shape[1])
    for batch in batches:
        analysis.update_pass1(*batch)
    analysis.finalize_pass1()
    for features, labels in batches:
        if rank == 1:
            features = features + 0.5
        analysis.update_pass2(features, labels)
    analysis.report()


def _bad_row_on_rank_one(rank, step):
    """Rank 1 finds a bad row in one pass of ``collapse`` (rank 0 none): rank 0 used to wait
    for it in the collective at the pass's end."""
    case = gaussian_classes(num_rows=600)
    batches = _rank_batches(case, rank, (2, 2))
    if rank == 1:
        features = batches[1][0].clone()
        features[7, 2] = float("nan")
        bad_batch = (features, batches[1][1])
        batches = [batches[0], bad_batch] if step == "pass1" else _TwoPasses(batches, bad_batch)
    collapse(batches, num_classes=case["num_classes"], num_features=case["features"].shape[1])


def _one_shot_batches_on_rank_one(rank, group):
    """Rank 1 passes ``collapse`` a generator (rank 0 a list): rank 1 used to refuse it
    before the first collective, and rank 0 waited in that until the group's timeout."""
    batches = [(torch.eye(6, 4) + torch.arange(6.0)[:, None], torch.arange(6) % 3)]
    if rank == 1:
        batches = (batch for batch in batches)
    collapse(batches, num_classes=3, num_features=4, group=group)


class _TwoPasses:
    """Batches whose readings after the first complete one replace the last batch."""

    def __init__(self, batches, second_last):
        self.batches, self.second_last, self.completed = batches, second_last, 0

    def __iter__(self):
        yield from (self.batches if self.completed == 0 else
                    self.batches[:-1] + [self.second_last])
        self.completed += 1


#: Classifiers that differ between the ranks (``DistributedCollapse`` options per rank):
#: each rank scored its rows with its own.
CLASSIFIERS = {
    "other_weights": lambda rank: {"weights": torch.eye(3, 4) * (1 + rank)},
    "other_bias": lambda rank: {"weights": torch.eye(3, 4), "bias": torch.ones(3) * rank},
    "weights_on_one_rank": lambda rank: {"weights": torch.eye(3, 4)} if rank == 0 else {},
    "other_weights_with_means": lambda rank: {"weights": torch.eye(3, 4) * (1 + rank),
                                              "means": np.eye(3, 4)},
}


#: Options that differ between the ranks: each rank measured other numbers, or (empty
#: classes) one rank raised alone and left the other in the next collective.
OPTIONS = {
    "other_global_mean": lambda rank: {"global_mean": ("classes", "samples")[rank]},
    "other_pinv_rtol": lambda rank: {"pinv_rtol": (1e-10, 1e-3)[rank]},
    "other_empty_classes": lambda rank: {"empty_classes": ("warn", "raise")[rank]},
    "other_means": lambda rank: {"means": np.eye(3, 4) * (1 + rank)},
}


def _other_setup(options):
    """Both passes of rows that every rank shares, with this rank's ``options``."""
    features, labels = torch.eye(6, 4) + torch.arange(6.0)[:, None], torch.arange(6) % 3
    analysis = DistributedCollapse(3, 4, **options)
    if "means" not in options:
        analysis.update_pass1(features, labels)
        analysis.finalize_pass1()
    analysis.update_pass2(features, labels)
    analysis.report()


def _run_rank(rank, port, out_dir):
    """One process of the group: every case, class API and function API."""
    # A rank left waiting in a collective fails after a minute, not gloo's 30.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        reports = {}
        for name, (make_case, batch_counts) in CASES.items():
            case = make_case()
            batches = _rank_batches(case, rank, batch_counts)
            noisy = "clean_labels" in case
            num_features = case["features"].shape[1]
            analysis = DistributedCollapse(
                case["num_classes"], num_features, weights=torch.from_numpy(case["weights"]),
                bias=torch.from_numpy(case["bias"]), label_noise=noisy)
            for batch in batches:
                analysis.update_pass1(*batch)
            analysis.finalize_pass1()
            for batch in reversed(batches):
                analysis.update_pass2(*batch)
            reports[name] = analysis.report()
            reports[name + "_again"] = analysis.report()  # not summed over the ranks again
            reports[name + "_function"] = collapse(
                batches, num_classes=case["num_classes"], num_features=num_features,
                label_noise=noisy)
        for name, mismatch in MISMATCHES.items():
            try:
                collapse(num_features=4, **mismatch(rank))
            except ValueError as error:
                reports[name] = str(error)
        # States of one size but other shapes: C (D + 1) = 12 values on both ranks.
        num_classes, num_features = ((3, 3), (2, 5))[rank]
        analysis = DistributedCollapse(num_classes, num_features)
        analysis.update_pass1(torch.ones(2, num_features), torch.tensor([0, 1]))
        try:
            analysis.finalize_pass1()
        except ValueError as error:
            reports["mismatched_shapes_of_one_size"] = str(error)
        try:
            _shifted_on_rank_one(rank)
        except ValueError as error:
            reports["shifted_on_rank_one"] = str(error)
        for name, options in {**CLASSIFIERS, **OPTIONS}.items():
            try:
                _other_setup(options(rank))
            except ValueError as error:
                reports[name] = str(error)
        for step in ("pass1", "pass2"):
            try:
                _bad_row_on_rank_one(rank, step)
            except ValueError as error:
                reports[f"bad_row_on_rank_one_{step}"] = str(error)
        # A rank left waiting here fails after 10 s (the case's whole run takes well under 1 s).
        short_group = dist.new_group(timeout=datetime.timedelta(seconds=10))
        try:
            _one_shot_batches_on_rank_one(rank, short_group)
        except (TypeError, ValueError) as error:
            reports["one_shot_iterator_on_rank_one"] = str(error)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as handle:
            pickle.dump(reports, handle)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def rank_reports(tmp_path_factory):
    """The reports of both ranks, from one spawn of a 2-process gloo group."""
    out_dir = tmp_path_factory.mktemp("ranks")
    torch_mp.spawn(_run_rank, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [pickle.loads((out_dir / f"rank{rank}.pkl").read_bytes())
            for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", CASES)
def test_ranks_equal_single_process(rank_reports, name, assert_same_report):
    make_case, batch_counts = CASES[name]
    case = make_case()
    all_batches = [batch for rank in range(WORLD_SIZE)
                   for batch in _rank_batches(case, rank, batch_counts)]
    expected = ncfast.collapse(all_batches, num_classes=case["num_classes"],
                               weights=case["weights"], bias=case["bias"])
    expected_function = ncfast.collapse(all_batches, num_classes=case["num_classes"])
    for reports in rank_reports:
        assert_same_report(reports[name], expected)
        assert_same_report(reports[name + "_again"], expected)
        assert_same_report(reports[name + "_function"], expected_function)
    if "clean_labels" in case:
        assert expected.memorization is not None


def test_sums_split_on_a_common_grid_add_up_exactly_in_any_order():
    """A plain all_reduce of 512 ranks' float64 sums, rows 1e12 from the origin with a spread
    of 1e-2, moved the means by 60 ulps: each addition rounded, beyond the sums' errors."""
    rng = np.random.default_rng(0)
    num_parts, num_rows = 512, 51_200
    labels = rng.integers(0, 4, num_rows)
    rows = 1e12 + 1e-2 * rng.normal(size=(4, 8))[labels] + 1e-2 * rng.normal(size=(num_rows, 8))
    counts = np.bincount(labels, minlength=4)[:, None]
    parts = [ncfast.ClassSums(4, 8).update(rows[i::num_parts], labels[i::num_parts])
             for i in range(num_parts)]
    # The parts' sums and errors added exactly, less counts × 1e12 (exact, as is each
    # part's sums less its counts × 1e12).
    deviations = np.array([[math.fsum([part.sums[c, j] - part.counts[c] * 1e12 for part in parts]
                                      + [part.sum_errors[c, j] for part in parts])
                            for j in range(8)] for c in range(4)])
    plain = sum(part.sums for part in parts) + sum(part.sum_errors for part in parts)
    largest = np.max([np.abs(part.sums).max(axis=1) for part in parts], axis=0)
    sums, errors = np.zeros((4, 8)), np.zeros((4, 8))
    for index in rng.permutation(num_parts):
        split_on_grid(parts[index].sums, parts[index].sum_errors, largest, num_parts)
        sums += parts[index].sums
        errors += parts[index].sum_errors
    ulp = np.spacing(1e12)
    assert np.abs(((sums - counts * 1e12) + errors - deviations) / counts).max() < 1e-3 * ulp
    assert np.abs(((plain - counts * 1e12) - deviations) / counts).max() > 10 * ulp


def test_misuse_is_refused_before_any_communication():
    with pytest.raises(ValueError, match=r"weights has shape \(4, 3\)"):
        DistributedCollapse(3, 4, weights=torch.zeros(4, 3))
    analysis = DistributedCollapse(3, 4)
    with pytest.raises(RuntimeError, match="finalize_pass1"):
        analysis.update_pass2(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_noise"):
        analysis.update_pass1(torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="row 1 has label 5"):
        analysis.update_pass1(torch.zeros(2, 4), torch.tensor([0, 5]))
    # An empty batch was taken whatever came with it.
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but features has 0 rows"):
        analysis.update_pass1(torch.zeros(0, 4), torch.arange(5))
    with pytest.raises(ValueError, match=r"labels has shape \(\) but features has 0 rows"):
        analysis.update_pass1(torch.zeros(0, 4), torch.tensor(3))
    with pytest.raises(ValueError, match=r"features must be 2-D .*; found 1-D with shape \(0,\)"):
        analysis.update_pass1([], [])
    with pytest.raises(ValueError, match=r"features must have shape \(n, 4\); found \(0, 7\)"):
        analysis.update_pass1(torch.zeros(0, 7), torch.arange(0))
    analysis.update_pass1(torch.zeros(0, 4), torch.arange(0))
    with pytest.raises(TypeError, match="one-shot iterator"):
        collapse((batch for batch in []), num_classes=3, num_features=4)


@pytest.mark.parametrize("name", [*MISMATCHES, "mismatched_shapes_of_one_size"])
def test_ranks_with_states_of_other_shapes_all_raise(rank_reports, name):
    """Summing buffers of different sizes aborted the processes (gloo)."""
    for reports in rank_reports:
        assert "the ranks hold states of different shapes" in reports[name]
        assert "the same num_classes, num_features and label_noise on every rank" in reports[name]


def test_other_rows_in_pass_two_on_one_rank_raise_on_every_rank(rank_reports):
    """Pass 2's rows are summed by class again and compared over the group, so every rank
    raises, not only the one that read other rows (which would leave the others waiting)."""
    for reports in rank_reports:
        assert reports["shifted_on_rank_one"].startswith(
            "the batches given to update_pass2 yielded other rows in the two passes: their "
            "class means differ from pass 1's")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_that_differ_between_ranks_are_refused_on_every_rank(rank_reports, name):
    """Each rank reported the metrics of its own W, and scored its rows with it."""
    for reports in rank_reports:
        assert reports[name].startswith(
            "the ranks' classifiers differ (weights and bias are not the same on every rank)")
        assert reports[name].endswith(
            "build the classifier after torch.manual_seed with the same seed on every rank, "
            "or broadcast its parameters from rank 0 (dist.broadcast(tensor, src=0) for "
            "each, as DistributedDataParallel does when it wraps the model)")


@pytest.mark.parametrize("name", OPTIONS)
def test_options_that_differ_between_ranks_are_refused_on_every_rank(rank_reports, name):
    for reports in rank_reports:
        assert reports[name] == (
            "the ranks were given different options (global_mean, empty_classes, pinv_rtol or "
            "means=), so they would measure different numbers: pass every rank the same "
            "options (and the same means, e.g. broadcast from rank 0)")


@pytest.mark.parametrize("step", ["pass1", "pass2"])
def test_a_bad_row_on_one_rank_stops_every_rank(rank_reports, step):
    """The rank with the bad row raises its own error; the other one names it, where it
    used to wait in the pass's all_reduce until gloo's timeout."""
    rank0, rank1 = (reports[f"bad_row_on_rank_one_{step}"] for reports in rank_reports)
    first_batch = _rank_batches(gaussian_classes(num_rows=600), 1, (2, 2))[0]
    assert f"features row {len(first_batch[0]) + 7} contains NaN" in rank1
    assert rank0 == (f"rank 1 of the group failed in {step.replace('pass', 'pass ')} (its error "
                     "says why), so this rank stops too")


def test_a_one_shot_iterator_on_one_rank_stops_every_rank(rank_reports):
    """The rank given a generator raises its own error; the other one names it, where it
    used to wait in the first collective until the group's timeout."""
    rank0, rank1 = (reports["one_shot_iterator_on_rank_one"] for reports in rank_reports)
    assert rank1.startswith("batches is a one-shot iterator (e.g. a generator)")
    assert rank0 == ("rank 1 of the group failed in setting up the analysis (its error says "
                     "why), so this rank stops too")


@pytest.mark.parametrize("on_meta", ["features", "labels"])
def test_batches_on_the_meta_device_are_refused(on_meta):
    """Copying them to the host raised torch's NotImplementedError ("Cannot copy out of
    meta tensor")."""
    batch = {"features": torch.zeros(6, 4), "labels": torch.arange(6) % 3}
    batch[on_meta] = batch[on_meta].to("meta")
    with pytest.raises(ValueError, match=f"{on_meta} is a torch tensor on the meta device"):
        DistributedCollapse(3, 4).update_pass1(**batch)


def test_a_single_value_as_features_is_refused_as_by_collapse():
    """``len()`` of the 0-d tensor raised torch's TypeError."""
    with pytest.raises(ValueError) as expected:
        ncfast.collapse(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match=r"features must be 2-D .*; found 0-D") as found:
        DistributedCollapse(3, 4).update_pass1(torch.tensor(1.0), torch.tensor(0))
    assert str(found.value) == str(expected.value)


def test_bad_rows_are_named_by_their_index_among_the_rows_fed():
    """Each batch counted its rows from 0, so an error named a row of the batch."""
    features = torch.arange(60.0).reshape(15, 4)
    labels = torch.arange(15) % 3
    bad_labels = labels.clone()
    bad_labels[12] = 7
    analysis = DistributedCollapse(3, 4, chunk_size=4)
    with pytest.raises(ValueError, match="row 12 has label 7"):
        for start in (0, 5, 10):
            analysis.update_pass1(features[start:start + 5], bad_labels[start:start + 5])
    analysis = DistributedCollapse(3, 4, chunk_size=4)
    for start in (0, 5, 10):
        analysis.update_pass1(features[start:start + 5], labels[start:start + 5])
    analysis.finalize_pass1()
    bad_features = features.clone()
    bad_features[8, 1] = float("nan")
    with pytest.raises(ValueError, match="features row 8 contains NaN"):
        for start in (0, 5, 10):
            analysis.update_pass2(bad_features[start:start + 5], labels[start:start + 5])


def test_update_pass2_after_the_report_is_refused():
    """Rows fed after report() were silently ignored."""
    case = gaussian_classes(num_rows=200)
    analysis = DistributedCollapse(case["num_classes"], case["features"].shape[1])
    analysis.update_pass1(case["features"], case["labels"])
    analysis.finalize_pass1()
    analysis.update_pass2(case["features"], case["labels"])
    analysis.report()
    with pytest.raises(RuntimeError, match="the report is made"):
        analysis.update_pass2(case["features"], case["labels"])


def test_each_pass_drops_its_scratch_when_it_ends():
    """``finalize_pass1`` and ``report`` drop the chunk scratch of the pass that ended
    (in a process that goes on training, the rank would otherwise keep it)."""
    from ncfast.kernels import cpu

    case = gaussian_classes(num_rows=600, num_features=8, num_classes=40, seed=3)
    features, labels = torch.from_numpy(case["features"]), torch.from_numpy(case["labels"])
    cpu.release_scratch()
    analysis = DistributedCollapse(40, 8)
    analysis.update_pass1(features, labels)
    assert cpu.scratch_bytes() > 0
    analysis.finalize_pass1()
    assert cpu.scratch_bytes() == 0
    analysis.update_pass2(features, labels)
    assert cpu.scratch_bytes() > 0
    analysis.report()
    assert cpu.scratch_bytes() == 0


def test_pass_two_of_the_very_rows_of_pass_one_is_not_summed_again():
    """With ``checks_same_rows`` off (the monitor replaying its held rows), pass 2 keeps
    no class sums: the report equals the checked one, and other rows are not refused."""
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=4, seed=6)
    features, labels = torch.from_numpy(case["features"]), torch.from_numpy(case["labels"])
    reports = []
    for checks in (True, False):
        analysis = DistributedCollapse(4, 8)
        analysis.checks_same_rows = checks
        analysis.update_pass1(features, labels)
        analysis.finalize_pass1()
        assert (analysis._rows_again is not None) == checks
        analysis.update_pass2(features, labels)
        reports.append(analysis.report())
    assert reports[0].metrics() == reports[1].metrics()
    shifted = DistributedCollapse(4, 8)
    shifted.checks_same_rows = False
    shifted.update_pass1(features, labels)
    shifted.finalize_pass1()
    shifted.update_pass2(features + 5.0, labels)
    shifted.report()  # not checked: the caller vouched for the rows


def test_progress_tells_this_ranks_rows_and_the_class_pair_tiles(capsys):
    """In one process (no group): ``collapse`` tells the rows of this rank's batches and
    the tiles; the class API the tiles, from ``finalize_pass1``; the reports are those
    without progress, which prints nothing."""
    case = gaussian_classes(num_rows=900, num_features=8, num_classes=600, seed=4)
    batches = [(torch.from_numpy(case["features"][start:start + 300]),
                torch.from_numpy(case["labels"][start:start + 300]))
               for start in range(0, 900, 300)]
    options = {"num_classes": 600, "num_features": 8, "empty_classes": "ignore"}
    quiet = collapse(batches, **options)
    assert capsys.readouterr().err == ""
    assert collapse(batches, progress=True, **options) == quiet
    assert [line.rsplit(" in ", 1)[0] for line in capsys.readouterr().err.splitlines()] == [
        "ncfast: pass 1: class sums: 900 rows", "ncfast: class pairs: 3 tiles",
        "ncfast: pass 2: residuals: 900 rows"]
    analysis = DistributedCollapse(600, 8, empty_classes="ignore", progress=True)
    for batch in batches:
        analysis.update_pass1(*batch)
    analysis.finalize_pass1()
    assert [line.rsplit(" in ", 1)[0] for line in capsys.readouterr().err.splitlines()] == [
        "ncfast: class pairs: 3 tiles"]
    for batch in batches:
        analysis.update_pass2(*batch)
    assert analysis.report() == quiet


@pytest.mark.parametrize("value", [1, "yes", None])
def test_progress_must_be_a_bool(value):
    with pytest.raises(TypeError, match="^progress must be True, False or an "):
        DistributedCollapse(3, 4, progress=value)
