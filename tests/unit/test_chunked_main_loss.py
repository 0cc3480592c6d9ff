"""The main next-token loss through the chunked output layer + cross-entropy (``main_loss_implementation``)
equals ``GPTModel``'s own: per-micro-batch losses, the MTP metrics (their agreement with the main model's greedy
ids now comes from the chunks), every parameter's gradient, after one Megatron DDP step of 3 micro-batches, one of
them fully masked; without MTP and in both modes, tied and untied; fp32, one process; with the logits recomputed in
backward and kept from forward. Without labels the model still returns the logits. In bf16 the kept logits give
the recomputed gradients bit for bit without the backward matmul (through autograd and into ``main_grad``), and
that is the default there. (TP=2 with SP and PP=2: tests/distributed/test_chunked_main_loss_parallel.py; fusion:
tests/unit/test_main_grad.py.)"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from megatron_mtp.loss.chunked import chunked_token_loss
from megatron_mtp.loss.mtp_loss import OutputHead
from tiny import (
    VOCAB,
    build_model_with_weights,
    global_names,
    grad_of,
    make_batches,
    train_step,
    transformer_config,
    wrap_ddp,
)

CASES = [(0, "sequential"), (2, "sequential"), (2, "parallel")]  # (MTP num_layers, mode); 0: no MTP


def _step(mtp: MTPConfig, tied: bool, weights=None):
    """Weights, per-micro-batch LM losses, MTP stats, every parameter's gradient, output-layer calls, and the
    logits of an eval call without labels."""
    config = transformer_config(mtp)
    model, weights = build_model_with_weights(config, mtp, tied, weights)
    calls = []
    model.output_layer.register_forward_hook(lambda *_: calls.append(1))
    model = wrap_ddp(model, config)
    stats = MTPStats(mtp.num_layers) if mtp.enabled else None
    batches = make_batches(3, fully_masked_microbatch=1)
    sums, tokens = torch.stack(train_step(model, config, batches, stats)).unbind(-1)
    losses = torch.stack((sums / tokens.clamp(min=1), tokens), dim=-1)  # per micro-batch: loss per token, tokens
    grads = {name: grad_of(param).clone() for name, param in global_names(model).items()}
    model.eval()
    with torch.no_grad():
        logits = model(batches[0]["tokens"], batches[0]["position_ids"], batches[0]["attention_mask"])
    return weights, losses, stats, grads, len(calls), logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("num_layers,mode", CASES, ids=["no-mtp", "sequential", "parallel"])
def test_chunked_main_loss_equals_the_plain_one(single_process, num_layers, mode, tied):
    base = dict(num_layers=num_layers, mode=mode, loss_chunk_size=7)
    weights, losses, stats, grads, calls, logits = _step(MTPConfig(main_loss_implementation="plain", **base), tied)
    assert calls == 3 + 1  # GPTModel's output layer: one per micro-batch, and the eval call
    # Default (None): 32 tokens per micro-batch > 7 per chunk, so chunked; fp32 logits: recomputed by default.
    for main, recompute in (("chunked", None), (None, None), ("chunked", False)):
        config = MTPConfig(main_loss_implementation=main, main_loss_recompute_logits=recompute, **base)
        _, chunked_losses, chunked_stats, chunked_grads, chunked_calls, chunked_logits = _step(config, tied, weights)
        assert chunked_calls == 1  # only the eval call without labels, which returns logits
        assert chunked_logits.shape == (2, 16, VOCAB)
        torch.testing.assert_close(chunked_logits, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked_losses, losses, atol=1e-5, rtol=0)
        assert losses[1, 1] == 0 and losses[0, 0] > 0  # the masked micro-batch counted no token, the others did
        if stats is not None:
            torch.testing.assert_close(chunked_stats.values, stats.values, atol=1e-4, rtol=0)
            assert stats.values[:, 2].sum() > 0  # metrics really were counted (agreement: the test below)
        assert chunked_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=0, msg=lambda text: f"{name}: {text}")
        assert grads["output_layer.weight" if not tied else "embedding.word_embeddings.weight"].abs().sum() > 0


def test_default_keeps_the_plain_main_loss_when_one_chunk_holds_the_micro_batch(single_process):
    mtp = MTPConfig(num_layers=0, loss_chunk_size=32)  # 32 tokens per micro-batch: chunking would only cost a matmul
    *_, calls, _ = _step(mtp, tied=False)
    assert calls == 3 + 1


class _Linear(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden))
        self.bias = None


def test_chunked_token_loss_is_torch_cross_entropy_with_a_per_token_gradient_and_its_greedy_ids(gloo_world):
    torch.manual_seed(2)
    head = _Linear(vocab=11, hidden=4)
    hidden = torch.randn(5, 3, 4, requires_grad=True)  # [s, b, h]
    labels = torch.randint(0, 11, (3, 5))  # [b, s]
    incoming = torch.rand(3, 5)  # a loss function's d total / d loss[b, s], zero on masked tokens
    incoming[1] = 0.0
    logits = hidden.transpose(0, 1) @ head.weight.t()  # [b, s, V]
    expected = F.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none")
    expected_grads = torch.autograd.grad((expected * incoming).sum(), (hidden, head.weight))
    for want_predictions, recompute_logits in ((True, True), (False, True), (True, False), (False, False)):
        token_loss, predictions = chunked_token_loss(
            hidden, OutputHead(head, None, None), labels, want_predictions, 2, recompute_logits=recompute_logits
        )
        torch.testing.assert_close(token_loss, expected)
        grads = torch.autograd.grad((token_loss * incoming).sum(), (hidden, head.weight))
        torch.testing.assert_close(grads, expected_grads)
        if want_predictions:
            assert torch.equal(predictions, logits.argmax(-1))
        else:
            assert predictions is None


class _LogitsMatmuls(TorchDispatchMode):
    """Counts matmuls whose result has ``columns`` columns (the logits: [tokens, V])."""

    def __init__(self, columns: int):
        super().__init__()
        self.columns, self.count = columns, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and out.size(-1) == self.columns:
            self.count += 1
        return out


def _bf16_token_loss(recompute_logits, fusion, tokens=24, vocab=96, hidden=16, chunk=5):
    """Loss, greedy ids, d(loss . incoming)/d(hidden, weight) (with ``fusion``: the weight's from its fp32
    ``main_grad``, as Megatron DDP under gradient-accumulation fusion), saved tensors' shapes and dtypes, and the
    logits matmuls in backward, for a bf16 head; the chunked loss's 24 tokens go in 5 chunks of 5."""
    generator = torch.Generator().manual_seed(4)
    head = _Linear(vocab, hidden)
    head.weight.data = torch.randn(vocab, hidden, generator=generator).bfloat16()
    if fusion:
        head.gradient_accumulation_fusion = True
        head.weight.main_grad = torch.zeros(vocab, hidden)
        head.weight.grad_added_to_main_grad = False
    hidden_states = torch.randn(tokens, 1, hidden, generator=generator).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    incoming = torch.rand(1, tokens, generator=generator)
    # Saved tensors are listed without fusion only: a tensor an unpack hook returns is a new alias of the weight in
    # backward, on which the flag grad_added_to_main_grad would be set instead of on the parameter.
    saved = []
    listing = torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t
    )
    with contextlib.nullcontext() if fusion else listing:
        token_loss, predictions = chunked_token_loss(
            hidden_states, OutputHead(head, None, None), labels, True, chunk, recompute_logits=recompute_logits
        )
    with _LogitsMatmuls(vocab) as backward:
        (token_loss * incoming).sum().backward()
    weight_grad = head.weight.main_grad if fusion else head.weight.grad
    assert head.weight.grad_added_to_main_grad if fusion else weight_grad.dtype == torch.bfloat16
    return token_loss, predictions, (hidden_states.grad, weight_grad), saved, backward.count


@pytest.mark.parametrize("fusion", [False, True], ids=["autograd", "main_grad"])
def test_bf16_kept_logits_give_the_recomputed_gradients_bit_for_bit_without_the_backward_matmul(gloo_world, fusion):
    loss, predictions, grads, saved, matmuls = _bf16_token_loss(recompute_logits=True, fusion=fusion)
    assert matmuls == 5  # one per chunk in backward
    assert all(shape[-1] != 96 for shape, _ in saved)  # nothing vocabulary-sized kept
    for recompute_logits in (False, None):  # None: 16-bit logits are kept by default
        kept_loss, kept_predictions, kept_grads, kept_saved, kept_matmuls = _bf16_token_loss(recompute_logits, fusion)
        assert kept_matmuls == 0
        assert fusion or ((24, 96), torch.bfloat16) in kept_saved  # the logits, in the matmul's dtype
        assert torch.equal(kept_loss, loss) and torch.equal(kept_predictions, predictions)
        for kept_grad, grad in zip(kept_grads, grads, strict=True):
            assert torch.equal(kept_grad, grad)
    assert grads[1].abs().sum() > 0


def test_fp32_logits_are_recomputed_by_default(gloo_world):
    head = _Linear(vocab=96, hidden=16)
    hidden_states = torch.randn(24, 1, 16, requires_grad=True)
    labels = torch.randint(0, 96, (1, 24))
    for recompute_logits, expected_matmuls in ((None, 5), (False, 0)):
        token_loss, _ = chunked_token_loss(
            hidden_states, OutputHead(head, None, None), labels, False, 5, recompute_logits=recompute_logits
        )
        with _LogitsMatmuls(96) as backward:
            token_loss.sum().backward()
        assert backward.count == expected_matmuls
