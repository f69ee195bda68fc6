"""The project's own documentation: README's streaming example runs, every metric is described."""
import dataclasses
import os
import re

import numpy as np
import pytest

from ncfast import METRICS, CollapseReport, collapse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(relative):
    with open(os.path.join(ROOT, relative), encoding="utf-8") as stream:
        return stream.read()


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_readme_streaming_example_runs_and_gives_a_report(assert_same_report):
    readme = _read("README.md")
    section = readme[readme.index("### Streaming states"):]
    namespace = {}
    exec(compile(_python_blocks(section)[0], "README.md (Streaming states)", "exec"), namespace)
    report = namespace["report"]
    assert isinstance(report, CollapseReport)
    features = np.concatenate([h for h, _ in namespace["batches"]])
    labels = np.concatenate([y for _, y in namespace["batches"]])
    expected = collapse(features, labels, num_classes=namespace["num_classes"],
                        weights=namespace["W"], bias=namespace["b"])
    # Batches of 512 rows run pass 2's float32 GEMM on other block shapes than one array of
    # 2048 rows: nc1 may differ by float32 rounding ((D + 1) float32 eps, docs/metrics.md).
    assert report.nc1 == pytest.approx(expected.nc1, rel=65 * float(np.finfo(np.float32).eps))
    assert_same_report(dataclasses.replace(report, nc1=expected.nc1), expected)


def test_every_metric_is_described_in_the_project():
    metrics_doc = _read("docs/metrics.md")
    described = set(re.findall(r"\*\*`(\w+)`\*\*", metrics_doc))
    assert set(METRICS) <= described, sorted(set(METRICS) - described)
    for name in ("ddof", "pinv_rtol", "Classes without rows"):
        assert name in metrics_doc
    algorithm_doc = _read("docs/algorithm.md")
    for topic in ("## Pass 1", "## Finalize", "## Pass 2", "## The features route",
                  "## Precision rules", "## Merging"):
        assert topic in algorithm_doc


def test_user_docs_stay_inside_the_repository():
    for relative in ("README.md", "docs/metrics.md", "docs/algorithm.md", "bench/README.md"):
        text = _read(relative)
        assert "../shared" not in text and "DESIGN.md" not in text, relative
        assert "api.finalize_pass1" not in text and "`Chunk`" not in text, relative
