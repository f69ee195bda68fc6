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


def test_callback_refuses_a_bad_period():
    with pytest.raises(ValueError, match="every_n_epochs must be a positive int"):
        NeuralCollapseCallback("fc", every_n_epochs=0)


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
