"""QINCo pipeline: neural vector compression at billion scale on Ray.

Subpackages by layer (docs/architecture.md): ``codec`` and ``search`` hold the math in plain
PyTorch/NumPy and run without Ray or storage; ``io`` and ``index`` the files; ``train`` the
training loop; ``distributed`` the Ray layer, which only moves data and calls the math; ``stages``
the jobs; ``api`` the Python API (one call per job), which the command line (``cli``) parses for.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin-wait between parallel regions collapse torch's throughput when several
# processes share cores (Ray actors and workers on one node); passive waiting costs nothing
# measurable on a dedicated core. Set before torch is imported; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
