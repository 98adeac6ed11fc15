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
    def forward(ctx, logits: Tensor, targets: Tensor, z_loss: float) -> Tensor:
        scored = targets != IGNORE_INDEX
        count = scored.sum().clamp(min=1)  # a batch with no targets gives loss 0, not NaN
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        safe_targets = targets.clamp(min=0)
        nll = -log_probs.gather(1, safe_targets[:, None])[:, 0]
        loss = (nll * scored).sum() / count
        log_z = None
        if z_loss:
            log_z = logits[:, 0].float() - log_probs[:, 0]  # log Z = logit - log-probability, any column
            loss = loss + z_loss * (log_z.pow(2) * scored).sum() / count
        ctx.save_for_backward(log_probs, safe_targets, scored, count, log_z)
        ctx.z_loss = z_loss
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        # Unpacking fails loudly if this runs twice (retain_graph), since the buffer is reused.
        log_probs, targets, scored, count, log_z = ctx.saved_tensors
        grad = log_probs.exp_()
        if log_z is not None:
            grad.mul_((1 + 2 * ctx.z_loss * log_z)[:, None])
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1
        grad.mul_((scored.float() * (grad_output / count))[:, None])
        return grad.to(ctx.logits_dtype), None, None


def cross_entropy(logits: Tensor, targets: Tensor, z_loss: float = 0.0) -> Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) targets (IGNORE_INDEX skipped), plus
    `z_loss` x mean(log Z^2) over the same tokens."""
    return _CrossEntropy.apply(logits, targets, z_loss)
