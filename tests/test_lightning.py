"""``ncfast.lightning`` and ``ncfast.torchmetrics`` (issue 16).

The callback must log, through the module's logger, the numbers
``ncfast.collapse`` gives on features extracted by hand; the metric must
return them from its updates. (Their sync across processes is tested with
the monitor's DDP test in ``test_monitor.py``.)
"""
import csv

import numpy as np
import pytest

torch = pytest.importorskip("torch")
lightning = pytest.importorskip("lightning.pytorch")
pytest.importorskip("torchmetrics")
from torch import nn  # noqa: E402

import ncfast  # noqa: E402
from ncfast.lightning import NeuralCollapse as NeuralCollapseCallback  # noqa: E402
from ncfast.torchmetrics import NeuralCollapse as NeuralCollapseMetric  # noqa: E402

NUM_CLASSES = 3


def gaussian_rows(num_rows=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num_rows,), generator=generator)
    means = 2.0 * torch.randn(NUM_CLASSES, 8, generator=generator)
    return means[labels] + torch.randn(num_rows, 8, generator=generator), labels


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, inputs):
        return self.fc(self.trunk(inputs))

    def training_step(self, batch, batch_index):
        inputs, labels = batch
        return nn.functional.cross_entropy(self(inputs), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callbacks, tmp_path, epochs):
    inputs, labels = gaussian_rows()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels),
                                         batch_size=50, shuffle=True)
    module = Classifier()
    trainer = lightning.Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1,
        logger=lightning.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, loader)
    return module, trainer


def logged_rows(trainer):
    """The CSV logger's rows that hold callback metrics, as ``{column: float}``."""
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        return [{key: float(value) for key, value in row.items() if value}
                for row in csv.DictReader(handle) if any(key.startswith(("nc/", "layers/"))
                                                         and value for key, value in row.items())]


def test_callback_logs_what_collapse_gives_on_features_extracted_by_hand(tmp_path,
                                                                          assert_same_report):
    inputs, labels = gaussian_rows()
    fixed = [(inputs[start:start + 64], labels[start:start + 64]) for start in range(0, 300, 64)]
    every_second = NeuralCollapseCallback("fc", every_n_epochs=2)
    two_layers = NeuralCollapseCallback(["trunk.2", "fc"], loader=fixed, num_classes=NUM_CLASSES,
                                        classifier={"trunk.2": None}, prefix="layers/")
    module, trainer = fit([every_second, two_layers], tmp_path, epochs=3)

    assert [epoch for epoch, _ in every_second.history] == [1]
    assert [epoch for epoch, _ in two_layers.history] == [0, 1, 2]
    module.eval()
    with torch.no_grad():
        hidden = module.trunk[:2](inputs)
        penultimate = module.trunk(inputs)
    expected = ncfast.collapse(penultimate.numpy(), labels.numpy(), weights=module.fc.weight,
                               bias=module.fc.bias)
    final = two_layers.history[-1][1]
    assert_same_report(final["fc"], expected)
    assert_same_report(final["trunk.2"], ncfast.collapse(hidden.numpy(), labels.numpy()))

    rows = logged_rows(trainer)
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    for (epoch, report), row in zip(two_layers.history, rows):
        for layer in ("trunk.2", "fc"):
            for name, value in report[layer].metrics().items():
                assert row[f"layers/{layer}/{name}"] == pytest.approx(value, rel=1e-6), name
    epoch, report = every_second.history[0]
    assert set(report.metrics()) <= {key.removeprefix("nc/") for key in rows[epoch]}
    for name, value in report.metrics().items():
        assert rows[epoch][f"nc/{name}"] == pytest.approx(value, rel=1e-6), name
    assert "nc/nc1" not in rows[0] and "nc/nc1" not in rows[2]
    assert trainer.callback_metrics["layers/fc/nc1"].item() == pytest.approx(final["fc"].nc1,
                                                                             rel=1e-6)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_callback_measures_a_module_of_another_precision(precision, assert_same_report):
    """The trainer casts each batch to a "true" precision's dtype; the measured forward
    passes ran the float32 batches into the module and raised a dtype mismatch."""
    inputs, labels = gaussian_rows()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels),
                                         batch_size=50)
    callback = NeuralCollapseCallback("fc")
    module = Classifier()
    trainer = lightning.Trainer(
        max_epochs=1, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
        precision=precision, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False)
    trainer.fit(module, loader)
    assert not module._forward_pre_hooks
    module.eval()
    with torch.no_grad():
        penultimate = module.trunk(inputs.to(module.fc.weight.dtype))
    assert_same_report(callback.history[0][1], ncfast.collapse(
        penultimate, labels, weights=module.fc.weight, bias=module.fc.bias))


class TwoLoaders(Classifier):
    def training_step(self, batch, batch_index):
        return super().training_step(batch["first"], batch_index)


def test_callback_refuses_several_training_dataloaders():
    inputs, labels = gaussian_rows()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels),
                                         batch_size=50)
    trainer = lightning.Trainer(
        max_epochs=1, callbacks=[NeuralCollapseCallback("fc")], accelerator="cpu", devices=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False)
    with pytest.raises(ValueError, match="the trainer has 2 training dataloaders; pass the one"):
        trainer.fit(TwoLoaders(), {"first": loader, "second": loader})


@pytest.mark.parametrize("options, message", [
    ({"layer": "head"}, "the model has no module 'head'; its modules are: trunk"),
    ({"layer": "fc", "classifier": "head"}, "the model has no module 'head'"),
    ({"layer": "trunk.1"}, "pass num_classes="),
    ({"layer": "fc", "num_classes": 4}, "3 outputs as its classifier, but num_classes is 4"),
])
def test_callback_refuses_a_bad_layer_before_training(options, message):
    """A layer name that does not exist (or a classifier, or a missing num_classes) was
    reported only by the first measurement, after ``every_n_epochs`` epochs of training."""
    inputs, labels = gaussian_rows()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels),
                                         batch_size=50)
    trainer = lightning.Trainer(
        max_epochs=3, callbacks=[NeuralCollapseCallback(**options, every_n_epochs=3)],
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=message):
        trainer.fit(Classifier(), loader)
    assert trainer.global_step == 0


def test_callback_refuses_a_bad_period():
    with pytest.raises(ValueError, match="every_n_epochs must be a positive int"):
        NeuralCollapseCallback("fc", every_n_epochs=0)


def test_callback_takes_a_numpy_integer_period():
    """``every_n_epochs=np.int64(2)`` was refused as not an int (CollapseMonitor takes any
    integer)."""
    callback = NeuralCollapseCallback("fc", every_n_epochs=np.int64(2))
    assert callback.every_n_epochs == 2 and type(callback.every_n_epochs) is int


def test_callback_refuses_a_prefix_that_is_not_a_str():
    """``prefix=1`` was taken, and the first measurement failed, after training an epoch,
    with Python's TypeError for int + str."""
    with pytest.raises(TypeError, match=r"^prefix must be a str, the start of every logged "
                                        r'name \("nc/" by default\); found int 1$'):
        NeuralCollapseCallback("fc", prefix=1)


def test_metric_returns_what_collapse_gives_on_all_updates():
    features, labels = gaussian_rows(500)
    clean = labels.clone()
    noisy = torch.where(torch.arange(500) % 5 == 0, (labels + 1) % NUM_CLASSES, labels)
    classifier = nn.Linear(8, NUM_CLASSES)
    metric = NeuralCollapseMetric(NUM_CLASSES, classifier=classifier, label_noise=True)
    for start in range(0, 500, 128):
        metric.update(features[start:start + 128], noisy[start:start + 128],
                      clean[start:start + 128])
    computed = metric.compute()
    expected = ncfast.collapse(features.numpy(), noisy.numpy(), clean_labels=clean.numpy(),
                               weights=classifier.weight, bias=classifier.bias)
    assert computed.keys() == expected.metrics().keys()
    assert expected.memorization is not None and expected.nc3 is not None
    for name, value in expected.metrics().items():
        assert computed[name].item() == pytest.approx(value, rel=1e-10), name

    metric.reset()
    metric.update(features[:100], noisy[:100], clean[:100])
    assert metric.compute()["nc1"].item() == pytest.approx(ncfast.collapse(
        features[:100].numpy(), noisy[:100].numpy(), clean_labels=clean[:100].numpy(),
        num_classes=NUM_CLASSES).nc1, rel=1e-10)


def test_forward_adds_the_batch_and_returns_the_metrics_of_its_rows():
    """torchmetrics' ``forward`` reset the state to measure the batch: a batch of one
    class raised and left only its own rows in the metric, and a batch of another width
    was merged into the rows."""
    features, labels = gaussian_rows(300)
    metric = NeuralCollapseMetric(NUM_CLASSES)
    batch_metrics = metric(features[:200], labels[:200])
    expected = ncfast.collapse(features[:200].numpy(), labels[:200].numpy(),
                               num_classes=NUM_CLASSES)
    assert batch_metrics.keys() == expected.metrics().keys()
    assert batch_metrics["nc1"].item() == pytest.approx(expected.nc1, rel=1e-10)
    one_class = labels[200:] == labels[200]
    assert metric(features[200:][one_class], labels[200:][one_class]) == {}
    with pytest.raises(ValueError, match="9 columns but earlier updates had 8"):
        metric(torch.zeros(4, 9), torch.arange(4) % NUM_CLASSES)
    metric.update(features[200:][~one_class], labels[200:][~one_class])
    in_order = [features[:200], features[200:][one_class], features[200:][~one_class]]
    label_order = [labels[:200], labels[200:][one_class], labels[200:][~one_class]]
    expected = ncfast.collapse(torch.cat(in_order).numpy(), torch.cat(label_order).numpy())
    for name, value in expected.metrics().items():
        assert metric.compute()[name].item() == pytest.approx(value, rel=1e-10), name


def test_metric_keeps_its_own_copy_of_the_rows():
    """Rows passed in a buffer that the next batch overwrites were held by reference:
    every batch read as the last one."""
    features, labels = gaussian_rows(400)
    classifier = nn.Linear(8, NUM_CLASSES)
    metric = NeuralCollapseMetric(NUM_CLASSES, classifier=classifier)
    feature_buffer, label_buffer = torch.empty(100, 8), np.empty(100, np.int64)
    for start in range(0, 400, 100):
        feature_buffer.copy_(features[start:start + 100])
        label_buffer[:] = labels[start:start + 100].numpy()
        metric.update(feature_buffer, label_buffer)
    metric.update(torch.zeros(0, 8), [])  # no rows, their labels an empty (float) list
    expected = ncfast.collapse(features.numpy(), labels.numpy(), weights=classifier.weight,
                               bias=classifier.bias)
    computed = metric.compute()
    for name, value in expected.metrics().items():
        assert computed[name].item() == pytest.approx(value, rel=1e-10), name


def test_a_clone_of_the_metric_reads_the_same_classifier():
    """``clone()`` (a deep copy, as ``MetricCollection.clone(prefix=...)`` makes) copied
    the classifier, whose weights then stayed those of the moment of the copy."""
    features, labels = gaussian_rows(300)
    classifier = nn.Linear(8, NUM_CLASSES)
    clone = NeuralCollapseMetric(NUM_CLASSES, classifier=classifier).clone()
    assert clone.classifier is classifier
    with torch.no_grad():  # the model trains on
        classifier.weight.copy_(torch.randn(NUM_CLASSES, 8))
    clone.update(features, labels)
    expected = ncfast.collapse(features.numpy(), labels.numpy(), weights=classifier.weight,
                               bias=classifier.bias)
    assert clone.compute()["accuracy"].item() == pytest.approx(expected.accuracy, rel=1e-10)
    assert clone.compute()["nc3"].item() == pytest.approx(expected.nc3, rel=1e-10)


def test_a_numpy_integer_class_count_is_taken():
    """``NeuralCollapseMetric(np.int64(10))`` was refused as not an int (CollapseMonitor
    takes any integer)."""
    metric = NeuralCollapseMetric(np.int64(NUM_CLASSES))
    assert metric.num_classes == NUM_CLASSES and type(metric.num_classes) is int


def test_a_value_beyond_the_metrics_dtype_is_named_as_such():
    """It was refused as a row farther than 1e20 from its class mean."""
    metric = NeuralCollapseMetric(3)
    metric.set_dtype(torch.float16)
    features = torch.zeros(4, 2)
    features[2, 1] = 1e5
    with pytest.raises(ValueError, match=r"^row 2 has a value of magnitude 1e\+05, beyond the "
                                         r"metric's dtype float16 \(largest 6.55e\+04\): give "
                                         r"the metric a wider dtype"):
        metric.update(features, torch.tensor([0, 1, 2, 0]))


def test_metric_does_not_own_the_classifier():
    classifier = nn.Linear(8, NUM_CLASSES)
    metric = NeuralCollapseMetric(NUM_CLASSES, classifier=classifier)
    assert not list(metric.parameters())
    assert not any(key.startswith("classifier") for key in metric.state_dict())
    metric.to(torch.float64)
    assert classifier.weight.dtype == torch.float32


@pytest.mark.parametrize("make, error, message", [
    (lambda: NeuralCollapseMetric(1), ValueError, "num_classes must be an int of at least 2"),
    (lambda: NeuralCollapseMetric(3, classifier=nn.Linear(8, 4)), ValueError, "4 outputs"),
    (lambda: NeuralCollapseMetric(3).compute(), ValueError, "before any update"),
    (lambda: NeuralCollapseMetric(3).update(torch.zeros(4, 2, 2), torch.zeros(4, dtype=int)),
     ValueError, "must be 2-D"),
    (lambda: NeuralCollapseMetric(3).update(torch.zeros(4, 2), torch.zeros(4)), ValueError,
     "labels must be integers"),
    (lambda: NeuralCollapseMetric(3).update(torch.zeros(4, 2), torch.zeros(4, dtype=bool)),
     ValueError, "labels must be integers"),
    (lambda: NeuralCollapseMetric(3).update(np.zeros((4, 2)), torch.zeros(4, dtype=int)),
     TypeError, r"features must be a torch tensor; found ndarray: convert with torch.as_tensor"),
    (lambda: NeuralCollapseMetric(3).update(torch.zeros(4, 2), torch.zeros(4, dtype=int),
                                            torch.zeros(4, dtype=int)), ValueError,
     "exactly when label_noise=True"),
])
def test_metric_misuse_is_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_metric_refuses_rows_of_another_width():
    metric = NeuralCollapseMetric(3)
    metric.update(torch.zeros(4, 2), torch.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="3 columns but earlier updates had 2"):
        metric.update(torch.zeros(4, 3), torch.zeros(4, dtype=int))
    np.testing.assert_equal(len(metric.labels), 1)


def test_forward_of_a_batch_of_exactly_two_classes_returns_its_metrics():
    """A batch with two classes present is measurable and must not give {}."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 2
    features = 3.0 * labels[:, None].float() + torch.randn(60, 5, generator=generator)
    metric = NeuralCollapseMetric(num_classes=3)
    batch = metric(features, labels)
    expected = ncfast.collapse(features.numpy(), labels.numpy(), num_classes=3,
                               empty_classes="ignore")
    assert batch, "a batch of two classes gave no metrics"
    assert batch["nc1"].item() == pytest.approx(expected.nc1, rel=1e-10)


def test_forward_of_a_batch_without_two_classes_of_clean_rows_keeps_it_and_returns_nothing():
    """With label noise, a batch whose clean rows (label equal to clean label) cover one
    class raised ``collapse``'s error after ``update`` had kept its rows: a training loop
    stopped, and a retry added the rows twice."""
    features, labels = gaussian_rows(300)
    clean = labels.clone()
    noisy = torch.where(torch.arange(300) % 5 == 0, (labels + 1) % NUM_CLASSES, labels)
    metric = NeuralCollapseMetric(NUM_CLASSES, label_noise=True)
    metric(features[:294], noisy[:294], clean[:294])
    noisy[294:] = torch.tensor([0, 1, 2, 0, 1, 2])
    clean[294:] = torch.tensor([0, 2, 0, 1, 0, 1])  # only row 294 is clean
    assert metric(features[294:], noisy[294:], clean[294:]) == {}
    assert len(metric.labels) == 2
    expected = ncfast.collapse(features.numpy(), noisy.numpy(), clean_labels=clean.numpy())
    computed = metric.compute()
    for name, value in expected.metrics().items():
        assert computed[name].item() == pytest.approx(value, rel=1e-10), name


def test_forward_of_a_batch_that_cannot_be_measured_adds_no_row():
    """A batch whose class means coincide raised after ``update`` had kept its rows (a
    retry added them twice); a batch ``forward`` refuses adds none, as ``update``'s."""
    features, labels = gaussian_rows(100)
    metric = NeuralCollapseMetric(NUM_CLASSES)
    metric.update(features, labels)
    with pytest.raises(ValueError, match="the class means coincide"):
        metric(torch.ones(4, 8), torch.tensor([0, 1, 0, 1]))
    assert len(metric.labels) == len(metric.features) == 1


@pytest.mark.parametrize("meta", ["features", "labels", "clean_labels"])
def test_metric_refuses_tensors_on_the_meta_device(meta):
    """A meta tensor failed in torch (``Tensor.item()`` or copying out of it) instead of
    being refused as ``ncfast.collapse`` refuses it."""
    features, labels = gaussian_rows(30)
    batch = {"features": features, "labels": labels, "clean_labels": labels.clone()}
    batch[meta] = batch[meta].to("meta")
    metric = NeuralCollapseMetric(NUM_CLASSES, label_noise=True)
    with pytest.raises(ValueError, match=f"^{meta} is a torch tensor on the meta device, "
                                         "which holds no values"):
        metric.update(**batch)
    assert not metric.labels


def bad_batch(kind):
    """Ten rows of ``gaussian_rows`` with row 3 made bad (every row for "all labels")."""
    features, labels = gaussian_rows(10, seed=1)
    clean = labels.clone()
    if kind == "label":
        labels[3] = NUM_CLASSES + 4
    elif kind == "negative label":
        labels[3] = -1
    elif kind == "clean label":
        clean[3] = NUM_CLASSES
    elif kind == "all labels":
        labels[:] = NUM_CLASSES
    elif kind == "clean shape":
        clean = clean[:5]
    elif kind in ("nan", "inf"):
        features[3, 2] = float(kind)
    else:  # finite as float64, beyond float32
        features = features.double()
        features[3, 2] = 1e300
    return features, labels, clean


@pytest.mark.parametrize("kind, message", [
    ("label", r"^row 3 has label 7, outside \[0, 3\): labels must be class indices"),
    ("negative label", r"^row 3 has label -1, outside \[0, 3\)"),
    ("clean label", r"^row 3 has clean label 3, outside \[0, 3\)"),
    ("all labels", r"^row 0 has label 3, outside \[0, 3\)"),
    ("clean shape", r"^clean_labels must be integers of shape \(10,\)"),
    ("nan", r"^features row 3 contains NaN; every value must be finite"),
    ("inf", r"^features row 3 contains Inf; every value must be finite"),
    ("huge", r"^features row 3 holds values too large to measure"),
])
def test_metric_refuses_a_bad_batch_and_keeps_its_rows(kind, message):
    """Labels outside [0, C) and non-finite features were stored by ``update`` (and by
    ``forward``, which returned {} when no label was in range): every later ``compute``
    raised until ``reset()``."""
    features, labels = gaussian_rows(100)
    metric = NeuralCollapseMetric(NUM_CLASSES, label_noise=True)
    metric.update(features, labels, labels)
    with pytest.raises(ValueError, match=message):
        metric.update(*bad_batch(kind))
    with pytest.raises(ValueError, match=message):
        metric(*bad_batch(kind))
    assert len(metric.labels) == len(metric.clean_labels) == len(metric.features) == 1
    expected = ncfast.collapse(features.numpy(), labels.numpy(), clean_labels=labels.numpy())
    assert metric.compute()["nc1"].item() == pytest.approx(expected.nc1, rel=1e-10)
