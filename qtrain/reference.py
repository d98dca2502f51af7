r"""Float reference implementations of L1-norm and L2-norm batch normalization in torch.

These define, in floating point, what the integer L1BN kernels (:mod:`qkernels.l1bn`) and the
emulation backend compute, following equations (9)-(11) and (20) of the paper
(``reference/l1bn-paper.md``):

* :func:`l1_batch_norm` -- L1BN forward with plain autograd; its gradient is the reference
  gradient. Argument order of :func:`torch.nn.functional.batch_norm`, with the running L1
  deviation in place of the running variance.
* :class:`L1BNFunction` / :func:`l1_batch_norm_eq20` -- the same training forward with the
  analytic backward of equation (20), the one the integer kernel implements.
* :func:`l2_batch_norm` -- the float L2BN baseline, :func:`torch.nn.functional.batch_norm`.
* :func:`sigma_ratio` -- per-channel :math:`\sigma_{L_2}/\sigma_{L_1}`, which is
  :math:`\sqrt{\pi/2}` for Gaussian data (Theorem 1).

Statistics are per channel (dim 1) over all other dims, so a channel of an :math:`(N, C, H, W)`
input has :math:`m = NHW` values. Unlike :func:`~torch.nn.functional.batch_norm`, ``eps = 0`` is
allowed in training, as in the integer kernels (``eps_log2=None``): a channel whose
:math:`\sigma + \epsilon` is exactly 0 is constant, its :math:`\hat x` is 0 (output ``bias``)
and it passes back no error, the convention of :mod:`qkernels.oracle`. (A channel of equal
values has an exactly zero deviation whenever its mean is exact, e.g. for fixed-point codes
whose sum is exact; with ``eps > 0`` a rounding residue in the mean is harmless.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "L1BNFunction",
    "l1_batch_norm",
    "l1_batch_norm_eq20",
    "l2_batch_norm",
    "sigma_ratio",
]


def _check_input(input: Tensor, eps: float) -> None:
    if input.dim() < 2:
        raise ValueError(
            f"expected an (N, C) or (N, C, *) input, got a {input.dim()}D input of size "
            f"{tuple(input.shape)}"
        )
    if eps < 0.0:
        raise ValueError(f"l1 batch norm eps must be non-negative, but got {eps}")


def _verify_batch_size(size: torch.Size) -> None:
    """Same check and message as :func:`torch.nn.functional.batch_norm` in training."""
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _reduce_dims(input: Tensor) -> list[int]:
    """Every dim but the channel dim 1."""
    return [0, *range(2, input.dim())]


def _per_channel(t: Tensor, input: Tensor) -> Tensor:
    """Reshape a (C,) tensor to broadcast over (N, C, *) input: (1, C, 1, ..., 1)."""
    return t.reshape((1, -1) + (1,) * (input.dim() - 2))


def _normalize(centered: Tensor, den: Tensor) -> Tensor:
    """``centered / den``, and 0 where ``den`` is exactly 0 (a constant channel, eps = 0).

    Written with a safe denominator so that autograd through it stays finite (zero gradient for
    such a channel); NaN still propagates.
    """
    zero = den == 0
    safe = torch.where(zero, torch.ones_like(den), den)
    return torch.where(zero, torch.zeros_like(centered), centered / safe)


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat
    if weight is not None:
        y = y * _per_channel(weight, xhat)
    if bias is not None:
        y = y + _per_channel(bias, xhat)
    return y


def l1_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_dev: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply L1-norm batch normalization (L1BN) to each channel across a batch of data.

    In training mode, per channel over its :math:`m` values (equations 9-11 of the paper):

    .. math::

        \mu_B = \frac{1}{m} \sum_{i=1}^m x_i, \qquad
        \sigma_B = \frac{1}{m} \sum_{i=1}^m |x_i - \mu_B|, \qquad
        \hat{x}_i = \frac{x_i - \mu_B}{\sigma_B + \epsilon}, \qquad
        y_i = \gamma \hat{x}_i + \beta,

    and the running statistics are updated in place (torch's convention, no Bessel correction
    for the L1 deviation):

    .. math::

        \hat{\mu} \leftarrow (1 - \text{momentum})\,\hat{\mu} + \text{momentum}\,\mu_B, \qquad
        \hat{\sigma} \leftarrow (1 - \text{momentum})\,\hat{\sigma} + \text{momentum}\,\sigma_B.

    In eval mode :math:`\mu_B, \sigma_B` are replaced by the running statistics
    :math:`\hat{\mu}, \hat{\sigma}`. The backward is plain autograd through these torch ops, so
    it is the reference gradient that equation (20) (:class:`L1BNFunction`) must reproduce.
    For Gaussian input :math:`\sigma_B \approx \sigma_{L_2} / \sqrt{\pi/2}` (Theorem 1), so
    ``weight`` :math:`\gamma_{L_1} = \gamma_{L_2} / \sqrt{\pi/2}` matches L2BN (equation 16).

    Args:
        input: input tensor, channels in dim 1.
        running_mean: running mean, updated in place in training mode; may be ``None`` in
            training mode (no update), required in eval mode.
        running_dev: running L1 deviation :math:`\hat{\sigma}` (not a variance), like
            ``running_mean``.
        weight: scale :math:`\gamma`; ``None`` means 1.
        bias: shift :math:`\beta`; ``None`` means 0.
        training: use batch statistics and update the running ones. Default: ``False``.
        momentum: weight of the batch statistic in the running update. Default: 0.1.
        eps: :math:`\epsilon`, added to the deviation (not under a square root); 0 is
            allowed, then a constant channel outputs ``bias``. Default: 1e-5.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, *)`.
        - ``running_mean``, ``running_dev``, ``weight``, ``bias``: :math:`(C)`.
        - Output: same shape as the input.

    Raises:
        ValueError: training with one value per channel, ``eps < 0``, input of fewer than 2
            dims, or eval mode without running statistics.

    Examples::

        >>> x = torch.randn(20, 3, 5, 5)
        >>> running_mean, running_dev = torch.zeros(3), torch.ones(3)
        >>> y = l1_batch_norm(x, running_mean, running_dev, training=True, eps=0.0)
        >>> torch.allclose(y.abs().mean(dim=(0, 2, 3)), torch.ones(3))  # unit L1 deviation
        True
        >>> l1_batch_norm(x, running_mean, running_dev).shape  # eval: running statistics
        torch.Size([20, 3, 5, 5])
    """
    _check_input(input, eps)
    if training:
        _verify_batch_size(input.shape)
        dims = _reduce_dims(input)
        mean = input.mean(dim=dims, keepdim=True)
        centered = input - mean
        dev = centered.abs().mean(dim=dims, keepdim=True)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.copy_((1 - momentum) * running_mean + momentum * mean.reshape(-1))
            if running_dev is not None:
                running_dev.copy_((1 - momentum) * running_dev + momentum * dev.reshape(-1))
    else:
        if running_mean is None or running_dev is None:
            raise ValueError("running_mean and running_dev must be defined in evaluation mode")
        centered = input - _per_channel(running_mean.to(input.dtype), input)
        dev = _per_channel(running_dev.to(input.dtype), input)
    return _affine(_normalize(centered, dev + eps), weight, bias)


class L1BNFunction(torch.autograd.Function):
    r"""L1BN training forward with the analytic backward of equation (20) of the paper.

    The forward equals :func:`l1_batch_norm` in training mode (batch statistics, no running
    statistics). With :math:`g_i = \partial\ell/\partial\hat{x}_i = \gamma\,\partial\ell/
    \partial y_i` and :math:`\mu(\cdot)` the per-channel mean over the :math:`m` values:

    .. math::

        \frac{\partial \ell}{\partial x_i} = \frac{1}{\sigma_B + \epsilon} \Big\{ g_i - \mu(g)
            - \mu(g \cdot \hat{x}) \big[\operatorname{sgn}(\hat{x}_i)
            - \mu(\operatorname{sgn}(\hat{x}))\big] \Big\}, \qquad
        \frac{\partial \ell}{\partial \gamma} = \sum_{i=1}^m \frac{\partial \ell}{\partial y_i}
            \hat{x}_i, \qquad
        \frac{\partial \ell}{\partial \beta} = \sum_{i=1}^m \frac{\partial \ell}{\partial y_i}.

    This equals the autograd gradient of :func:`l1_batch_norm` (with
    :math:`\operatorname{sgn}(0) = 0`, torch's subgradient of :math:`|x|` at 0, on both sides)
    and is what the integer kernel :func:`qkernels.l1bn_backward` implements. Only its first
    derivative is defined (``once_differentiable``).

    Use through :func:`l1_batch_norm_eq20`, which validates the arguments:
    ``L1BNFunction.apply(input, weight, bias, eps)``.
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> Tensor:
        dims = _reduce_dims(input)
        mean = input.mean(dim=dims, keepdim=True)
        centered = input - mean
        den = centered.abs().mean(dim=dims, keepdim=True) + eps
        xhat = _normalize(centered, den)
        inv = _normalize(torch.ones_like(den), den)  # 1/(sigma + eps), 0 for a constant channel
        ctx.dims = dims
        ctx.save_for_backward(xhat, inv, weight)
        return _affine(xhat, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        xhat, inv, weight = ctx.saved_tensors
        dims = ctx.dims
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            g = grad_output if weight is None else grad_output * _per_channel(weight, xhat)
            sgn = xhat.sign()
            grad_input = inv * (
                g
                - g.mean(dim=dims, keepdim=True)
                - (g * xhat).mean(dim=dims, keepdim=True)
                * (sgn - sgn.mean(dim=dims, keepdim=True))
            )
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_output * xhat).sum(dim=dims)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=dims)
        return grad_input, grad_weight, grad_bias, None


def l1_batch_norm_eq20(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""L1BN in training mode whose backward is equation (20) (:class:`L1BNFunction`).

    .. math::

        y_i = \gamma \frac{x_i - \mu_B}{\sigma_B + \epsilon} + \beta, \qquad
        \sigma_B = \frac{1}{m} \sum_{i=1}^m |x_i - \mu_B|,

    with the batch statistics of each channel; no running statistics are kept (update them
    with :func:`l1_batch_norm` or in the module). The output equals
    ``l1_batch_norm(input, None, None, weight, bias, training=True, eps=eps)`` bit for bit,
    and the gradients equal its autograd gradients up to rounding.

    Args:
        input: input tensor, channels in dim 1.
        weight: scale :math:`\gamma`; ``None`` means 1.
        bias: shift :math:`\beta`; ``None`` means 0.
        eps: :math:`\epsilon` added to the deviation; 0 is allowed. Default: 1e-5.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, *)`.
        - ``weight``, ``bias``: :math:`(C)`.
        - Output: same shape as the input.

    Raises:
        ValueError: one value per channel, ``eps < 0``, or input of fewer than 2 dims.

    Examples::

        >>> x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
        >>> w = torch.rand(4, dtype=torch.float64, requires_grad=True)
        >>> y = l1_batch_norm_eq20(x, w, None)
        >>> y.backward(torch.randn_like(y))
        >>> x.grad.sum(dim=0).abs().max() < 1e-12  # dx sums to 0 per channel
        tensor(True)
    """
    _check_input(input, eps)
    _verify_batch_size(input.shape)
    return L1BNFunction.apply(input, weight, bias, eps)


def l2_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply standard (L2-norm) batch normalization: the float L2BN baseline.

    Exactly :func:`torch.nn.functional.batch_norm`, with the same argument order as
    :func:`l1_batch_norm`, so that callers can swap the two norms:

    .. math::

        y_i = \gamma \frac{x_i - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
        \sigma_B^2 = \frac{1}{m} \sum_{i=1}^m (x_i - \mu_B)^2 .

    The running variance is updated with the unbiased (Bessel-corrected) batch variance.

    Args:
        input: input tensor, channels in dim 1.
        running_mean: running mean, updated in place in training mode.
        running_var: running variance (not a deviation), updated in place in training mode.
        weight: scale :math:`\gamma`; ``None`` means 1.
        bias: shift :math:`\beta`; ``None`` means 0.
        training: use batch statistics and update the running ones. Default: ``False``.
        momentum: weight of the batch statistic in the running update. Default: 0.1.
        eps: :math:`\epsilon`, added to the variance; torch requires ``eps > 0`` in training.
            Default: 1e-5.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, *)`.
        - ``running_mean``, ``running_var``, ``weight``, ``bias``: :math:`(C)`.
        - Output: same shape as the input.

    Examples::

        >>> x = torch.randn(20, 3, 5, 5)
        >>> y = l2_batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        >>> torch.equal(y, F.batch_norm(x, None, None, training=True))
        True
    """
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def sigma_ratio(x: Tensor) -> Tensor:
    r"""Per-channel ratio of the L2 to the L1 deviation, :math:`\sigma_{L_2} / \sigma_{L_1}`.

    .. math::

        \sigma_{L_2} = \sqrt{\frac{1}{m} \sum_{i=1}^m (x_i - \mu)^2}, \qquad
        \sigma_{L_1} = \frac{1}{m} \sum_{i=1}^m |x_i - \mu|,

    over each channel's :math:`m` values (population statistics, no Bessel correction). For
    Gaussian data the ratio tends to :math:`\sqrt{\pi/2} \approx 1.2533` (Theorem 1); it is
    at least 1 for any data (Jensen), and NaN for a constant channel (0/0). Computed in
    float64 on a detached copy.

    Args:
        x: activations, channels in dim 1.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, *)`.
        - Output: :math:`(C)`, float64.

    Examples::

        >>> x = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])  # two values per channel
        >>> sigma_ratio(x)
        tensor([1., 1.], dtype=torch.float64)
    """
    _check_input(x, 0.0)
    rows = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    centered = rows - rows.mean(dim=1, keepdim=True)
    return centered.square().mean(dim=1).sqrt() / centered.abs().mean(dim=1)
