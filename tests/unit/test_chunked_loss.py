"""The chunked MTP loss equals the plain one (losses, metrics, every gradient) in one process; the latent
semantic enhancement losses equal their formulas written out in plain PyTorch and send no gradient into
their stop-gradient targets. (Under TP, SP and PP: tests/distributed/test_tp_pp.py.)"""

import pytest
import torch
import torch.nn.functional as F

from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from megatron_mtp.loss.chunked import chunked_depth_loss
from megatron_mtp.loss.latent import LatentTargets
from megatron_mtp.loss.mtp_loss import OutputHead, mtp_loss, plain_depth_loss
from tiny import (
    build_model,
    global_names,
    grad_of,
    make_batches,
    train_step,
    transformer_config,
    wrap_ddp,
)


def _run(mtp: MTPConfig, tied: bool):
    torch.manual_seed(0)
    config = transformer_config(mtp)
    model = build_model(config, mtp, tied=tied)
    model.load_state_dict(_SHARED_WEIGHTS.setdefault((mtp.mode, tied), model.state_dict()))
    model = wrap_ddp(model, config)
    stats = MTPStats(mtp.num_layers, mtp.latent_losses)
    losses = train_step(model, config, make_batches(3, fully_masked_microbatch=1), stats)
    grads = {name: grad_of(param).clone() for name, param in global_names(model).items()}
    return torch.stack(losses), stats, grads


_SHARED_WEIGHTS = {}


@pytest.mark.parametrize(
    "mode,tied", [("sequential", False), ("sequential", True), ("parallel", False), ("parallel", True)]
)
def test_chunked_loss_equals_plain_loss(single_process, mode, tied):
    base = dict(num_layers=2, mode=mode, depth_weighting="harmonic")
    plain_losses, plain_stats, plain_grads = _run(MTPConfig(loss_implementation="plain", **base), tied)
    for chunk_size, recompute in ((7, False), (1, True), (10_000, False)):
        mtp = MTPConfig(
            loss_implementation="chunked", loss_chunk_size=chunk_size, loss_recompute_logits=recompute, **base
        )
        losses, stats, grads = _run(mtp, tied)
        torch.testing.assert_close(losses, plain_losses, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.values, plain_stats.values, atol=1e-4, rtol=0)
        assert stats.values[:, 1].sum() > 0 and stats.values[:, 2:4].sum() > 0  # metrics really were counted
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0, msg=f"{name} (chunk {chunk_size})")
        assert any(name.startswith("mtp.") and grad.abs().sum() > 0 for name, grad in grads.items())


class _Linear(torch.nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden))
        self.bias = None

    def forward(self, hidden, weight=None):
        return hidden @ (self.weight if weight is None else weight).t(), None


def _cross_entropy(labels, logits):
    return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")


def test_chunked_cross_entropy_matches_torch_with_all_tokens_masked_in_one_depth():
    torch.manual_seed(1)
    head = OutputHead(_Linear(11, 4), None, _cross_entropy)
    hidden = torch.randn(6, 2, 4, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    for mask in (torch.ones(2, 6), torch.zeros(2, 6)):
        for grad_in_forward, want_stats in ((True, False), (False, True), (False, False)):
            result = chunked_depth_loss(
                hidden, head, labels, mask, want_stats, chunk_size=5, grad_in_forward=grad_in_forward
            )
            expected = (_cross_entropy(labels, hidden @ head.output_layer.weight.t()) * mask).sum()
            if grad_in_forward or want_stats:
                torch.testing.assert_close(result.loss_sum, expected)
            else:  # recomputed in backward with no metrics wanted: forward leaves the value to backward
                assert result.loss_sum.isnan()
            (hidden_grad,) = torch.autograd.grad(result.loss_sum * 3.0, hidden)
            (expected_grad,) = torch.autograd.grad(expected * 3.0, hidden)
            torch.testing.assert_close(hidden_grad, expected_grad)
            assert torch.isfinite(hidden_grad).all()


def test_gradients_kept_from_forward_serve_one_backward_only():
    head = OutputHead(_Linear(11, 4), None, _cross_entropy)
    hidden = torch.randn(6, 2, 4, requires_grad=True)
    result = chunked_depth_loss(
        hidden, head, torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6), False, chunk_size=4, grad_in_forward=True
    )
    result.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        result.loss_sum.backward()


def test_chunked_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        MTPConfig(loss_chunk_size=0)
    with pytest.raises(ValueError, match="loss_implementation"):
        MTPConfig(loss_implementation="fused")
    with pytest.raises(ValueError, match="latent_consistency_weight"):
        MTPConfig(latent_consistency_weight=-1.0)
    head = OutputHead(_Linear(11, 4), None, _cross_entropy)
    head.output_layer.bias = torch.zeros(11)
    with pytest.raises(ValueError, match="without bias"):
        chunked_depth_loss(
            torch.randn(3, 1, 4), head, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), False, chunk_size=2
        )


SEQ, BATCH, HIDDEN, VOCAB = 7, 2, 4, 13


def _latent_case():
    torch.manual_seed(2)
    head = OutputHead(_Linear(VOCAB, HIDDEN), None, _cross_entropy)
    depth_states = [torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True) for _ in range(2)]
    trunk = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    embedding = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ)
    mask[0, 2] = 0
    mask[1, SEQ - 1] = 0
    return head, depth_states, trunk, embedding, labels, mask


def _latent_by_hand(depth_states, trunk, embedding, labels, mask, alpha, beta, weights):
    """Loops over positions: depth k at t targets h_0[t+k] and E[labels[t+k]] (token t+k+1), if unmasked."""
    total = 0.0
    for depth, states in enumerate(depth_states, start=1):
        consistency = anchoring = 0.0
        count = 0
        for b in range(BATCH):
            for t in range(SEQ - depth):
                if mask[b, t + depth]:
                    consistency += ((states[t, b] - trunk[t + depth, b]) ** 2).mean().item()
                    anchoring += ((states[t, b] - embedding[labels[b, t + depth]]) ** 2).mean().item()
                    count += 1
        total += weights[depth - 1] * (alpha * consistency + beta * anchoring) / count
    return total / sum(weights)


def test_latent_losses_match_formulas_and_stop_gradients():
    head, depth_states, trunk, embedding, labels, mask = _latent_case()
    weights = (1.0, 0.5)
    targets = LatentTargets(0.3, 0.2, trunk, embedding, None, False)
    result = mtp_loss(depth_states, head, labels, mask, weights, 0.0, False, plain_depth_loss, targets)
    expected = _latent_by_hand(depth_states, trunk, embedding, labels, mask, 0.3, 0.2, weights)
    assert result.term.item() == pytest.approx(expected, rel=1e-5)
    result.term.backward()
    assert trunk.grad is None and embedding.grad is None  # stop-gradient targets
    assert all(states.grad is not None and states.grad.abs().sum() > 0 for states in depth_states)
    assert head.output_layer.weight.grad.abs().sum() == 0  # lambda = 0 here: CE contributes nothing


def test_latent_sums_are_reported_per_depth():
    head, depth_states, trunk, embedding, labels, mask = _latent_case()
    result = mtp_loss(
        depth_states,
        head,
        labels,
        mask,
        (1.0, 1.0),
        0.1,
        False,
        plain_depth_loss,
        LatentTargets(1.0, 0.0, trunk, embedding, None, False),
        want_stats=True,
    )
    stats = MTPStats(2, latent_losses=True)
    stats.add(result.stats)
    summary = stats.summary()
    one_depth = _latent_by_hand(depth_states[:1], trunk, embedding, labels, mask, 1.0, 0.0, (1.0,))
    assert summary["mtp_1_latent_consistency"] == pytest.approx(one_depth, rel=1e-5)
    assert summary["mtp_2_semantic_anchoring"] == 0.0  # beta = 0: not computed
    without_latent = MTPStats(2)
    without_latent.add(result.stats)
    assert "mtp_1_latent_consistency" not in without_latent.summary()
