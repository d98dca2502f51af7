"""qkernels: the integer engine of qtrain (numpy + numba only, never torch).

The fixed-point spec lives in :mod:`qkernels.fixedpoint`, integer tensors in
:mod:`qkernels.format`, the L1BN kernels (int8 and int16 codes) in :mod:`qkernels.l1bn`, the
counter-based random stream and stochastic rounding in :mod:`qkernels.rng`, requantization with
range-chosen exponents in :mod:`qkernels.quant`, the integer softmax cross-entropy error in
:mod:`qkernels.loss`, integer SGD in :mod:`qkernels.optim`, integer reading and writing of
float32 containers in :mod:`qkernels.ieee`, max-pool (fused with a ReLU on integer codes) in
:mod:`qkernels.pool`, exact convolution weight gradients in :mod:`qkernels.conv`, operation
counts and the ASIC estimate in :mod:`qkernels.opcount`, and the slow references every kernel
is tested against in :mod:`qkernels.oracle`.
"""

from .conv import conv2d_weight_grad
from .format import QTensor, code_dtype
from .loss import softmax_xent_error
from .optim import lr_code, momentum_code, sgd_step, sgd_step_f32
from .quant import QuantCounts, quantize_nearest, quantize_stochastic
from .l1bn import (
    L1BNCache,
    count_ops,
    l1bn_backward,
    l1bn_fold,
    l1bn_forward,
    l1bn_inference,
    l1bn_update_running,
)

__all__ = [
    "QTensor",
    "QuantCounts",
    "code_dtype",
    "conv2d_weight_grad",
    "lr_code",
    "momentum_code",
    "quantize_nearest",
    "quantize_stochastic",
    "sgd_step",
    "sgd_step_f32",
    "softmax_xent_error",
    "L1BNCache",
    "count_ops",
    "l1bn_backward",
    "l1bn_fold",
    "l1bn_forward",
    "l1bn_inference",
    "l1bn_update_running",
]
__version__ = "0.1.0"
