"""Next-token cross-entropy with an optional z-loss, in one autograd function.

The backward pass turns the saved log-probabilities into the gradient in place
(softmax * (1 + 2 z log Z) - onehot), so a training step holds one vocab-sized fp32 buffer
for the loss instead of three (log-probabilities, the zero-filled nll gradient, the
log-softmax gradient). For a 150k-row vocabulary these are the largest activations there are.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value that carries no loss (PyTorch's cross_entropy default)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, z_loss: float, weights: Tensor | None) -> tuple[Tensor, Tensor]:
        scored = targets != IGNORE_INDEX
        count = scored.sum().clamp(min=1)  # a batch with no targets gives loss 0, not NaN
        weight = scored.float() if weights is None else scored * weights.float()
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        safe_targets = targets.clamp(min=0)
        nll = -log_probs.gather(1, safe_targets[:, None])[:, 0] * scored
        loss = (nll * weight).sum() / count
        z_weight = torch.zeros_like(weight)
        if z_loss:
            log_z = logits[:, 0].float() - log_probs[:, 0]  # log Z = logit - log-probability, any column
            loss = loss + z_loss * (log_z.pow(2) * scored).sum() / count
            z_weight = 2 * z_loss * log_z * scored  # d(z log Z^2)/d logits = 2 z log Z softmax
        ctx.save_for_backward(log_probs, safe_targets, weight, z_weight, count)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_output: Tensor, _grad_nll: Tensor) -> tuple[Tensor, None, None, None]:
        # Unpacking fails loudly if this runs twice (retain_graph), since the buffer is reused.
        log_probs, targets, weight, z_weight, count = ctx.saved_tensors
        grad = log_probs.exp_()
        grad.mul_((weight + z_weight)[:, None])
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= weight
        grad.mul_(grad_output / count)
        return grad.to(ctx.logits_dtype), None, None, None


def cross_entropy(logits: Tensor, targets: Tensor, z_loss: float = 0.0) -> Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) targets (IGNORE_INDEX skipped), plus
    `z_loss` x mean(log Z^2) over the same tokens."""
    return _CrossEntropy.apply(logits, targets, z_loss, None)[0]


def weighted_cross_entropy(
    logits: Tensor, targets: Tensor, weights: Tensor, z_loss: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(loss, per-token nll): sum(weight x nll) / scored tokens, plus the z-loss as in
    `cross_entropy`; the nll (0 where not scored) is detached, for per-modality reporting."""
    return _CrossEntropy.apply(logits, targets, z_loss, weights)
