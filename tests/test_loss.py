"""The fused cross-entropy: equal to PyTorch's loss and gradient, z-loss included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmllm.model.loss import IGNORE_INDEX, cross_entropy


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_matches_pytorch_loss_and_gradient(z_loss):
    torch.manual_seed(0)
    logits = (torch.randn(12, 40) * 3).requires_grad_()
    targets = torch.randint(0, 40, (12,))
    targets[[1, 7]] = IGNORE_INDEX
    ours = cross_entropy(logits, targets, z_loss)
    (grad_ours,) = torch.autograd.grad(ours * 2.5, logits)

    reference_logits = logits.detach().clone().requires_grad_()
    scored = targets != IGNORE_INDEX
    reference = F.cross_entropy(reference_logits, targets, ignore_index=IGNORE_INDEX)
    reference = reference + z_loss * torch.logsumexp(reference_logits[scored], dim=-1).pow(2).mean()
    (grad_reference,) = torch.autograd.grad(reference * 2.5, reference_logits)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_ours, grad_reference, atol=1e-6, rtol=1e-6)
    assert grad_ours[1].abs().max() == 0


def test_bf16_logits_get_a_bf16_gradient():
    logits = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    cross_entropy(logits, torch.arange(4)).backward()
    assert logits.grad.dtype == torch.bfloat16


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(3, 8, requires_grad=True)
    loss = cross_entropy(logits, torch.full((3,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0


def test_second_backward_fails_loudly():
    logits = torch.randn(3, 8, requires_grad=True)
    loss = cross_entropy(logits, torch.arange(3))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
