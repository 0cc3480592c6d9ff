"""PP=2 (1F1B, 3 micro-batches) and TP=2 with SP under Megatron DDP: with gradient-accumulation fusion every
parameter's ``main_grad`` on every rank equals fusion off's (after the embedding-group all-reduce). At PP=2 tied
output weights put the MTP loss's share into the last stage's embedding copy (which sequential MTP also reads its
embeddings from); untied ones into the last stage's output layer. Chunked loss with its default choices. The
word-embedding lookups (stage 0's, and the last stage's copy under sequential MTP) add into ``main_grad`` too
(``layers/embedding_grad.py``); some cases run the fused step with overlapped reduction and the distributed
optimizer; the others tell the model that DDP does not overlap (``MTPConfig.ddp_overlaps_grad_reduce``), so
no stand-in weight gradient is handed to autograd."""

from megatron.core.utils import unwrap_model

from megatron_mtp.config import MTPConfig
from mp_world import run_world
from tiny import build_model_with_weights, global_names, make_batches, train_step, transformer_config, wrap_ddp

# (mode, tied, overlapped reduction + distributed optimizer in the fused run); mode None: no MTP
PP_CASES = [("sequential", True, True), ("parallel", True, False), ("sequential", False, False), (None, True, True)]
TP_CASES = [("sequential", False, False), ("parallel", True, False), ("sequential", True, True), (None, False, True)]


def _fusion_off_minus_on(cases, tp, pp):
    """Per case, this rank's |main_grad(fusion on) - main_grad(fusion off)| max per parameter."""
    results = []
    for mode, tied, overlap in cases:
        layers = dict(num_layers=2, mode=mode) if mode else dict(num_layers=0)
        mtp = MTPConfig(depth_weighting="harmonic", loss_chunk_size=5, ddp_overlaps_grad_reduce=overlap, **layers)
        weights, main_grads = None, {}
        for fusion in (False, True):
            config = transformer_config(mtp, tp=tp, pp=pp, sp=tp > 1, gradient_accumulation_fusion=fusion)
            model, weights = build_model_with_weights(config, mtp, tied, weights)
            model = wrap_ddp(model, config, use_distributed_optimizer=overlap and fusion,
                             overlap_grad_reduce=overlap and fusion)
            train_step(model, config, make_batches(3))
            embedding = getattr(unwrap_model(model), "embedding", None)
            if embedding is not None:
                assert embedding.word_embeddings.weight.grad_added_to_main_grad == fusion
            main_grads[fusion] = {name: param.main_grad.clone() for name, param in global_names(model).items()}
        results.append(
            {name: (main_grads[True][name] - grad).abs().max().item() for name, grad in main_grads[False].items()}
        )
    return results


def _check(per_rank, cases):
    for rank, results in enumerate(per_rank):
        for case, diffs in zip(cases, results, strict=True):
            too_far = {name: diff for name, diff in diffs.items() if not diff <= 1e-5}
            assert not too_far, f"rank {rank}, (mode, tied, overlap) = {case}: {too_far}"


def test_fusion_on_gives_the_main_grads_of_fusion_off_at_pp2():
    per_rank = run_world(_fusion_off_minus_on, 2, PP_CASES, 1, 2, pp=2)
    _check(per_rank, PP_CASES)
    for (mode, tied, _), first, last in zip(PP_CASES, *per_rank):
        assert "embedding.word_embeddings.weight" in first
        # The weight the last stage's output layer reads was compared.
        tied_copy = tied and mode == "sequential"  # else GPTModel's own output weight (tied: its embedding copy)
        assert ("embedding.word_embeddings.weight" if tied_copy else "output_layer.weight") in last
        assert ("embedding.word_embeddings.weight" in last) == (mode == "sequential")


def test_fusion_on_gives_the_main_grads_of_fusion_off_at_tp2_with_sequence_parallelism():
    _check(run_world(_fusion_off_minus_on, 2, TP_CASES, 2, 1, tp=2), TP_CASES)
