"""QINCo pipeline: neural vector compression at billion scale on Ray.

The math (model, encoder, decoders, search kernels) is plain PyTorch/NumPy in this package and
runs without Ray; the Ray layers only move data and call it.
"""

__version__ = "0.1.0"
