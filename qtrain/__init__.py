"""qtrain: fully quantized, integer-only training with L1-norm batch normalization (L1BN).

The PyTorch-facing toolkit: float references (:mod:`qtrain.reference`), quantizers, layers,
models, data, training, sweeps and the ``qtrain`` command line. The integer engine it drives is
:mod:`qkernels` (numpy + numba, no torch). Importing this package imports no heavy modules;
import the submodule you need.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "calibrate"]


def __getattr__(name: str):
    """``qtrain.convert`` and ``qtrain.calibrate`` (a float model -> a quantized network:
    :mod:`qtrain.conversion`), imported when first used so that importing qtrain stays
    light."""
    if name in ("convert", "calibrate"):
        from . import conversion
        return getattr(conversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
