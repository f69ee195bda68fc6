"""Benchmark ``ncfast.torch.CollapseMonitor.measure`` against one eval-mode forward pass.

A ResNet-18 (torchvision's layout: 7×7 stem and max-pool, four stages of two
basic blocks, 64 to 512 channels, 11.2M parameters, 512 penultimate
features) runs on synthetic 32×32 RGB images (default 50,000, 10 classes,
batches of 256). Timed, in this order, ``--repeats`` times (best of each):

- one eval-mode forward pass over the data under ``torch.no_grad()``: the
  unit of the table;
- ``measure()`` with the features held (``memory_budget`` default: the
  50,000 × 512 float32 rows take 102 MB): one forward pass, then the two
  ncfast passes in memory (issue 16's target: at most 1.1× the forward pass);
- ``measure()`` streamed (``memory_budget=0``): two forward passes, one per
  ncfast pass (target: at most 2.2×).

The hooked layer is ``fc`` (its input: the penultimate features, its weights:
the classifier). The two reports must agree to 1e-10 relative. Prints the
table (wall time, and the CPU time of every thread of the process, which
other jobs on a shared machine disturb less) and the load average, and
writes ``bench/results/monitor-<UTC time>.json``.

Run: ``.venv/bin/python -m bench.bench_monitor [--rows 50000] [--repeats 1]
[--device cpu|cuda]``
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
from torch import nn

import ncfast
from bench.checks import REORDERED_RTOL, worst_metric_error
from bench.machine import result_path
from ncfast.dumps import write_atomically
from ncfast.torch import CollapseMonitor

NUM_CLASSES = 10
BATCH_ROWS = 256
TARGETS = {"held": 1.1, "streamed": 2.2}


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, inputs):
        out = torch.relu(self.bn1(self.conv1(inputs)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(inputs))


class ResNet18(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, stride),
                                        BasicBlock(channels, channels, 1)))
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, images):
        return self.fc(self.pool(self.stages(self.stem(images))))


def synthetic_batches(num_rows, seed=0):
    """Batches of (images of shape (256, 3, 32, 32), labels): a class pattern plus noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, 3, 32, 32, generator=generator)
    batches = []
    for start in range(0, num_rows, BATCH_ROWS):
        labels = torch.randint(0, NUM_CLASSES, (min(BATCH_ROWS, num_rows - start),),
                               generator=generator)
        images = patterns[labels] + torch.randn(len(labels), 3, 32, 32, generator=generator)
        batches.append((images, labels))
    return batches


def forward_pass(model, batches, device):
    """One eval-mode forward pass over every batch (what ``measure`` is compared with)."""
    model.eval()
    with torch.no_grad():
        for images, _ in batches:
            model(images.to(device))


def timed(function, device):
    """Wall and CPU seconds (all threads of this process) of ``function()``, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="images (default 50,000)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (best kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    if args.rows < BATCH_ROWS or args.repeats < 1:
        parser.error(f"--rows must be at least {BATCH_ROWS} and --repeats at least 1")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ResNet18().to(device)
    batches = synthetic_batches(args.rows)
    load_before = os.getloadavg()
    print(f"ResNet-18 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
          f"{args.rows:,} synthetic 32x32 images, batches of {BATCH_ROWS}, {device}, "
          f"{torch.get_num_threads()} torch threads; load average {load_before[0]:.2f}",
          flush=True)
    # Warm-up: the allocator, oneDNN's kernels and ncfast's compiled kernels.
    warm = batches[:4]
    forward_pass(model, warm, device)
    CollapseMonitor(model, "fc", warm).measure()
    CollapseMonitor(model, "fc", warm, memory_budget=0).measure()

    runs = {
        "forward": lambda: forward_pass(model, batches, device),
        "held": lambda: CollapseMonitor(model, "fc", batches, device=device).measure(),
        "streamed": lambda: CollapseMonitor(model, "fc", batches, device=device,
                                            memory_budget=0).measure(),
    }
    seconds, cpu_seconds, reports = {name: [] for name in runs}, {name: [] for name in runs}, {}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            elapsed, cpu, reports[name] = timed(run, device)
            seconds[name].append(elapsed)
            cpu_seconds[name].append(cpu)
            print(f"  run {repeat + 1}: {name:<9} {elapsed:7.1f} s wall, {cpu:7.1f} s CPU",
                  flush=True)
    load_after = os.getloadavg()
    best = {name: min(values) for name, values in seconds.items()}
    best_cpu = {name: min(values) for name, values in cpu_seconds.items()}
    worst = worst_metric_error(reports["streamed"].metrics(), reports["held"].metrics())

    print(f"\n{'route':<36}{'wall s':>8}{'x forward':>11}{'CPU s':>8}{'x forward':>11}"
          f"{'target':>9}")
    labels = {"forward": "eval-mode forward pass, no_grad",
              "held": "measure(), features held (1 pass)",
              "streamed": "measure(), streamed (2 passes)"}
    for name, label in labels.items():
        target = "" if name == "forward" else f"<= {TARGETS[name]}"
        print(f"{label:<36}{best[name]:>8.1f}{best[name] / best['forward']:>11.3f}"
              f"{best_cpu[name]:>8.1f}{best_cpu[name] / best_cpu['forward']:>11.3f}{target:>9}")
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; held "
          f"vs streamed reports differ by {worst:.1e} relative at most")

    record = {"rows": args.rows, "device": str(device), "batch_rows": BATCH_ROWS,
              "torch_threads": torch.get_num_threads(), "seconds": seconds,
              "cpu_seconds": cpu_seconds, "best": best, "best_cpu": best_cpu,
              "ratios": {name: best[name] / best["forward"] for name in TARGETS},
              "cpu_ratios": {name: best_cpu[name] / best_cpu["forward"] for name in TARGETS},
              "targets": TARGETS, "load_before": load_before, "load_after": load_after,
              "max_relative_difference": worst, "cpu": platform.processor(),
              "torch": torch.__version__, "ncfast": ncfast.__version__}
    if not worst <= REORDERED_RTOL:
        sys.exit(f"bench_monitor: held and streamed reports differ by {worst:.2e} relative (more "
                 f"than {REORDERED_RTOL:g}): a wrong result, nothing written")
    path = result_path("monitor")
    write_atomically(path, lambda stream: stream.write(json.dumps(record, indent=1).encode()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
