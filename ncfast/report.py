"""``CollapseReport``: the result of one analysis."""
import math
from dataclasses import dataclass, field, fields

import numpy as np

#: Scalar metrics in the order tables show them, with a one-line meaning.
METRICS = {
    "nc1": "Tr(Sigma_W Sigma_B^+)/C', within-class variability (Papyan et al.)",
    "nc1_trace": "Tr Sigma_W / Tr Sigma_B (Tirer et al.)",
    "cdnv": "class-distance normalized variance (Galanti et al.)",
    "nc2_equinorm": "std/mean of class-mean norms",
    "nc2_equinorm_w": "std/mean of classifier row norms",
    "nc2_equiangular": "std of cosines between class means",
    "nc2_equiangular_w": "std of cosines between classifier rows",
    "nc2_maxangle": "mean |cos + 1/(C'-1)| between class means",
    "nc2_maxangle_w": "mean |cos + 1/(C'-1)| between classifier rows",
    "nc2_etf": "||nrm(M M^T) - ETF||_F of the centred means (Zhu et al.'s NC2, of the means)",
    "nc2_etf_w": "||nrm(W W^T) - ETF||_F, the classifier's NC2 (Zhu et al.)",
    "nc2_orthogonality": "off-diagonal of nrm of uncentred-mean Gram (part of Dang et al.'s NC2)",
    "gnc2": "hyperspherical energy of unit class means: mean log kernel (Wu & Papyan; Liu et al.)",
    "log_kernel_variance": "variance over class pairs of the log kernel -log||u_a - u_b||",
    "riesz_kernel_mean": "mean over class pairs of the Riesz kernel ||u_a - u_b||^-(D-2)",
    "riesz_kernel_variance": "variance over class pairs of the Riesz kernel",
    "nc3": "||nrm(W) - nrm(M)||_F^2, self-duality",
    "nc3_etf": "||nrm(W M^T) - ETF||_F (Zhu et al.)",
    "unc3": "std/mean of <w_c, mu~_c>, centred means (Wu & Papyan)",
    "nc4": "fraction where classifier and nearest class centre disagree",
    "nc5": "mean |cos| between centred class means and the OOD mean (Ammar et al.)",
    "ncc_accuracy": "nearest-class-centre accuracy",
    "accuracy": "classifier accuracy",
    "bias_collapse": "||W mu_G + b||",
    "memorization": "mean distance of corrupted rows to their true clean mean, scaled",
    "memorization_raw": "the same, unscaled",
    "dilation": "mean per-class std of clean-row distances to clean means, scaled",
    "noise_fit": "fraction of corrupted rows predicted as their noisy label",
    "nc1_clean": "nc1 of the clean rows",
    "nc1_trace_clean": "nc1_trace of the clean rows",
}

#: Classes up to which a row carries the whole matrix of cosines between centred
#: class means (``cosine_matrix``, drawn as a heatmap); beyond, the histogram of its
#: off-diagonal entries (``cosine_histogram``). Snapshot figures draw one bar per
#: class up to this many classes, distributions beyond.
DRAWN_CLASSES = 100

PER_CLASS = ("class_counts", "class_variances", "class_mean_norms", "class_ncc_accuracy",
             "class_accuracy")


# eq=False: the class's own __eq__ compares the arrays, and no field-wise __hash__ is made
# (a report holds arrays: hash(report) names the report as unhashable).
@dataclass(frozen=True, repr=False, eq=False)
class CollapseReport:
    """Neural-collapse metrics of one set of features.

    Scalar metrics are floats, or None where the inputs do not define them
    (classifier metrics without ``weights``, label-noise metrics without
    ``clean_labels``, ``nc5`` without ``ood``). ``METRICS`` gives each one's meaning.

    Per-class arrays have shape (C,); ``class_counts`` (n_c) is 0 for a class
    without rows and the others hold NaN there: ``class_variances`` (sigma_c^2, mean squared
    distance to the class mean), ``class_mean_norms`` (||mu_c - mu_G||),
    ``class_ncc_accuracy`` and ``class_accuracy``.

    Attributes
    ----------
    means : float64 array of shape (C, D)
        Class means used (NaN rows for absent classes); pass the report as
        ``means=`` to measure held-out features against them.
    present_classes : int64 array
        Classes that have a mean; class-pair metrics run over these.
    rank : int
        Numerical rank of the pseudo-inverted between-class matrix.
    pinv_condition : float
        Its largest over smallest kept eigenvalue. NC1's rounding grows with
        it: the float64 part by about 1e-16 times it; the float32 products of
        pass 2 where the residuals have little energy along the weakest kept
        directions, which a large condition often comes with (docs/metrics.md,
        "Precision": 3e-6 relative at a condition of 3e6, on 6,000 rows).
    route : {"classes", "features"}
        Whether NC1 used the eigenbasis of the C×C Gram of the means or of the
        D×D ``Sigma_B``.
    """

    num_samples: int
    num_classes: int
    num_features: int
    means: np.ndarray
    present_classes: np.ndarray
    rank: int
    pinv_condition: float
    route: str
    pinv_rtol: float
    global_mean: str
    nc1: float
    nc1_trace: float
    cdnv: float | None
    nc2_equinorm: float
    nc2_equiangular: float
    nc2_maxangle: float
    nc2_etf: float
    nc2_orthogonality: float
    gnc2: float
    log_kernel_variance: float
    riesz_kernel_mean: float
    riesz_kernel_variance: float
    ncc_accuracy: float
    class_counts: np.ndarray
    class_variances: np.ndarray
    class_mean_norms: np.ndarray
    class_ncc_accuracy: np.ndarray
    nc2_equinorm_w: float | None = None
    nc2_equiangular_w: float | None = None
    nc2_maxangle_w: float | None = None
    nc2_etf_w: float | None = None
    nc3: float | None = None
    nc3_etf: float | None = None
    unc3: float | None = None
    nc4: float | None = None
    nc5: float | None = None
    accuracy: float | None = None
    bias_collapse: float | None = None
    class_accuracy: np.ndarray | None = None
    memorization: float | None = None
    memorization_raw: float | None = None
    dilation: float | None = None
    noise_fit: float | None = None
    nc1_clean: float | None = None
    nc1_trace_clean: float | None = None
    mean_counts: np.ndarray | None = field(default=None)

    def metrics(self):
        """The scalar metrics that are defined, as ``{name: float}``."""
        return {name: getattr(self, name) for name in METRICS if getattr(self, name) is not None}

    def to_dict(self):
        """JSON-safe dict: scalars, per-class lists and run facts (NaN and ±inf, which strict
        JSON has no numbers for, become None)."""
        result = {}
        for item in fields(self):
            if item.name in ("means", "mean_counts"):
                continue
            result[item.name] = _json_safe(getattr(self, item.name))
        return result

    def __eq__(self, other):
        """Equal when every field is: arrays entry by entry, NaN equal to NaN (a metric
        undefined in both)."""
        if type(other) is not type(self):
            return NotImplemented
        return all(_same_value(getattr(self, item.name), getattr(other, item.name))
                   for item in fields(self))

    def __repr__(self):
        head = (f"CollapseReport(N={self.num_samples}, C={self.num_classes}, "
                f"D={self.num_features}, classes with means={self.present_classes.size}, "
                f"rank={self.rank}, route={self.route!r})")
        metrics = self.metrics()
        width = max(map(len, metrics))
        rows = [f"  {name:<{width}}  {_format(value)}" for name, value in metrics.items()]
        return "\n".join([head, *rows])


def _same_value(first, second):
    if isinstance(first, (np.ndarray, float)) and isinstance(second, (np.ndarray, float)):
        return np.array_equal(first, second, equal_nan=True)
    return type(first) is type(second) and first == second


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _json_safe(value):
    if isinstance(value, np.ndarray):
        return [_json_safe(item) for item in value.tolist()]
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
