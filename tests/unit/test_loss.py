"""The MTP loss formula against a hand computation, the zero-token case, and the gradient injection."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_mtp.loss.metrics import count_main_agreement
from megatron_mtp.loss.mtp_loss import OutputHead, inject_mtp_loss, mtp_loss

VOCAB, HIDDEN, BATCH, SEQ = 7, 5, 2, 6


class _Linear(torch.nn.Module):
    """Stands in for the ColumnParallelLinear output layer at TP=1."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN))

    def forward(self, hidden, weight=None):
        return hidden @ (self.weight if weight is None else weight).t(), None


def _cross_entropy(labels, logits):  # labels [b, s], logits [s, b, V] -> [b, s]
    return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")


def _case(seed=0):
    torch.manual_seed(seed)
    head = OutputHead(_Linear(), None, _cross_entropy)
    hidden = [torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True) for _ in range(2)]
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ)
    mask[0, 1] = 0
    mask[1, 4] = 0
    return head, hidden, labels, mask


def _by_hand(head, hidden, labels, mask, weights, scale):
    """Loops over positions: depth k at t scores label[t+k] (token t+k+1), if t+k is in range and unmasked."""
    total = 0.0
    for depth, states in enumerate(hidden, start=1):
        loss_sum, count = 0.0, 0
        for b in range(BATCH):
            for t in range(SEQ - depth):
                if mask[b, t + depth]:
                    logits = states[t, b] @ head.output_layer.weight.t()
                    loss_sum += -torch.log_softmax(logits, -1)[labels[b, t + depth]].item()
                    count += 1
        total += weights[depth - 1] * loss_sum / count
    return scale * total / sum(weights)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.5), (1.0, 0.25)])
def test_weighted_depth_losses_match_hand_computation(weights):
    head, hidden, labels, mask = _case()
    result = mtp_loss(hidden, head, labels, mask, depth_weights=weights, loss_scale=0.3, per_token_loss=False)
    assert math.isclose(result.term.item(), _by_hand(head, hidden, labels, mask, weights, 0.3), rel_tol=1e-5)


def test_acceptance_counts_compare_top1_with_labels_and_main_predictions():
    head, hidden, labels, mask = _case()
    main_predictions = torch.randint(0, VOCAB, (BATCH, SEQ))
    result = mtp_loss(hidden, head, labels, mask, (1.0, 1.0), 0.1, per_token_loss=False, want_stats=True)
    stats = count_main_agreement(result.stats, result.predictions, main_predictions, mask)
    for depth, states in enumerate(hidden, start=1):
        top1 = (states @ head.output_layer.weight.t()).argmax(-1).t()  # [b, s]
        valid = torch.zeros(BATCH, SEQ, dtype=torch.bool)
        valid[:, : SEQ - depth] = mask[:, depth:] > 0
        target = torch.zeros_like(labels)
        target[:, : SEQ - depth] = labels[:, depth:]
        main = torch.zeros_like(labels)
        main[:, : SEQ - depth] = main_predictions[:, depth:]
        _, tokens, correct_label, correct_main = stats[depth - 1, :4].tolist()
        assert tokens == valid.sum()
        assert correct_label == ((top1 == target) & valid).sum()
        assert correct_main == ((top1 == main) & valid).sum()


def test_no_valid_mtp_token_gives_zero_loss_and_zero_gradient():
    head, hidden, labels, _ = _case()
    mask = torch.zeros(BATCH, SEQ)
    mask[:, 0] = 1  # only the first position: no depth has a target left
    result = mtp_loss(hidden, head, labels, mask, (1.0, 1.0), 0.1, per_token_loss=False)
    assert result.term.item() == 0.0
    result.term.backward()
    assert all(torch.isfinite(h.grad).all() and h.grad.abs().sum() == 0 for h in hidden)


@pytest.mark.parametrize("per_token_loss", [False, True])
def test_injected_term_gets_the_main_loss_gradient_scale(per_token_loss):
    """d(total)/d(term) is the scale the user's loss puts on the (mean or summed) main loss."""
    lm_loss = torch.rand(BATCH, SEQ, requires_grad=True)
    term = torch.tensor(0.7, requires_grad=True)
    mask = torch.ones(BATCH, SEQ)
    mask[0, :3] = 0
    scale = 0.125  # e.g. grad scaler / number of micro-batches
    out = inject_mtp_loss(lm_loss, term, mask, per_token_loss)
    assert torch.equal(out, lm_loss)
    main = (out * mask).sum() if per_token_loss else (out * mask).sum() / mask.sum()
    (scale * main).backward()
    assert math.isclose(term.grad.item(), scale, rel_tol=1e-6)
    assert torch.allclose(lm_loss.grad, scale * mask / (1 if per_token_loss else mask.sum()))
