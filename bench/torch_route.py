"""The accumulator route of the public torch neural-collapse library, written from its description.

Pass 1 accumulates class sums with a one-hot matmul per batch. Pass 2, per
batch: the D×D within-class covariance ``(X - M[y])^T (X - M[y])``; the
per-class squared residual norms through the one-hot matrix again; NCC
decisions from the squared distances of every row to every class mean; and
the classifier's argmax. Finally a D×D pseudo-inverse of ``Sigma_B``. Float32
throughout, the library's default accumulator dtype.

The NCC distances come in two variants (``ncc``), both benchmark routes:

``"broadcast"`` (the default, route ``torch``)
    ``((x[:, None, :] - mu[None, :, :]) ** 2).sum(-1)``: the route as the
    issue that asked for this baseline describes it ("broadcast NCC
    distances"). Its B×C×D difference tensor is computed over sub-batches
    of rows so that it stays within ``BROADCAST_BYTES``.
``"gemm"`` (route ``torch-gemm``)
    ``||x||^2 + ||mu||^2 - 2 x.mu``: the formula the library's code actually
    uses, one GEMM per batch; the stronger baseline.
"""
import torch

#: Bytes of float32 scratch the broadcast NCC distances may hold at once: the
#: differences ``x - mu`` of a sub-batch of rows and their squares, each
#: ``rows × C × D``. A whole 8192-row batch at C=100, D=512 would need 1.7 GB
#: for each; 256 MiB bounds both together (655 rows there) and is still far
#: larger than any cache, so the sub-batching changes the route's memory, not
#: the way it streams through it.
BROADCAST_BYTES = 256 << 20


def broadcast_distances(batch, means):
    """Squared distances from every row to every class mean, by broadcasting.

    ``((batch[:, None, :] - means[None, :, :]) ** 2).sum(dim=-1)``, computed on
    sub-batches of rows so that its two ``rows × C × D`` temporaries stay
    within ``BROADCAST_BYTES`` together.

    Parameters
    ----------
    batch : float32 tensor of shape (n_rows, n_features)
    means : float32 tensor of shape (n_classes, n_features)

    Returns
    -------
    float32 tensor of shape (n_rows, n_classes)
    """
    bytes_per_row = 2 * means.numel() * means.element_size()
    sub_batch_rows = max(1, BROADCAST_BYTES // bytes_per_row)
    return torch.cat([
        ((batch[start:start + sub_batch_rows, None, :] - means[None, :, :]) ** 2).sum(dim=-1)
        for start in range(0, len(batch), sub_batch_rows)])


def gemm_distances(batch, means):
    """Squared distances from every row to every class mean as ``||x||^2 + ||mu||^2 - 2 x.mu``.

    Parameters
    ----------
    batch : float32 tensor of shape (n_rows, n_features)
    means : float32 tensor of shape (n_classes, n_features)

    Returns
    -------
    float32 tensor of shape (n_rows, n_classes)
    """
    return ((batch ** 2).sum(dim=1, keepdim=True) + (means ** 2).sum(dim=1)[None, :]
            - 2.0 * batch @ means.T)


#: The NCC distance variants of ``torch_collapse``, by the name its ``ncc`` takes.
NCC_DISTANCES = {"broadcast": broadcast_distances, "gemm": gemm_distances}


def torch_collapse(features, labels, *, num_classes, weights=None, bias=None,
                   batch_size=8192, ncc="broadcast", device="cpu"):
    """NC1, its trace form, CDNV, NCC accuracy and the classifier's NC4 and accuracy.

    Parameters
    ----------
    features : float32 array of shape (n_samples, n_features)
        Viewed by torch without a copy where it lives on ``device`` already (a numpy
        array on the CPU, a CuPy array on the GPU), else copied there once.
    labels : int array of shape (n_samples,)
    num_classes : int
    weights : array of shape (C, n_features), optional
    bias : array of shape (C,), optional
    batch_size : int
        Rows per accumulator update (a data loader's batch).
    ncc : {"broadcast", "gemm"}
        How the NCC distances are computed: ``broadcast_distances`` (the
        issue's description) or ``gemm_distances`` (the library's formula).
    device : str
        Torch device the route runs on ("cpu", "cuda").

    Returns
    -------
    dict
        ``nc1``, ``nc1_trace``, ``cdnv``, ``ncc_accuracy``, and with a
        classifier ``nc4`` and ``accuracy``.
    """
    if ncc not in NCC_DISTANCES:
        raise ValueError(f"ncc must be one of {sorted(NCC_DISTANCES)}, not {ncc!r}")
    ncc_distances = NCC_DISTANCES[ncc]
    rows = torch.as_tensor(features, device=device)
    targets = torch.as_tensor(labels, device=device).to(torch.int64)
    num_rows, num_features = rows.shape
    classes = torch.arange(num_classes, device=device)
    counts = torch.zeros(num_classes, device=device)
    totals = torch.zeros(num_classes, num_features, device=device)
    for start in range(0, num_rows, batch_size):
        batch, batch_labels = rows[start:start + batch_size], targets[start:start + batch_size]
        one_hot = (batch_labels[:, None] == classes).to(torch.float32)
        counts += one_hot.sum(dim=0)
        totals += one_hot.T @ batch
    means = totals / counts[:, None]
    global_mean = means.mean(dim=0)

    covariance = torch.zeros(num_features, num_features, device=device)
    sq_norm_sums = torch.zeros(num_classes, device=device)
    ncc_hits = 0
    classifier_hits = disagreements = 0
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
        bias = torch.zeros(num_classes, device=device) if bias is None else torch.as_tensor(
            bias, dtype=torch.float32, device=device)
    for start in range(0, num_rows, batch_size):
        batch, batch_labels = rows[start:start + batch_size], targets[start:start + batch_size]
        one_hot = (batch_labels[:, None] == classes).to(torch.float32)
        residuals = batch - means[batch_labels]
        covariance += residuals.T @ residuals
        sq_norm_sums += (one_hot.T @ residuals ** 2).sum(dim=1)
        ncc_predictions = ncc_distances(batch, means).argmin(dim=1)
        ncc_hits += int((ncc_predictions == batch_labels).sum())
        if weights is not None:
            predictions = (batch @ weights.T + bias).argmax(dim=1)
            classifier_hits += int((predictions == batch_labels).sum())
            disagreements += int((predictions != ncc_predictions).sum())

    centred = means - global_mean
    within = covariance / num_rows
    between = centred.T @ centred / num_classes
    nc1 = torch.trace(within @ torch.linalg.pinv(between, hermitian=True)) / num_classes
    variances = sq_norm_sums / counts
    mean_distances = torch.cdist(means, means) ** 2
    pairs = torch.triu_indices(num_classes, num_classes, offset=1)
    cdnv = ((variances[pairs[0]] + variances[pairs[1]])
            / (2.0 * mean_distances[pairs[0], pairs[1]])).mean()
    result = {
        "nc1": float(nc1),
        "nc1_trace": float(torch.trace(within) / torch.trace(between)),
        "cdnv": float(cdnv),
        "ncc_accuracy": ncc_hits / num_rows,
    }
    if weights is not None:
        result["nc4"] = disagreements / num_rows
        result["accuracy"] = classifier_hits / num_rows
    return result
