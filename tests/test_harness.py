"""The training harness: label noise, option checks, two-epoch runs, dumps, resume."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from ncfast.harness import TrainConfig, corrupt_labels, load_dataset, train

torch = pytest.importorskip("torch")

from ncfast.dumps import RunWriter, open_run  # noqa: E402
from ncfast.harness import training  # noqa: E402
from ncfast.harness.losses import make_loss  # noqa: E402
from ncfast.harness.models import build_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402

#: A run that takes well under a second: 4 Gaussian classes, a small MLP.
SMALL = TrainConfig(dataset="gaussian", num_samples=200, num_features=8, num_classes=4,
                    width=16, depth=2, epochs=2, batch_size=32, checkpoints=2)


# --- label noise ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["symmetric", "pair"])
@pytest.mark.parametrize("rate", [0.05, 0.2, 0.37, 0.9])
def test_noise_corrupts_exactly_round_rate_times_rows(kind, rate):
    labels = np.random.default_rng(1).integers(0, 10, 1003)
    noisy = corrupt_labels(labels, rate, num_classes=10, kind=kind, seed=3)
    corrupted = noisy != labels
    assert corrupted.sum() == round(rate * labels.size)
    assert noisy.min() >= 0 and noisy.max() < 10
    if kind == "pair":
        np.testing.assert_array_equal(noisy[corrupted], (labels[corrupted] + 1) % 10)


def test_symmetric_noise_spreads_over_every_other_class():
    labels = np.zeros(20000, dtype=np.int64)
    noisy = corrupt_labels(labels, 0.5, num_classes=5, seed=0)
    shares = np.bincount(noisy[noisy != 0], minlength=5)[1:] / 10000
    np.testing.assert_allclose(shares, 0.25, atol=0.02)


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_zero_noise_never_relabels(kind):
    labels = np.random.default_rng(0).integers(0, 7, 999)
    noisy = corrupt_labels(labels, 0.0, num_classes=7, kind=kind, seed=0)
    np.testing.assert_array_equal(noisy, labels)
    assert noisy is not labels


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_noise_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ValueError, match=r"noise rate must lie in \[0, 1\)"):
        corrupt_labels(np.zeros(10, dtype=np.int64), rate, num_classes=2)


# --- datasets --------------------------------------------------------------------------

def test_gaussian_mixture_honours_class_counts():
    data = load_dataset("gaussian", class_counts=[30, 20, 5], num_features=3)
    np.testing.assert_array_equal(np.bincount(data.y_train), [30, 20, 5])
    assert data.x_train.shape == (55, 3) and data.x_train.dtype == np.float32
    assert data.num_classes == 3 and set(data.y_test) == {0, 1, 2}


def test_mnist1d_is_generated_locally_with_the_asked_size():
    state = np.random.get_state()[1].copy()
    data = load_dataset("mnist1d", num_samples=500)
    assert data.x_train.shape == (400, 40) and data.x_test.shape == (100, 40)
    assert data.num_classes == 10
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # global state untouched


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_dataset_keeps_as_many_rows_of_each_class_as_its_smallest(seed):
    full = load_dataset("digits", seed=seed)
    balanced = load_dataset("digits", balanced=True, seed=seed)
    for inputs, labels, all_inputs, all_labels in (
            (balanced.x_train, balanced.y_train, full.x_train, full.y_train),
            (balanced.x_test, balanced.y_test, full.x_test, full.y_test)):
        counts = np.bincount(all_labels, minlength=10)
        np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                      np.full(10, counts.min()))
        # every kept row is an original row with its own label, in the original order
        where = {row.tobytes(): index for index, row in enumerate(all_inputs)}
        kept = [where[row.tobytes()] for row in inputs]
        assert kept == sorted(kept)
        np.testing.assert_array_equal(all_labels[kept], labels)


def test_balancing_a_split_that_lacks_a_class_is_refused():
    from ncfast.harness.datasets import Dataset, balance_classes

    data = Dataset(np.zeros((4, 2), np.float32), np.array([0, 0, 1, 1]),
                   np.zeros((2, 2), np.float32), np.array([0, 0]), 2, "toy")
    with pytest.raises(ValueError, match=r"cannot balance the test split of toy: class\(es\) "
                                         r"\[1\] have no rows there"):
        balance_classes(data)


def test_npz_dataset_reads_x_and_y(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(60, dtype=np.float64).reshape(20, 3), y=np.arange(20) % 2)
    data = load_dataset("npz", path=str(path))
    assert data.x_train.shape == (16, 3) and data.x_test.shape == (4, 3)
    assert data.num_classes == 2


#: Rows of a good npz dataset: 3 classes, 6 inputs, one test split.
X, Y = np.random.default_rng(0).normal(size=(60, 6)), np.arange(60) % 3


@pytest.mark.parametrize("arrays, message", [
    ({"x": X[:0], "y": Y[:0]}, "x and y hold no rows"),
    ({"x": X[:, 0], "y": Y}, r"x must be a real-valued array of shape \(n, \.\.\.\).*x\[:, None\]"),
    ({"x": X + 1j, "y": Y}, "x must be a real-valued array .* found dtype complex128"),
    ({"x": np.where(np.arange(60)[:, None] == 7, np.nan, X), "y": Y},
     "x row 7 holds NaN, Inf or a value beyond float32"),
    ({"x": X, "y": np.where(np.arange(60) == 5, 10**9, Y)},
     "the labels reach 1000000000 but only 4 distinct labels occur"),
    ({"x": X, "y": Y, "x_test": X[:10]}, "holds x_test but no y_test; give both"),
    ({"x": X, "y": Y, "x_test": X[:10, :4], "y_test": Y[:10]},
     r"x_test rows have shape \(4,\) but x rows have shape \(6,\)"),
    ({"x": X, "y": Y, "x_test": X[:10], "y_test": np.full(10, 3)},
     r"the test split of npz holds class\(es\) \[3\] without training rows"),
    ({"x": X, "y": np.zeros(60, np.int64)}, r"holds rows of 1 class\(es\)"),
    ({"x": X[:1], "y": Y[:1]}, r"holds rows of 0 class\(es\)"),
])
def test_npz_dataset_that_cannot_be_trained_and_measured_is_refused(tmp_path, arrays, message):
    """Each used to train (and dump what analyze refuses), or fail deep inside numpy or torch."""
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset("npz", path=str(path))


def test_dataset_failing_to_load_leaves_no_run_folder(tmp_path):
    """The run folder used to be made before the dataset loaded, and stayed empty."""
    path = tmp_path / "data.npz"
    np.savez(path, x=X[:0], y=Y[:0])
    out = tmp_path / "parent" / "run"
    config = dataclasses.replace(SMALL, dataset="npz", data_path=str(path), num_samples=None,
                                 num_features=None, num_classes=None)
    with pytest.raises(ValueError, match="x and y hold no rows"):
        train(config, out, progress=False)
    assert not (tmp_path / "parent").exists()


def test_npz_dataset_path_to_another_format_is_refused(tmp_path):
    for path, write in ((tmp_path / "x.npy", lambda path: np.save(path, X)),
                        (tmp_path / "text.npz", lambda path: path.write_text("x,y\n"))):
        write(path)
        with pytest.raises(ValueError, match="is not a .npz archive; write one with np.savez"):
            load_dataset("npz", path=str(path))


@pytest.mark.parametrize("name, options, message", [
    ("mnist1d", {"num_samples": 5}, "num_samples must be at least 10 for mnist1d"),
    ("mnist1d", {"num_samples": 12}, r"the test split of mnist1d holds class\(es\) \[6, 7\]"),
    ("gaussian", {"num_samples": 3}, r"num_samples \(3\) must be at least num_classes \(4\)"),
])
def test_too_few_samples_for_every_class_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(name, **options)


# --- bad options fail before training ----------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"noise": 1.0}, r"noise rate must lie in \[0, 1\)"),
    ({"noise": -0.2}, r"noise rate must lie in \[0, 1\)"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"class_counts": (100, 50, 50), "num_samples": 300, "num_classes": None},
     "class_counts sum to 200 but num_samples is 300"),
    ({"dataset": "digits"}, "num_samples applies to the mnist1d and gaussian"),
    ({"class_counts": (100, 50, 50)}, "class_counts lists 3 classes but num_classes is 4"),
    ({"smoothing": 0.1}, "smoothing applies to the 'ls' loss only"),
    ({"feature_decay": 0.1}, "applies to the unconstrained-features model"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"class_counts": (100, 50, 50), "num_samples": None, "num_classes": None,
      "balanced": True}, "class_counts sets unequal classes"),
    ({"lr": float("inf")}, "lr must be positive and finite; found inf"),
    ({"weight_decay": float("nan")}, "weight_decay must be non-negative and finite; found nan"),
    ({"model": "ufm", "feature_lr": float("inf")}, "feature_lr must be non-negative and finite"),
    ({"seed": -1}, r"seed must lie in \[0, 2\*\*32\); found -1"),
    ({"seed": 2**32}, r"seed must lie in \[0, 2\*\*32\); found 4294967296"),
])
def test_bad_options_raise_before_anything_is_written(tmp_path, changes, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(dataclasses.replace(SMALL, **changes), out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown torch device 'tpu'"), ("meta", "device must be a cpu or cuda device"),
    pytest.param("cuda", "torch sees no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU"))])
def test_unusable_device_is_refused_before_anything_is_written(tmp_path, device, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(SMALL, out, progress=False, device=device)
    assert not out.exists()


@pytest.mark.parametrize("batch_size", [1, 199])
def test_batch_norm_batch_of_one_row_is_refused_before_training(tmp_path, batch_size):
    """200 rows in batches of 199 leave one row, which torch's BatchNorm1d refuses mid-run."""
    config = dataclasses.replace(SMALL, batch_norm=True, batch_size=batch_size)
    with pytest.raises(ValueError, match=f"batch_norm needs at least 2 rows in every batch, "
                                         f"but batch_size {batch_size} leaves a batch of 1 row "
                                         "of the 200 training rows"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_noise_that_corrupts_every_row_is_refused_before_training(tmp_path):
    """round(0.999 * 200) = 200 rows corrupted: no clean rows for analyze's noise metrics."""
    with pytest.raises(ValueError, match=r"noise 0.999 leaves uncorrupted rows in 0 class\(es\) "
                                         "of the 200 training rows"):
        train(dataclasses.replace(SMALL, noise=0.999), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_corrupt_training_state_is_refused_in_one_line(tmp_path):
    """A truncated training_state.pt used to raise torch's RuntimeError from deep inside."""
    out = tmp_path / "run"
    train(SMALL, out, progress=False)
    state = out / training.TRAINING_STATE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="training_state.pt: not a readable training state of "
                                         "this run .*delete it to train the run again"):
        train(SMALL, out, progress=False)


def test_option_of_the_wrong_type_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="option epochs must be of type int"):
        train(dataclasses.replace(SMALL, epochs=2.5), tmp_path / "run", progress=False)


def test_unwritable_output_folder_raises_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write the run folder"):
        train(SMALL, blocker / "run", progress=False)


def test_folder_of_another_run_is_refused(tmp_path):
    train(SMALL, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="different config"):
        train(dataclasses.replace(SMALL, seed=1), tmp_path / "run", progress=False)


def test_cli_reports_a_bad_option_in_one_line_and_exits_1(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ncfast", "train", str(tmp_path / "run"), "--noise", "1.2",
         "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "noise rate must lie in [0, 1); found 1.2" in done.stderr and done.stdout == ""
    assert not (tmp_path / "run").exists()


# --- two-epoch runs of every model and loss ----------------------------------------------

MNIST1D_SMALL = dict(dataset="mnist1d", num_samples=300)

RUNS = {
    "mlp-ce": {},
    "mlp-batchnorm-ls": {"batch_norm": True, "loss": "ls", "smoothing": 0.2},
    "mlp-biasfree-mse": {"bias": False, "loss": "mse"},
    "cnn-ce-noisy": {**MNIST1D_SMALL, "model": "cnn", "noise": 0.2},
    "mlp-deep-linear-head": {"head_depth": 3, "noise": 0.1, "noise_kind": "pair"},
    "ufm-mse-head2": {"model": "ufm", "loss": "mse", "head_depth": 2, "bias": False,
                      "batch_size": None, "feature_decay": 1e-3},
    "digits-mlp": {"dataset": "digits", "num_samples": None, "num_features": None,
                   "num_classes": None},
}


@pytest.mark.parametrize("name", RUNS)
def test_two_epoch_run_dumps_what_the_model_computes(tmp_path, name):
    config = dataclasses.replace(SMALL, **RUNS[name])
    if config.dataset != "gaussian":
        config = dataclasses.replace(config, num_features=None, num_classes=None)
    result = train(config, tmp_path / "run", progress=False)
    run = open_run(tmp_path / "run")
    assert [checkpoint.epoch for checkpoint in run.checkpoints] == [1, 2]
    assert run.config == config.to_dict()
    last = run.checkpoints[-1]
    expected_layers = {"penultimate"} | (
        {"trunk"} | {f"linear{index}" for index in range(1, config.head_depth - 1)}
        if config.head_depth > 1 else set())
    assert set(last.splits["train"].features) == expected_layers
    assert set(last.splits) == ({"train"} if config.model == "ufm" else {"train", "test"})

    data = load_dataset(config.dataset, num_samples=config.num_samples,
                        num_features=config.num_features, num_classes=config.num_classes,
                        seed=config.seed)
    noisy = corrupt_labels(data.y_train, config.noise, num_classes=data.num_classes,
                           kind=config.noise_kind, seed=config.seed)
    train_split = last.splits["train"]
    np.testing.assert_array_equal(train_split.labels.read(), noisy)
    if config.noise > 0:
        np.testing.assert_array_equal(train_split.clean_labels.read(), data.y_train)
    else:
        assert train_split.clean_labels is None
    inputs = (torch.arange(data.y_train.size) if config.model == "ufm"
              else torch.from_numpy(data.x_train))
    result.model.eval()
    with torch.no_grad():
        layers = result.model.layers(inputs)
    for layer, features in layers.items():
        np.testing.assert_array_equal(train_split.features[layer].read(), features.numpy())
    np.testing.assert_array_equal(last.weights.read(),
                                  result.model.classifier.weight.detach().numpy())
    assert (last.bias is None) == (result.model.classifier.bias is None)
    assert last.classifier_layer == "penultimate"


def test_training_is_deterministic(tmp_path):
    config = dataclasses.replace(SMALL, noise=0.2, epochs=3)
    first = train(config, tmp_path / "a", progress=False)
    second = train(config, tmp_path / "b", progress=False)
    for name, parameter in first.model.state_dict().items():
        assert torch.equal(parameter, second.model.state_dict()[name]), name


def test_small_mlp_reaches_the_terminal_phase_on_noisy_labels(tmp_path):
    config = dataclasses.replace(SMALL, noise=0.2, width=128, epochs=60, lr=0.1,
                                 checkpoints=5, weight_decay=0.0)
    result = train(config, tmp_path / "run", progress=False)
    assert result.train_accuracy == 1.0  # corrupted labels memorised
    assert result.clean_train_accuracy == pytest.approx(0.8)
    assert result.terminal_epoch is not None and result.terminal_epoch <= 60


# --- interruption and resume -------------------------------------------------------------

RESUMABLE = dataclasses.replace(SMALL, epochs=6, checkpoints=6, noise=0.2)  # dumps 1,2,3,4,6


def _stored_files(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def test_log_spaced_epochs_end_at_the_last_epoch():
    assert training.log_spaced_epochs(6, 6) == [1, 2, 3, 4, 6]
    assert training.log_spaced_epochs(1000, 4) == [1, 10, 100, 1000]
    assert training.log_spaced_epochs(1, 5) == [1]


def test_interrupted_training_keeps_complete_dumps_and_resumes_identically(tmp_path,
                                                                          monkeypatch):
    reference = train(RESUMABLE, tmp_path / "reference", progress=False)

    original_epoch = training._train_epoch
    epochs_run = []

    def interrupted_epoch(*args, **kwargs):
        if len(epochs_run) == 4:
            raise KeyboardInterrupt  # stopped during epoch 5
        epochs_run.append(1)
        return original_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(RESUMABLE, tmp_path / "run", progress=False)
    assert [item.epoch for item in open_run(tmp_path / "run").checkpoints] == [1, 2, 3, 4]
    assert not [name for name in _stored_files(tmp_path / "run") if name.endswith(".tmp")]

    monkeypatch.setattr(training, "_train_epoch", original_epoch)
    resumed = train(RESUMABLE, tmp_path / "run", progress=False)
    assert resumed.dumped_epochs == [1, 2, 3, 4, 6]
    for name, parameter in reference.model.state_dict().items():
        assert torch.equal(parameter, resumed.model.state_dict()[name]), name
    for split in ("train", "test"):
        np.testing.assert_array_equal(
            open_run(tmp_path / "run").checkpoint(6).splits[split].features["penultimate"]
            .read(),
            open_run(tmp_path / "reference").checkpoint(6).splits[split]
            .features["penultimate"].read())


def test_interruption_while_writing_a_dump_leaves_only_complete_checkpoints(tmp_path,
                                                                           monkeypatch):
    original_write = RunWriter._write_array
    calls = []

    def failing_write(self, relative_path, array):
        calls.append(relative_path)
        if relative_path.startswith("checkpoints/epoch_000003/test"):
            raise KeyboardInterrupt  # killed half-way through checkpoint 3
        return original_write(self, relative_path, array)

    monkeypatch.setattr(RunWriter, "_write_array", failing_write)
    with pytest.raises(KeyboardInterrupt):
        train(RESUMABLE, tmp_path / "run", progress=False)
    run = open_run(tmp_path / "run")
    assert [item.epoch for item in run.checkpoints] == [1, 2]
    for checkpoint in run.checkpoints:  # every listed file is there and whole
        for split in checkpoint.splits.values():
            for array in (*split.features.values(), split.labels):
                array.check()

    monkeypatch.setattr(RunWriter, "_write_array", original_write)
    resumed = train(RESUMABLE, tmp_path / "run", progress=False)
    assert resumed.dumped_epochs == [1, 2, 3, 4, 6]


def test_rerunning_a_finished_run_trains_nothing(tmp_path, monkeypatch):
    first = train(SMALL, tmp_path / "run", progress=False)
    monkeypatch.setattr(training, "_train_epoch", None)  # would fail if called
    again = train(SMALL, tmp_path / "run", progress=False)
    assert again.dumped_epochs == [1, 2]
    assert again.train_accuracy == first.train_accuracy


def test_importing_ncfast_and_its_cli_does_not_import_torch():
    code = ("import sys, ncfast, ncfast.cli, ncfast.harness; ncfast.cli.build_parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_the_seed_drives_noise_initialisation_and_batch_order(tmp_path, monkeypatch):
    """A seed other than 0: the dumped noisy labels, the initial weights and the shuffling
    generator all follow it."""
    seeds = []

    def no_training(model, loss_function, optimizer, inputs, targets, batch_size, shuffling):
        seeds.append(shuffling.initial_seed())
        return 0.0, 0.0

    monkeypatch.setattr(training, "_train_epoch", no_training)
    config = dataclasses.replace(SMALL, noise=0.3, seed=7)
    result = train(config, tmp_path / "run", progress=False)
    data = load_dataset(config.dataset, num_samples=config.num_samples,
                        num_features=config.num_features, num_classes=config.num_classes,
                        seed=7)
    dumped = open_run(tmp_path / "run").checkpoints[-1].splits["train"].labels.read()
    np.testing.assert_array_equal(
        dumped, corrupt_labels(data.y_train, 0.3, num_classes=4, seed=7))
    torch.manual_seed(7)
    initial = build_model("mlp", input_shape=data.input_shape, num_classes=4,
                          num_train=data.y_train.size, width=config.width, depth=config.depth)
    for name, parameter in initial.state_dict().items():
        assert torch.equal(parameter, result.model.state_dict()[name]), name
    assert seeds == [7, 7]


def test_label_smoothing_uses_the_given_alpha():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    expected = functional.cross_entropy(logits, labels, label_smoothing=0.3)
    torch.testing.assert_close(make_loss("ls", 0.3)(logits, labels), expected)


def test_optimizer_applies_weight_decay_and_feature_decay():
    config = dataclasses.replace(SMALL, weight_decay=1e-3)
    model = build_model("mlp", input_shape=(8,), num_classes=4, num_train=10, width=4, depth=1)
    assert [group["weight_decay"] for group in
            training._optimizer(config, model, num_train=10).param_groups] == [1e-3]
    ufm = dataclasses.replace(SMALL, model="ufm", weight_decay=1e-3, feature_decay=2e-2)
    model = build_model("ufm", input_shape=(8,), num_classes=4, num_train=10, width=4)
    groups = training._optimizer(ufm, model, num_train=10).param_groups
    assert groups[0]["params"] == [model.trunk.features]
    assert [group["weight_decay"] for group in groups] == [2e-2, 1e-3]


def test_training_runs_the_model_in_train_mode(tmp_path):
    """BatchNorm's running statistics move during training (they do not in eval mode)."""
    config = dataclasses.replace(SMALL, batch_norm=True, epochs=1, checkpoints=1)
    result = train(config, tmp_path / "run", progress=False)
    norms = [module for module in result.model.modules() if isinstance(module, nn.BatchNorm1d)]
    assert norms and all(int(module.num_batches_tracked) > 0 for module in norms)


def test_epoch_accuracy_is_over_every_row():
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))  # predicts class 0
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-12)
    targets = torch.tensor([0, 1, 0, 2, 0, 1, 0, 2, 1, 1])
    _, accuracy = training._train_epoch(model, make_loss("ce"), optimizer, torch.randn(10, 2),
                                        targets, 3, torch.Generator().manual_seed(0))
    assert accuracy == pytest.approx(0.4)


def test_noise_leaving_clean_rows_in_one_class_only_is_refused():
    clean = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="leaves uncorrupted rows in 1 class"):
        training.check_clean_rows(0.5, clean, np.array([0, 0, 0, 0]))
    training.check_clean_rows(0.25, clean, np.array([0, 0, 1, 0]))  # 2 classes keep clean rows
