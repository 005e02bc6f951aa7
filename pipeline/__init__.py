"""QINCo pipeline: neural vector compression at billion scale on Ray.

The math (model, encoder, decoders, search kernels) is plain PyTorch/NumPy in this package and
runs without Ray; the Ray layers only move data and call it.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin-wait between parallel regions collapse torch's throughput when several
# processes share cores (Ray actors and workers on one node); passive waiting costs nothing
# measurable on a dedicated core. Set before torch is imported; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
