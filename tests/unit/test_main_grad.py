"""Gradient-accumulation fusion (Megatron-LM's GPU default): Megatron's linear layers add their weight gradients
straight into Megatron DDP's fp32 ``main_grad`` and mark them ``grad_added_to_main_grad``, after which DDP's hook
ignores ``param.grad``. The MTP loss must put its share of the output weight's gradient there too.

Fusion on equals fusion off, every parameter's ``main_grad`` after a step, both modes, tied and untied output
weights, the chunked and the plain loss (one process; PP=2: tests/distributed/test_main_grad_parallel.py). The fused
kernel is the CPU bridge's stand-in. The chunked loss keeps no output-weight-sized buffer when it writes into
``main_grad``, and its automatic choice between keeping gradients from forward and recomputing the logits in
backward follows the rule in ``loss/chunked.py``. The word-embedding lookup adds its weight gradient into
``main_grad`` too (``layers/embedding_grad.py``), with the same gradients, also under overlapped gradient reduction
and the distributed optimizer, and no weight-sized tensor made in a step. In bf16 the chunked loss's backward holds
one fp32 chunk of logits at a time, and fp32 sums of 16-bit weight-gradient products make no fp32 copy of a whole
gradient (ours, and the bridge's stand-in for apex's kernel, which makes none)."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mtp import cpu_bridge
from megatron_mtp.config import MTPConfig
from megatron_mtp.layers.embedding_grad import fuse_embedding_weight_grad
from megatron_mtp.loss.chunked import chunked_depth_loss, gradients_in_forward
from megatron_mtp.loss.mtp_loss import OutputHead
from tiny import build_model_with_weights, global_names, make_batches, train_step, transformer_config, wrap_ddp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from bench_mtp import cpu_peak_new_bytes  # noqa: E402

LOSSES = {  # 32 tokens per micro-batch: the main loss is chunked by default with 7-token chunks, plain with 512
    "plain": dict(loss_implementation="plain"),
    "chunked": dict(loss_implementation="chunked", loss_chunk_size=7),
    "chunked depths, plain main loss": dict(
        loss_implementation="chunked", loss_chunk_size=7, main_loss_implementation="plain"
    ),
    "chunked, gradients kept from forward": dict(
        loss_implementation="chunked", loss_chunk_size=7, loss_recompute_logits=False
    ),
    "chunked, main logits kept from forward": dict(
        loss_implementation="chunked", loss_chunk_size=7, main_loss_recompute_logits=False
    ),
}


def _step_main_grads(
    mtp: MTPConfig, tied: bool, fusion: bool, weights=None, overlap_grad_reduce=False, use_distributed_optimizer=False
):
    """Initial weights and every parameter's main_grad after one Megatron DDP step of 2 micro-batches."""
    config = transformer_config(mtp, gradient_accumulation_fusion=fusion)
    model, weights = build_model_with_weights(config, mtp, tied, weights)
    model = wrap_ddp(model, config, use_distributed_optimizer, overlap_grad_reduce)
    train_step(model, config, make_batches(2))
    core = model.module
    output_weight = core.shared_embedding_or_output_weight() if tied else core.output_layer.weight
    assert output_weight.grad_added_to_main_grad == fusion
    assert core.embedding.word_embeddings.weight.grad_added_to_main_grad == fusion
    return weights, {name: param.main_grad.clone() for name, param in global_names(model).items()}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_fusion_on_gives_the_main_grads_of_fusion_off(single_process, mode, tied, loss):
    mtp = MTPConfig(num_layers=2, mode=mode, depth_weighting="harmonic", **LOSSES[loss])
    weights, expected = _step_main_grads(mtp, tied, fusion=False)
    _, fused = _step_main_grads(mtp, tied, fusion=True, weights=weights)
    assert fused.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(fused[name], grad, atol=1e-5, rtol=0, msg=lambda text: f"{name}: {text}")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("recompute_logits", [True, False], ids=["recomputed", "kept"])
def test_fusion_on_gives_the_main_grads_of_fusion_off_with_the_chunked_main_loss_and_no_mtp(
    single_process, tied, recompute_logits
):
    # No other user of the output weight in backward: the chunked main loss itself returns Megatron's dummy
    # gradient, which DDP's hook asserts under overlap_grad_reduce (and ignores, the gradient being in main_grad).
    mtp = MTPConfig(
        num_layers=0, loss_chunk_size=7, main_loss_implementation="chunked", main_loss_recompute_logits=recompute_logits
    )
    weights, expected = _step_main_grads(mtp, tied, fusion=False)
    for overlap_grad_reduce in (False, True):
        _, fused = _step_main_grads(mtp, tied, fusion=True, weights=weights, overlap_grad_reduce=overlap_grad_reduce)
        for name, grad in expected.items():
            torch.testing.assert_close(fused[name], grad, atol=1e-5, rtol=0, msg=lambda text: f"{name}: {text}")


MODELS = {  # MTPConfig per model: the fused lookup's users differ (tied: the output layer returns the dummy)
    "no MTP, plain main loss": dict(num_layers=0, main_loss_implementation="plain"),
    "no MTP, chunked main loss": dict(num_layers=0, main_loss_implementation="chunked"),
    "sequential": dict(num_layers=2, mode="sequential"),
    "parallel": dict(num_layers=2, mode="parallel"),
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model", list(MODELS))
def test_fused_embedding_lookup_under_overlapped_reduction_and_the_distributed_optimizer(single_process, model, tied):
    # Overlapped reduction asserts param.grad in DDP's hook: the weight's one user handing back the dummy sets it.
    mtp = MTPConfig(loss_chunk_size=7, **MODELS[model])
    weights, expected = _step_main_grads(mtp, tied, fusion=False)
    _, fused = _step_main_grads(
        mtp, tied, fusion=True, weights=weights, overlap_grad_reduce=True, use_distributed_optimizer=True
    )
    for name, grad in expected.items():
        torch.testing.assert_close(fused[name], grad, atol=1e-5, rtol=0, msg=lambda text: f"{name}: {text}")


class _NewTensorsOfShape(TorchDispatchMode):
    """Counts the new storages of ``shape`` that ops create while active."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(args) + _tensors(kwargs)}
        self.count += sum(
            t.shape == self.shape and t.untyped_storage().data_ptr() not in inputs for t in _tensors(out)
        )
        return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("fusion", [True, False], ids=["fusion", "no-fusion"])
def test_fused_step_makes_no_embedding_sized_gradient(single_process, fusion, model, tied):
    # The lookup's dense weight gradient is what sets the step's peak at large vocabularies (issue 13). With fusion
    # no tensor of the word embedding's shape is made once Megatron's dummy gradient exists (the first step makes
    # it): not by the lookup, nor by autograd summing two users' gradients. Without fusion the lookup makes one.
    mtp = MTPConfig(loss_chunk_size=7, **MODELS[model])
    config = transformer_config(mtp, gradient_accumulation_fusion=fusion)
    model = wrap_ddp(build_model_with_weights(config, mtp, tied)[0], config)
    train_step(model, config, make_batches(1))
    with _NewTensorsOfShape(model.module.embedding.word_embeddings.weight.shape) as new:
        train_step(model, config, make_batches(2))
    assert (new.count == 0) == fusion, new.count


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model", list(MODELS))
def test_without_overlapped_reduction_no_user_returns_a_stand_in_gradient(single_process, monkeypatch, model, tied):
    # MTPConfig.ddp_overlaps_grad_reduce=False (DDP not overlapping): the chunked main loss and the fused lookup
    # hand autograd None; DDP's hook skips it, so the main_grads are fusion off's, and (bar GPTModel's own output
    # layer, which the plain main loss runs) no output-weight-sized tensor is made, not even Megatron's dummy,
    # cached across steps like TE's (emptied here, so that making it counts). Two query groups make the attention's
    # QKV weight [64, 32], not the vocabulary's [96, 32], so that its own dummy is not counted.
    mtp = MTPConfig(loss_chunk_size=7, ddp_overlaps_grad_reduce=False, **MODELS[model])
    weights, expected = _step_main_grads(mtp, tied, fusion=False)
    _, fused = _step_main_grads(mtp, tied, fusion=True, weights=weights)
    for name, grad in expected.items():
        torch.testing.assert_close(fused[name], grad, atol=1e-5, rtol=0, msg=lambda text: f"{name}: {text}")
    config = transformer_config(mtp, gradient_accumulation_fusion=True, num_query_groups=2)
    ddp_model = wrap_ddp(build_model_with_weights(config, mtp, tied)[0], config)
    monkeypatch.setattr(cpu_bridge, "_dummy_wgrads", {})
    with _NewTensorsOfShape(ddp_model.module.embedding.word_embeddings.weight.shape) as new:
        train_step(ddp_model, config, make_batches(1))
    assert (new.count == 0) == (MODELS[model].get("main_loss_implementation") != "plain"), new.count


def test_no_stand_in_under_overlapped_reduction_fails_loudly(single_process):
    # A config claiming no overlap on a DDP that overlaps: Megatron's hook refuses the None gradient.
    mtp = MTPConfig(num_layers=0, loss_chunk_size=7, main_loss_implementation="chunked", ddp_overlaps_grad_reduce=False)
    with pytest.raises(AssertionError, match="param.grad being None is not safe when overlap_grad_reduce is True"):
        _step_main_grads(mtp, tied=False, fusion=True, overlap_grad_reduce=True)


@pytest.mark.parametrize("output_layer_reads_weight", [False, True], ids=["only-user", "tied"])
def test_fused_lookup_adds_bf16_rows_into_fp32_main_grad(single_process, output_layer_reads_weight):
    # Megatron-LM's bf16 default: bf16 weights and output gradient, fp32 main_grad; repeated ids sum in fp32.
    config = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.bfloat16)
    embedding = VocabParallelEmbedding(16, 8, init_method=torch.nn.init.normal_, config=config)
    fuse_embedding_weight_grad(embedding, True, output_layer_reads_weight)
    weight = embedding.weight
    weight.main_grad = torch.ones(16, 8)  # what earlier micro-batches left there
    weight.grad_added_to_main_grad = False
    ids = torch.tensor([[3, 5, 3, 0], [3, 15, 5, 3]])
    grad_output = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    output = embedding(ids)
    torch.testing.assert_close(output, weight.detach()[ids], atol=0, rtol=0)
    output.backward(grad_output)
    expected = torch.ones(16, 8, dtype=torch.float64).index_add_(0, ids.reshape(-1), grad_output.reshape(-1, 8).double())
    torch.testing.assert_close(weight.main_grad.double(), expected, atol=1e-6, rtol=0)
    assert weight.grad_added_to_main_grad
    assert (weight.grad is None) == output_layer_reads_weight  # else Megatron's dummy, for DDP's hook


class _FusedHead(torch.nn.Module):
    """A ColumnParallelLinear's face as the chunked loss sees it, with a Megatron-DDP-style ``main_grad``."""

    def __init__(self, vocab: int, hidden: int, fusion: bool, main_grad: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden) / hidden**0.5)
        self.bias = None
        self.gradient_accumulation_fusion = fusion
        if main_grad:
            self.weight.main_grad = torch.zeros(vocab, hidden)
            self.weight.grad_added_to_main_grad = False


class _LargestNewStorage(TorchDispatchMode):
    """Records the largest storage (bytes) any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(args) + _tensors(kwargs)}
        for tensor in _tensors(out):
            if tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def _tensors(tree):
    return [leaf for leaf in torch.utils._pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _inputs(tokens: int, vocab: int, hidden: int):
    """hidden_states [tokens, 1, hidden], labels and loss mask [1, tokens]."""
    generator = torch.Generator().manual_seed(3)
    hidden_states = torch.randn(tokens, 1, hidden, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    mask = (torch.rand(1, tokens, generator=generator) > 0.2).float()
    return hidden_states, labels, mask


def _probed_gradients(head, tokens: int, grad_in_forward=None, want_stats=True):
    """d(3 * loss)/d(hidden_states, weight) from the chunked loss (2-token chunks) and from torch's cross-entropy
    on full logits, and the largest storage the chunked loss created in forward and in backward. The loss value
    is checked too, or, without stats when the logits are recomputed, that forward left it to backward (NaN)."""
    hidden_states, labels, mask = _inputs(tokens, *head.weight.shape)
    inputs = (hidden_states, head.weight)
    with _LargestNewStorage() as forward:
        result = chunked_depth_loss(
            hidden_states, OutputHead(head, None, None), labels, mask, want_stats, 2, grad_in_forward
        )
    with _LargestNewStorage() as backward:
        grads = torch.autograd.grad(result.loss_sum * 3.0, inputs, allow_unused=True)
    logits = hidden_states[:, 0] @ head.weight.t()
    expected_loss = (F.cross_entropy(logits, labels[0], reduction="none") * mask[0]).sum()
    if want_stats or grad_in_forward:
        torch.testing.assert_close(result.loss_sum, expected_loss)
    else:
        assert result.loss_sum.isnan()
    expected = torch.autograd.grad(expected_loss * 3.0, inputs)
    return grads, expected, forward.largest, backward.largest


@pytest.mark.parametrize("want_stats", [True, False], ids=["metrics", "no-metrics"])
@pytest.mark.parametrize("grad_in_forward", [None, False, True], ids=["automatic", "recompute", "kept"])
def test_chunked_loss_adds_the_weight_gradient_into_main_grad(gloo_world, grad_in_forward, want_stats):
    head = _FusedHead(vocab=64, hidden=8, fusion=True, main_grad=True)
    head.weight.main_grad += 1.0  # what earlier micro-batches left there
    grads, expected, forward_bytes, backward_bytes = _probed_gradients(head, 24, grad_in_forward, want_stats)
    torch.testing.assert_close(grads[0], expected[0])
    torch.testing.assert_close(head.weight.main_grad, expected[1] + 1.0)
    assert head.weight.grad_added_to_main_grad
    assert grads[1] is None  # in main_grad already: a second gradient would cost a weight-sized sum in autograd
    if grad_in_forward is not True:  # the default with main_grad: nothing output-weight-sized, in either pass
        assert max(forward_bytes, backward_bytes) < head.weight.numel() * 4


def test_without_fusion_the_weight_gradient_goes_through_autograd():
    head = _FusedHead(vocab=64, hidden=8, fusion=False, main_grad=True)
    grads, expected, _, _ = _probed_gradients(head, 24)
    torch.testing.assert_close(grads, expected)
    assert not head.weight.main_grad.any() and not head.weight.grad_added_to_main_grad


def test_automatic_choice_keeps_gradients_only_where_they_are_smaller_than_the_logits():
    # README benchmark shape (hidden 256, 1024 tokens, V=32k, fp32): kept gradients 33 MB < logits 131 MB.
    assert gradients_in_forward(tokens=1024, hidden=256, vocab_slice=32000, input_bytes=4, into_main_grad=False)
    # DeepSeek-V3 (hidden 7168, 4096 tokens, V=129280, bf16): 3.7 GB of kept gradients > 2.1 GB of logits.
    assert not gradients_in_forward(tokens=4096, hidden=7168, vocab_slice=129280, input_bytes=2, into_main_grad=False)
    # With main_grad the weight gradient is added in backward, chunk by chunk: recompute.
    assert not gradients_in_forward(tokens=1024, hidden=256, vocab_slice=32000, input_bytes=4, into_main_grad=True)
    with pytest.raises(ValueError, match="loss_recompute_logits must be None, True or False"):
        MTPConfig(loss_recompute_logits=1)  # the override is True / False; None chooses

    # And the loss follows it: an output-weight-sized buffer is made in forward only where gradients are kept.
    for hidden, kept in ((8, True), (48, False)):
        assert gradients_in_forward(32, hidden, 64, 4, False) == kept
        head = _FusedHead(vocab=64, hidden=hidden, fusion=False, main_grad=False)
        grads, expected, forward_bytes, _ = _probed_gradients(head, 32)
        torch.testing.assert_close(grads, expected)
        assert (forward_bytes >= head.weight.numel() * 4) == kept


def test_bf16_weight_gradient_sum_makes_no_fp32_copy_of_the_whole_gradient(gloo_world):
    import fused_weight_gradient_mlp_cuda  # the CPU bridge's stand-in for apex's module

    generator = torch.Generator().manual_seed(0)
    tokens, vocab, hidden = 64, 512, 16
    grad_output = torch.randn(tokens, vocab, generator=generator).bfloat16()
    inputs = torch.randn(tokens, hidden, generator=generator).bfloat16()
    main_grad = torch.ones(vocab, hidden)
    with _LargestNewStorage() as probe:
        fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(inputs, grad_output, main_grad)
    torch.testing.assert_close(main_grad, 1.0 + grad_output.float().t() @ inputs.float())
    assert probe.largest <= tokens * vocab * 4 // 4  # a quarter of the rows in fp32 at a time


def test_bf16_chunked_backward_holds_one_fp32_chunk_of_logits(gloo_world):
    """One 64-token chunk, V=4096: its fp32 logits are 1 MiB. Backward recomputes them (bf16, then fp32), turns them
    into dL/dlogits in place and casts that to bf16, freeing the fp32 buffer before the matmuls: 1.5 MiB at most
    at once, plus inputs. Keeping the fp32 buffer through the matmuls, or an fp32 copy of the whole bf16 gradient
    in the weight-gradient sum, would make it 2.5 MiB."""
    tokens, vocab, hidden = 64, 4096, 8
    head = _FusedHead(vocab=vocab, hidden=hidden, fusion=True, main_grad=True)
    head.weight.data = head.weight.data.bfloat16()
    hidden_states, labels, mask = _inputs(tokens, vocab, hidden)
    hidden_states = hidden_states.detach().bfloat16().requires_grad_()
    result = chunked_depth_loss(hidden_states, OutputHead(head, None, None), labels, mask, False, tokens, False)
    peak = cpu_peak_new_bytes(lambda: result.loss_sum.backward())
    fp32_logits = tokens * vocab * 4
    assert head.weight.grad_added_to_main_grad and head.weight.main_grad.abs().sum() > 0
    assert fp32_logits * 1.5 <= peak < fp32_logits * 2, peak
