"""The three reproductions behind ``ncfast reproduce NAME``.

Each runs a grid of settings × K seeds (``ncfast.harness.grid``: parallel,
resumable), measures every run, decides each of its claim's statements with
the two-standard-error rule (``ncfast.harness.verdicts``) and writes
``OUT/report.md`` (claim, verdicts, what the grid can and cannot decide,
tables, figures, runtime, every run with its seed and ``ncfast train``
command), ``metrics.json``/``metrics.csv`` and PNG figures into ``OUT``:

- ``memorization-dilation`` (Nguyen et al., ICLR 2023): label noise × label
  smoothing α × seeds on MNIST-1D (``ncfast.harness.memorization``).
- ``weight-decay`` (Rangamani & Banburski, ICASSP 2022): a homogeneous MLP with
  the square loss, weight decay × seeds, on digits and MNIST-1D
  (``ncfast.harness.weight_decay``).
- ``imbalanced`` (Dang et al. 2023): unconstrained features with deep
  bias-free linear heads against the closed form (``ncfast.harness.imbalanced``).

Every one takes ``grid="quick"`` (fits in 15 minutes on 2 CPU cores) or
``"full"`` (the publication grid, for a GPU), ``seeds``, ``workers``,
``device`` and ``progress``, and returns a ``Reproduction``.
"""
from ncfast.harness import imbalanced, memorization, weight_decay

#: ``ncfast reproduce NAME`` -> the function that runs it.
REPRODUCTIONS = {"memorization-dilation": memorization.memorization_dilation,
                 "weight-decay": weight_decay.weight_decay,
                 "imbalanced": imbalanced.imbalanced}

#: Grids every reproduction has, by name.
GRIDS = {"memorization-dilation": memorization.GRIDS, "weight-decay": weight_decay.GRIDS,
         "imbalanced": imbalanced.GRIDS}
