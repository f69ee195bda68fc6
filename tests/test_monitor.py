"""``ncfast.torch``: collapse measured through forward hooks (issue 16).

A small CNN with BatchNorm and Dropout (so eval mode matters) runs over a
loader; every report must equal ``ncfast.collapse`` of the same features
extracted by hand in eval mode, whichever route (rows held after one forward
pass, or streamed through two), and the model must come back as it was.
"""
import datetime
import gc
import pickle
import socket
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ncfast  # noqa: E402
import ncfast.torch as ncfast_torch  # noqa: E402
from ncfast.textbook import textbook_collapse  # noqa: E402
from ncfast.torch import CollapseMonitor, capture  # noqa: E402
from test_metrics import assert_matches_textbook  # noqa: E402

NUM_CLASSES = 4
NUM_ROWS = 600


class SmallNet(nn.Module):
    """8x8 images → conv maps (the input of ``block``: 4x8x8 = 256 features) → 16
    features (the input of ``fc``) → logits."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.ReLU(), nn.Dropout(0.5))
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, inputs):
        return self.fc(self.head(self.block(self.stem(inputs))))


def make_model(seed=0):
    torch.manual_seed(seed)
    model = SmallNet()
    # Running statistics away from their initial values, so that eval and train differ.
    with torch.no_grad():
        model(torch.randn(64, 1, 8, 8) * 2 + 1)
    return model


def make_data(seed=0):
    """Images whose class shifts their mean, noisy labels and the clean ones."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, NUM_CLASSES, (NUM_ROWS,), generator=generator)
    images = torch.randn(NUM_ROWS, 1, 8, 8, generator=generator) + clean[:, None, None, None]
    flip = torch.rand(NUM_ROWS, generator=generator) < 0.2
    noisy = torch.where(flip, (clean + 1) % NUM_CLASSES, clean)
    return images, noisy, clean


def batches(*arrays, size=64):
    """A list of batch tuples, the last one short."""
    return list(zip(*(array.split(size) for array in arrays)))


def by_hand(model, images):
    """Eval-mode inputs of ``block`` (flattened) and ``fc``, as numpy arrays."""
    model.eval()
    with torch.no_grad():
        stem = model.stem(images)
        penultimate = model.head(model.block(stem))
    return {"block": stem.reshape(len(images), -1).numpy(), "fc": penultimate.numpy()}


def hand_report(model, images, labels, layer="fc", clean_labels=None):
    features = by_hand(model, images)[layer]
    classifier = {"weights": model.fc.weight, "bias": model.fc.bias} if layer == "fc" else {}
    return ncfast.collapse(features, labels.numpy(), num_classes=NUM_CLASSES,
                           clean_labels=None if clean_labels is None else clean_labels.numpy(),
                           **classifier)


def hooks_of(model):
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks)
               for module in model.modules())


def test_measure_equals_collapse_of_features_extracted_by_hand(assert_same_report):
    model = make_model()
    images, labels, _ = make_data()
    report = CollapseMonitor(model, "fc", batches(images, labels)).measure()
    assert_same_report(report, hand_report(model, images, labels))
    assert report.accuracy is not None and report.nc3 is not None


def test_measure_matches_the_float64_textbook_route():
    model = make_model()
    images, labels, _ = make_data()
    report = CollapseMonitor(model, "fc", batches(images, labels)).measure()
    features = by_hand(model, images)["fc"]
    reference = textbook_collapse(features, labels.numpy(), num_classes=NUM_CLASSES,
                                  weights=model.fc.weight.detach().double().numpy(),
                                  bias=model.fc.bias.detach().double().numpy())
    assert_matches_textbook(report, reference)


@pytest.mark.parametrize("memory_budget", [ncfast_torch.DEFAULT_MEMORY_BUDGET, 0, 3000],
                         ids=["held", "streamed", "overflow-midway"])
def test_one_pass_and_two_pass_capture_give_the_same_report(memory_budget, monkeypatch,
                                                            assert_same_report):
    """Held rows, two streamed passes, and a switch to streaming in the middle of pass 1
    (chunks of 32 rows; 3000 bytes hold one chunk of ``fc`` only) all equal the hand
    extraction, for two layers at once, with label noise."""
    monkeypatch.setattr(ncfast_torch, "default_chunk_rows", lambda width, target_bytes: 32)
    model = make_model()
    images, noisy, clean = make_data()
    reports = CollapseMonitor(model, ["block", "fc"], batches(images, noisy, clean, size=50),
                              num_classes=NUM_CLASSES, memory_budget=memory_budget).measure()
    assert set(reports) == {"block", "fc"}
    assert reports["block"].num_features == 256 and reports["block"].nc3 is None
    for layer in ("block", "fc"):
        assert_same_report(reports[layer], hand_report(model, images, noisy, layer, clean))
    assert reports["fc"].memorization is not None


def test_clean_labels_array_equals_a_loader_of_triples(assert_same_report):
    model = make_model()
    images, noisy, clean = make_data()
    from_array = CollapseMonitor(model, "fc", batches(images, noisy),
                                 clean_labels=clean.numpy()).measure()
    from_triples = CollapseMonitor(model, "fc", batches(images, noisy, clean)).measure()
    expected = hand_report(model, images, noisy, clean_labels=clean)
    assert_same_report(from_array, expected)
    assert_same_report(from_triples, expected)
    assert expected.dilation is not None


def test_data_loader_with_ddp_style_names(assert_same_report):
    model = make_model()
    images, labels, _ = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=100, shuffle=True)
    report = CollapseMonitor(model, "module.fc", loader, classifier="fc").measure()
    assert_same_report(report, hand_report(model, images, labels), rtol=1e-9)


def test_model_state_and_hooks_are_restored_after_measure():
    model = make_model()
    model.train()
    model.stem[1].eval()  # a frozen BatchNorm inside a training model
    images, labels, _ = make_data()
    modes = [module.training for module in model.modules()]
    monitor = CollapseMonitor(model, ["block", "fc"], batches(images, labels),
                              memory_budget=0)
    monitor.measure()
    assert [module.training for module in model.modules()] == modes
    assert hooks_of(model) == 0
    assert torch.is_grad_enabled()


class FailOnSecondRun:
    """A loader that raises in its second iteration (the streamed route's pass 2)."""

    def __init__(self, batch_list):
        self.batch_list = batch_list
        self.runs = 0

    def __iter__(self):
        self.runs += 1
        for index, batch in enumerate(self.batch_list):
            if self.runs == 2 and index == 3:
                raise OSError("disk went away")
            yield batch


@pytest.mark.parametrize("failure", ["forward", "label", "second pass"])
def test_model_state_and_hooks_are_restored_when_measure_raises(failure):
    model = make_model()
    model.train()
    images, labels, _ = make_data()
    loader = batches(images, labels)
    expected_error, memory_budget = RuntimeError, ncfast_torch.DEFAULT_MEMORY_BUDGET
    if failure == "forward":  # a batch with two channels: the first convolution raises
        loader[2] = (torch.zeros(64, 2, 8, 8), loader[2][1])
    elif failure == "label":
        loader[1] = (loader[1][0], torch.full((64,), 7))
        expected_error = ValueError
    else:
        loader, expected_error, memory_budget = FailOnSecondRun(loader), OSError, 0
    monitor = CollapseMonitor(model, ["block", "fc"], loader, memory_budget=memory_budget)
    with pytest.raises(expected_error):
        monitor.measure()
    assert all(module.training for module in model.modules())
    assert hooks_of(model) == 0
    assert torch.is_grad_enabled()


def test_step_measures_every_nth_call():
    model = make_model()
    images, labels, _ = make_data()
    monitor = CollapseMonitor(model, "fc", batches(images, labels), every=2)
    results = [monitor.step() for _ in range(5)]
    assert [result is None for result in results] == [True, False, True, False, True]
    assert [step for step, _ in monitor.history] == [2, 4]
    assert monitor.history[0][1].nc1 == results[1].nc1


def test_capture_returns_the_features_extracted_by_hand():
    model = make_model()
    model.train()
    images, noisy, clean = make_data()
    captured = capture(model, ["block", "fc"], batches(images, noisy, clean))
    expected = by_hand(model, images)
    for layer in ("block", "fc"):
        np.testing.assert_array_equal(captured.features[layer].numpy(), expected[layer])
    assert torch.equal(captured.labels, noisy) and torch.equal(captured.clean_labels, clean)


class DictInputs(nn.Module):
    """A model fed a dict holding a tensor and a list of tensors, as tokenizers give; it
    records their devices, and runs ``SmallNet`` on zeros of the images' shape on the CPU."""

    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.devices = []

    def forward(self, inputs):
        self.devices.append({inputs["images"].device.type, inputs["extra"][0].device.type,
                             type(inputs["extra"]).__name__, inputs["name"]})
        return self.net(torch.zeros(inputs["images"].shape))


def test_tensors_inside_dict_and_list_inputs_are_moved_to_the_device():
    """Only a bare tensor used to be moved: a dict of inputs reached a model on another
    device unmoved. The ``meta`` device stands in for a GPU (its tensors hold no values)."""
    model = DictInputs()
    images, noisy, _ = make_data()
    loader = [({"images": part, "extra": (part[:1],), "name": "kept"}, labels)
              for part, labels in batches(images, noisy)]
    captured = capture(model, "net.fc", loader, device="meta")
    assert model.devices == [{"meta", "tuple", "kept"}] * len(loader)
    assert captured.features["net.fc"].shape == (NUM_ROWS, 16)


@pytest.mark.parametrize("memory_budget", [ncfast_torch.DEFAULT_MEMORY_BUDGET, 0],
                         ids=["held", "streamed"])
def test_a_batch_without_rows_adds_nothing(memory_budget, assert_same_report):
    """A batch of zero rows (its labels an empty list) ran through the model, then its
    features failed to reshape to (0, -1)."""
    model = make_model()
    images, labels, _ = make_data()
    loader = batches(images, labels)
    loader.insert(3, (images[:0], []))
    report = CollapseMonitor(model, "fc", loader, memory_budget=memory_budget).measure()
    assert_same_report(report, hand_report(model, images, labels))


@pytest.mark.parametrize("memory_budget", [ncfast_torch.DEFAULT_MEMORY_BUDGET, 0],
                         ids=["held", "streamed"])
def test_a_bad_row_is_named_by_its_index_in_the_loader(memory_budget, monkeypatch):
    """The streamed route named a row by its index in its chunk of 32."""
    monkeypatch.setattr(ncfast_torch, "default_chunk_rows", lambda width, target_bytes: 32)
    model = make_model()
    images, labels, _ = make_data()
    labels[300] = NUM_CLASSES + 3
    monitor = CollapseMonitor(model, "fc", batches(images, labels), memory_budget=memory_budget)
    with pytest.raises(ValueError, match=f"row 300 has label {NUM_CLASSES + 3}, outside"):
        monitor.measure()


class Shrinking:
    """A loader that yields one batch fewer each time: the two passes see different rows."""

    def __init__(self, batch_list):
        self.batch_list = batch_list

    def __iter__(self):
        batch_list, self.batch_list = self.batch_list, self.batch_list[:-1]
        return iter(batch_list)


def test_streamed_route_refuses_a_loader_that_changes_between_passes():
    model = make_model()
    images, labels, _ = make_data()
    monitor = CollapseMonitor(model, "fc", Shrinking(batches(images, labels)), memory_budget=0)
    with pytest.raises(ValueError, match="the loader yielded different rows in the two passes"):
        monitor.measure()


class Brightening:
    """A loader whose images grow brighter by 0.5 on each iteration: the same rows per class,
    other rows, whose class means move (as under a model in another mode)."""

    def __init__(self, images, labels):
        self.images, self.labels, self.epoch = images, labels, 0

    def __iter__(self):
        self.epoch += 1
        return iter(batches(self.images + 0.5 * self.epoch, self.labels))


def test_streamed_route_refuses_a_loader_whose_class_means_move():
    model = make_model()
    images, labels, _ = make_data()
    monitor = CollapseMonitor(model, "fc", Brightening(images, labels), num_classes=NUM_CLASSES,
                              memory_budget=0)
    with pytest.raises(ValueError, match="the loader yielded other rows in the two passes: "
                                         "their class means differ"):
        monitor.measure()


class CallsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 2)
        self.unused = nn.Linear(8, 2)

    def forward(self, inputs):
        return self.fc(self.inner(self.inner(inputs)))


def _rows():
    return [(torch.randn(6, 8), torch.tensor([0, 1, 0, 1, 0, 1]))]


@pytest.mark.parametrize("make_monitor, error, message", [
    (lambda: CollapseMonitor(CallsTwice(), "nope", _rows()), ValueError,
     "no module 'nope'; its modules are: inner, fc, unused"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", iter(_rows())), TypeError, "one-shot"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", 3), TypeError, r"not iterable \(int\)"),
    (lambda: CollapseMonitor(CallsTwice(), "inner", _rows(), num_classes=2), ValueError,
     r"pass classifier=\{'inner': None\} to measure it without one"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), classifier={"fc": None}), ValueError,
     "pass num_classes="),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), classifier=nn.ReLU()), TypeError,
     "must be an nn.Linear; found ReLU"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), every=0), ValueError, "every"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), memory_budget=-1), ValueError,
     "memory_budget"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), memory_budget=1.5), ValueError,
     "memory_budget"),
    (lambda: CollapseMonitor(nn.Linear(8, 2), "", _rows()), ValueError,  # listed no modules
     r"the model \(Linear\) has no submodules, so no module '': wrap it, e.g. in "
     r"nn.Sequential\(model\), and name its module '0'"),
    (lambda: CollapseMonitor(CallsTwice(), "", _rows()), ValueError,
     "'' names the model itself, not one of its modules; its modules are: inner, fc, unused"),
    (lambda: CollapseMonitor(
        CallsTwice(), "fc",
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_rows()[0]), shuffle=True),
        clean_labels=np.zeros(6, int)), ValueError, "this loader shuffles"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), clean_labels=np.zeros(5, int)).measure(),
     ValueError, "clean_labels has 5 entries but the loader yields more rows"),
    # .long() truncated float clean labels, and memorization was measured on them
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), clean_labels=np.arange(6) + 0.7),
     TypeError, "clean_labels must be integer class indices; found dtype float64"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), clean_labels=torch.ones(6) > 0),
     TypeError, "clean_labels must be integer class indices; found dtype bool"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), clean_labels=np.zeros((6, 1), int)),
     ValueError, r"clean_labels must be 1-D \(n_samples,\); found shape \(6, 1\)"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), clean_labels=np.zeros(7, int)).measure(),
     ValueError, "clean_labels has 7 entries but the loader yielded 6 rows"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", [(*_rows()[0], torch.zeros(5, dtype=int))]
                             ).measure(), ValueError, "6 labels but 5 clean labels"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", [{"x": 1}]).measure(), TypeError,
     "batch 0 of the loader is a dict"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", [(*_rows()[0], None, None)]).measure(),
     TypeError, "batch 0 of the loader is a tuple of 4 items; each batch must be"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", [(*_rows()[0], torch.rand(6))]).measure(),
     TypeError, "the third item of a batch is read as its clean labels"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", [(torch.randn(6, 8), torch.zeros(6))]).measure(),
     TypeError, "integer class indices"),
    (lambda: CollapseMonitor(CallsTwice(), "inner", _rows(), num_classes=2,
                             classifier={"inner": None}).measure(), ValueError, "ran twice"),
    (lambda: CollapseMonitor(CallsTwice(), "unused", _rows()).measure(), ValueError,
     "did not run"),
    (lambda: CollapseMonitor(nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 2)),
                             "0", [(torch.zeros(6, 2, dtype=int), torch.zeros(6, dtype=int))],
                             num_classes=2).measure(), TypeError, "floating-point features"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", []).measure(), ValueError, "no rows"),
    (lambda: CollapseMonitor(CallsTwice(), ["fc", "fc"], _rows()), ValueError,
     r"layer lists a module twice: \['fc', 'fc'\]"),
    (lambda: CollapseMonitor(  # the last layer sees two rows per sample
        nn.Sequential(nn.Linear(8, 6), nn.Unflatten(1, (2, 3)), nn.Flatten(0, 1),
                      nn.Linear(3, 2)), "3", _rows(), num_classes=2,
        classifier={"3": None}).measure(), ValueError,
     r"^batch 0 of the loader has 6 labels, but the input of module '3' has 12 rows"),
    (lambda: CollapseMonitor(CallsTwice(), "fc", _rows(), clean_labels=torch.zeros(
        6, dtype=int, device="meta")), ValueError,
     "^clean_labels is a torch tensor on the meta device, which holds no values"),
])
def test_misuse_is_refused_with_a_clear_message(make_monitor, error, message):
    with pytest.raises(error, match=message):
        make_monitor()


def test_a_batch_of_too_few_labels_is_named_with_both_counts():
    """A batch with one label short was blamed on the hooked module alone ("hook a module
    whose input has one row per sample"), without naming the batch."""
    images, labels, _ = make_data()
    loader = [(images[:50], labels[:50]), (images[50:100], labels[50:99])]
    with pytest.raises(ValueError, match=(
            r"^batch 1 of the loader has 49 labels, but the input of module 'fc' has 50 rows "
            r"\(shape \(50, 16\)\): either that batch's labels are not one per sample, or the "
            r"module's input does not have one row per sample, batch first")):
        CollapseMonitor(make_model(), "fc", loader).measure()


def test_labels_on_the_meta_device_are_refused():
    """Labels of a batch on the meta device failed in torch, copying out of them, instead
    of being refused as ``ncfast.collapse`` refuses them."""
    images, labels, _ = make_data()
    loader = [(images[:50], labels[:50]), (images[50:100], labels[50:100].to("meta"))]
    with pytest.raises(ValueError, match="^labels of batch 1 is a torch tensor on the "
                                         "meta device, which holds no values"):
        CollapseMonitor(make_model(), "fc", loader).measure()


def test_numpy_integer_options_are_accepted():
    """``np.int64`` budgets, intervals and class counts (e.g. computed with numpy) were
    refused as not an int."""
    monitor = CollapseMonitor(CallsTwice(), "fc", _rows(), memory_budget=np.int64(1000),
                              every=np.int32(3), num_classes=np.int64(2))
    assert (monitor.memory_budget, monitor.every, monitor.num_classes) == (1000, 3, 2)
    assert {type(value) for value in (monitor.memory_budget, monitor.every,
                                      monitor.num_classes)} == {int}


class CountedIterations(list):
    """A list of batches that counts how often it is iterated."""

    iterations = 0

    def __iter__(self):
        self.iterations += 1
        return super().__iter__()


class IndexedBatches:
    """Batches by index only (Python's older iteration protocol, which ``iter`` accepts)."""

    def __init__(self, batches):
        self.batches = batches

    def __getitem__(self, index):
        return self.batches[index]


def test_a_loader_of_indexed_batches_is_measured_as_a_list_of_them(assert_same_report):
    model, rows = CallsTwice(), _rows()
    assert_same_report(CollapseMonitor(model, "fc", IndexedBatches(rows)).measure(),
                       CollapseMonitor(model, "fc", rows).measure())


def test_building_a_monitor_does_not_iterate_its_loader():
    """It did, to refuse one-shot iterators: a DataLoader with worker processes then
    started them when the monitor was built."""
    loader = CountedIterations(_rows())
    monitor = CollapseMonitor(CallsTwice(), "fc", loader, clean_labels=np.array([0, 1] * 3))
    assert loader.iterations == 0
    monitor.measure()
    assert loader.iterations >= 1


@pytest.mark.parametrize("sampling", [
    lambda: {"sampler": torch.utils.data.SubsetRandomSampler(range(6))},
    lambda: {"sampler": torch.utils.data.WeightedRandomSampler(torch.ones(6), 6)},
    lambda: {"batch_sampler": torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(range(6)), 2, drop_last=False)},
], ids=["subset-random", "weighted-random", "random-batch-sampler"])
def test_clean_labels_are_refused_with_a_loader_that_draws_rows_at_random(sampling):
    """Only ``shuffle=True`` was caught: these paired each row with another row's clean
    label, and measured memorization on that."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_rows()[0]),
                                         **sampling())
    with pytest.raises(ValueError, match="this loader shuffles"):
        CollapseMonitor(CallsTwice(), "fc", loader, clean_labels=np.zeros(6, int))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("memory_budget", [ncfast_torch.DEFAULT_MEMORY_BUDGET, 0])
def test_cuda_model_gives_the_cpu_report(memory_budget):
    """Held rows stay on the GPU (measured there when CuPy is installed); streamed rows
    are copied to the host chunk by chunk. Either way the CPU report, to float32 GEMM
    rounding of the two devices' forward passes."""
    model = make_model()
    images, labels, _ = make_data()
    expected = CollapseMonitor(model, "fc", batches(images, labels)).measure()
    report = CollapseMonitor(model.cuda(), "fc", batches(images, labels),
                             memory_budget=memory_budget).measure()
    for name, value in expected.metrics().items():
        assert getattr(report, name) == pytest.approx(value, rel=1e-3, abs=1e-6), name


# --- Under DDP: two gloo ranks equal one process -------------------------------------------

WORLD_SIZE = 2

#: Batches of ``make_data``'s rows per rank (an uneven split, and a rank without rows).
RANK_BATCHES = {"uneven": (6, 4), "idle_rank": (10, 0)}


def _rank_batches(split, rank):
    """This rank's batches of (images, noisy, clean): consecutive slices of the rows."""
    images, noisy, clean = make_data()
    all_batches = batches(images, noisy, clean, size=60)
    counts = RANK_BATCHES[split]
    return all_batches[sum(counts[:rank]):sum(counts[:rank + 1])]


def _run_rank(rank, port, out_dir):
    """One process of the group: the monitor on a DDP-wrapped model (held and streamed,
    two layers, label noise) and the torchmetrics metric, per split of the rows."""
    import torch.distributed as dist

    from ncfast.torchmetrics import NeuralCollapse

    # A rank left waiting in a collective fails after a minute, not gloo's 30.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        model = make_model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        results = {}
        for split in RANK_BATCHES:
            loader = _rank_batches(split, rank)
            for memory_budget in (ncfast_torch.DEFAULT_MEMORY_BUDGET, 0):
                results[split, memory_budget] = CollapseMonitor(
                    wrapped, ["block", "module.fc"], loader,
                    memory_budget=memory_budget).measure()
            metric = NeuralCollapse(NUM_CLASSES, classifier=model.fc, label_noise=True)
            for images, noisy, clean in loader:
                metric.update(torch.from_numpy(by_hand(model, images)["fc"]), noisy, clean)
            results[split, "torchmetrics"] = {name: value.item()
                                              for name, value in metric.compute().items()}
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as handle:
            pickle.dump(results, handle)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """What each of two gloo ranks measured, from one spawn."""
    return _spawn_ranks(_run_rank, tmp_path_factory)


def _spawn_ranks(run_rank, tmp_path_factory):
    """Spawn ``run_rank(rank, port, out_dir)`` on a 2-process gloo group; what each rank
    pickled to ``out_dir/rank{rank}.pkl``."""
    import torch.multiprocessing as torch_mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out_dir = tmp_path_factory.mktemp("ranks")
    torch_mp.spawn(run_rank, args=(port, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [pickle.loads((out_dir / f"rank{rank}.pkl").read_bytes())
            for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("split", RANK_BATCHES)
def test_two_ddp_ranks_equal_one_process(rank_results, split, assert_same_report):
    model = make_model()
    all_batches = [batch for rank in range(WORLD_SIZE) for batch in _rank_batches(split, rank)]
    expected = CollapseMonitor(model, ["block", "fc"], all_batches).measure()
    assert expected["fc"].memorization is not None
    for results in rank_results:
        for memory_budget in (ncfast_torch.DEFAULT_MEMORY_BUDGET, 0):
            for layer in ("block", "fc"):
                assert_same_report(results[split, memory_budget][
                    "module.fc" if layer == "fc" else layer], expected[layer])
        metrics = expected["fc"].metrics()
        assert results[split, "torchmetrics"].keys() == metrics.keys()
        for name, value in metrics.items():
            assert results[split, "torchmetrics"][name] == pytest.approx(value, rel=1e-10), name


class FailsFrom(nn.Module):
    """``make_model()`` that raises from its ``first_failure``-th call on (0: the first;
    None: never)."""

    def __init__(self, first_failure):
        super().__init__()
        self.model, self.first_failure, self.calls = make_model(), first_failure, 0

    def forward(self, inputs):
        self.calls += 1
        if self.first_failure is not None and self.calls > self.first_failure:
            raise RuntimeError("out of memory on rank 1")
        return self.model(inputs)


#: A failure on rank 1 in one pass of ``measure`` (the route's memory_budget, rank 1's
#: model and its loader's labels): the pass where the other rank learns of it, and rank 1's
#: error.
FAILURES = {
    "bad_label_held": (ncfast_torch.DEFAULT_MEMORY_BUDGET, None, 7, "pass 1",
                       "row 63 has label 7, outside [0, 4)"),
    "bad_label_streamed": (0, None, 7, "pass 1", "row 63 has label 7, outside [0, 4)"),
    "forward_held": (ncfast_torch.DEFAULT_MEMORY_BUDGET, 1, None, "pass 1",
                     "out of memory on rank 1"),
    "forward_streamed_pass1": (0, 1, None, "pass 1", "out of memory on rank 1"),
    "forward_streamed_pass2": (0, 2, None, "pass 2", "out of memory on rank 1"),
}


def _run_failing_rank(rank, port, out_dir):
    """One process of the group: each failure of ``FAILURES`` on rank 1, then classifiers
    that differ between the ranks (held and streamed); the errors each rank raised."""
    import torch.distributed as dist

    # A rank left waiting in a collective fails after 30 seconds, not gloo's 30 minutes.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=30))
    try:
        errors = {}
        images, labels, _ = make_data()
        for name, (memory_budget, first_failure, bad_label, _, _) in FAILURES.items():
            model = FailsFrom(first_failure if rank == 1 else None)
            rank_labels = labels[:120].clone()
            if rank == 1 and bad_label is not None:
                rank_labels[63] = bad_label
            loader = batches(images[:120], rank_labels, size=60)
            monitor = CollapseMonitor(model, "model.fc", loader, classifier="model.fc",
                                      memory_budget=memory_budget)
            try:
                monitor.measure()
            except (ValueError, RuntimeError) as error:
                errors[name] = str(error)
        for memory_budget in (ncfast_torch.DEFAULT_MEMORY_BUDGET, 0):
            model = make_model(seed=rank)  # an unseeded classifier: each rank its own
            try:
                CollapseMonitor(model, "fc", batches(images[:120], labels[:120]),
                                memory_budget=memory_budget).measure()
            except ValueError as error:
                errors["classifiers", memory_budget] = str(error)
        from ncfast.torchmetrics import NeuralCollapse

        metric = NeuralCollapse(NUM_CLASSES)  # rank 0 gives rows of 16 features, rank 1 of 8
        metric.update(torch.randn(40, 16 if rank == 0 else 8), labels[:40])
        try:
            metric.compute()
        except ValueError as error:
            errors["widths"] = str(error)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as handle:
            pickle.dump(errors, handle)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_errors(tmp_path_factory):
    """The errors each of two gloo ranks raised, from one spawn."""
    return _spawn_ranks(_run_failing_rank, tmp_path_factory)


@pytest.mark.parametrize("name", FAILURES)
def test_a_failure_on_one_rank_stops_every_rank(rank_errors, name):
    """The failing rank raises its own error and the other one names it, in both routes:
    the other rank used to wait in the pass's collective until the group's timeout."""
    step, message = FAILURES[name][3:]
    rank0, rank1 = (errors[name] for errors in rank_errors)
    assert message in rank1
    assert rank0 == (f"rank 1 of the group failed in {step} of CollapseMonitor.measure (its "
                     "error says why), so this rank stops too")


@pytest.mark.parametrize("memory_budget", [ncfast_torch.DEFAULT_MEMORY_BUDGET, 0],
                         ids=["held", "streamed"])
def test_classifiers_that_differ_between_ranks_are_refused_on_every_rank(rank_errors,
                                                                         memory_budget):
    """Each rank scored its rows with its own classifier, and reported metrics of it."""
    for errors in rank_errors:
        assert errors["classifiers", memory_budget].startswith(
            "the ranks' classifiers differ (weights and bias are not the same on every rank)")


def test_torchmetrics_rows_of_different_widths_on_two_ranks_are_refused(rank_errors):
    """The gathered flat rows were cut at an average width (960 values of 80 rows: 12
    columns) and measured."""
    for errors in rank_errors:
        assert errors["widths"] == (
            "the processes updated with features of different widths: 80 rows hold 960 "
            "values, not 80 × 16 (the widest); every process must pass features of the same "
            "layer")


class CountingLoader:
    """A list of batches that counts its iterations (forward passes)."""

    def __init__(self, batch_list):
        self.batch_list, self.passes = batch_list, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batch_list)


@pytest.mark.parametrize("extra, passes", [(0, 1), (-1, 2)], ids=["fits", "one-byte-short"])
def test_memory_budget_decides_the_route_at_its_exact_size(monkeypatch, extra, passes):
    """Features of exactly memory_budget bytes are held (one forward pass); one byte less
    streams (two)."""
    monkeypatch.setattr(ncfast_torch, "default_chunk_rows", lambda width, target_bytes: 32)
    model = make_model()
    images, labels, _ = make_data()
    loader = CountingLoader(batches(images, labels))
    size = NUM_ROWS * 16 * 4  # fc input: 16 float32 features a row
    monitor = CollapseMonitor(model, "fc", loader, memory_budget=size + extra)
    loader.passes = 0  # the constructor's check that it is re-iterable called iter()
    monitor.measure()
    assert loader.passes == passes


def test_streamed_route_drops_the_rows_held_before_the_budget_overflowed(monkeypatch):
    """Once pass 1 overflows memory_budget, the rows held until then are freed before pass 2."""
    monkeypatch.setattr(ncfast_torch, "default_chunk_rows", lambda width, target_bytes: 32)
    seen = []

    class Recording(ncfast_torch.DistributedCollapse):
        def update_pass1(self, features, *rest):
            seen.append(weakref.ref(features))
            return super().update_pass1(features, *rest)

    monkeypatch.setattr(ncfast_torch, "DistributedCollapse", Recording)
    alive_in_pass2 = []

    class Loader(CountingLoader):
        def __iter__(self):
            if self.passes == 1:
                gc.collect()
                alive_in_pass2.append(sum(ref() is not None for ref in seen))
            return super().__iter__()

    model = make_model()
    images, labels, _ = make_data()
    loader = Loader(batches(images, labels))
    monitor = CollapseMonitor(model, "fc", loader, memory_budget=3000)
    loader.passes = 0  # the constructor's check that it is re-iterable called iter()
    monitor.measure()
    assert len(seen) > 2 and alive_in_pass2 == [0]


class GradModeRecorder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.grad_modes = model, []

    def forward(self, inputs):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.model(inputs)


@pytest.mark.parametrize("memory_budget", [ncfast_torch.DEFAULT_MEMORY_BUDGET, 0])
def test_measure_and_capture_run_the_model_without_autograd(memory_budget):
    recorder = GradModeRecorder(make_model())
    images, labels, _ = make_data()
    CollapseMonitor(recorder, "model.fc", batches(images, labels), classifier="model.fc",
                    memory_budget=memory_budget).measure()
    capture(recorder, "model.fc", batches(images, labels))
    assert recorder.grad_modes and not any(recorder.grad_modes)


@pytest.mark.parametrize("memory_budget", [ncfast_torch.DEFAULT_MEMORY_BUDGET, 0],
                         ids=["held", "streamed"])
def test_measure_leaves_no_scratch(memory_budget):
    """The chunk scratch of a measurement's passes goes when it returns, whether the rows
    were held (one ``collapse``) or streamed (``DistributedCollapse``'s passes)."""
    from ncfast.kernels import cpu

    model = make_model()
    images, labels, _ = make_data()
    cpu.release_scratch()
    CollapseMonitor(model, "fc", batches(images, labels), memory_budget=memory_budget).measure()
    assert cpu.scratch_bytes() == 0
