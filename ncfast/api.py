"""``ncfast.collapse``: choose the backend, hand the inputs to the engine."""
from ncfast import engine
from ncfast.backends import select_backend
from ncfast.geometry import PINV_RTOL


def collapse(features, labels=None, *, num_classes=None, weights=None, bias=None, means=None,
             clean_labels=None, global_mean="classes", chunk_size=None, empty_classes="warn",
             pinv_rtol=PINV_RTOL, device="auto", ood=None, progress=False):
    """Measure neural collapse of a set of features in two streaming passes.

    Parameters
    ----------
    features : array of shape (n_samples, n_features), path, tensor or chunk source
        Any float dtype (float16/bfloat16 are upcast per chunk); a numpy
        array or ``np.memmap``, the path of a ``.npy`` file (memory-mapped),
        a torch CPU tensor (viewed without a copy), or a re-iterable of
        ``(features, labels)`` / ``(features, labels, clean_labels)`` chunks
        (then ``labels`` is None and ``num_classes`` is required).
    labels : int array of shape (n_samples,)
        Class of each row, in ``[0, num_classes)``; any integer dtype.
    num_classes : int, optional
        Number of classes C; defaults to the largest label + 1 (an error when
        more than half of those classes would have no rows: a stray label).
    weights : array of shape (C, n_features), optional
        Last-layer classifier ``W`` (``nn.Linear.weight``); enables NC2 on W,
        NC3, NC4, accuracy and bias collapse.
    bias : array of shape (C,), optional
    means : array of shape (C, n_features) or CollapseReport, optional
        Measure against these class means (e.g. the training report's) instead
        of the features' own: NCC generalisation on held-out features. Pass 1
        is skipped. NaN rows mark classes without a mean.
    clean_labels : int array of shape (n_samples,), optional
        True labels when ``labels`` are noisy: enables memorization, dilation,
        noise fit and the NC1 of clean rows (Nguyen et al. 2023).
    global_mean : {"classes", "samples"}
        mu_G as the mean of the class means, or of all rows.
    chunk_size : int, optional
        Rows per chunk; chosen from the row width by default. Results do not
        depend on it beyond rounding (README, "Metrics").
    empty_classes : {"warn", "ignore", "raise"}
        What to do when some of the C classes have no rows: metrics run over
        the present classes, with a warning naming the others, silently, or
        not at all (ValueError).
    pinv_rtol : float
        Eigenvalues below this fraction of the largest are cut in the
        pseudo-inverse; the report carries the rank kept.
    device : {"auto", "cpu", "cuda"}
        Where the passes run. "auto": CuPy arrays and torch CUDA tensors on
        their GPU (read in place), everything else on the CPU; "cuda": on the
        GPU, streaming host data to it (needs CuPy, ``ncfast[gpu]``).
    ood : array of shape (n_ood, n_features) or (n_features,), optional
        Out-of-distribution features, or their mean: enables ``nc5``, the mean
        ``|cos|`` between each centred class mean and the OOD mean (Ammar et
        al. 2024).
    progress : bool or ncfast.StageProgress
        Tell each stage on stderr: the rows of pass 1, the tiles of the
        class-pair sweep, the rows of pass 2 (a rich bar each on a terminal or
        in a notebook, a line each elsewhere). Off by default. A
        ``StageProgress(True, bars=progress)`` shows them as bars of a rich
        ``Progress`` of the caller's, running.

    Returns
    -------
    CollapseReport
    """
    backend = select_backend(device, features)
    source = backend.source(features, labels, clean_labels, chunk_size=chunk_size)
    return engine.run(backend, source, num_classes=num_classes, weights=weights, bias=bias,
                      means=means, clean_labels_given=clean_labels is not None,
                      global_mean=global_mean, empty_classes=empty_classes, pinv_rtol=pinv_rtol,
                      ood=ood, progress=progress)
