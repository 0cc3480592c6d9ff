import argparse
import subprocess
import sys

import pytest

from megatron_mtp.arguments import add_mtp_args, mtp_config_from_args
from megatron_mtp.training.arguments import parse_args
from megatron_mtp.training.setup import padded_vocab_size

REQUIRED = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--tokenizer-type", "ByteLevel"]


def _parse(argv, parser=None):
    parser = add_mtp_args(parser or argparse.ArgumentParser(prog="train"))
    return mtp_config_from_args(parser.parse_args(argv), parser)


def test_flags_build_the_mtp_config():
    config = _parse(
        ["--mtp-num-layers", "3", "--mtp-mode", "parallel", "--mtp-loss-scaling-factor", "0.3",
         "--mtp-depth-weighting", "geometric", "--mtp-geometric-gamma", "0.8", "--mtp-loss-scaling-schedule", "100:0.1,200:0.05"]
    )
    assert (config.num_layers, config.mode, config.loss_scaling_factor) == (3, "parallel", 0.3)
    assert (config.depth_weighting, config.geometric_gamma) == ("geometric", 0.8)
    assert config.loss_scaling_schedule == ((100, 0.1), (200, 0.05))


def test_loss_flags_build_the_mtp_config():
    default = _parse(["--mtp-num-layers", "1"])
    assert (default.loss_implementation, default.loss_chunk_size, default.loss_recompute_logits) == ("chunked", 512, None)
    assert not default.latent_losses
    config = _parse(
        ["--mtp-num-layers", "2", "--mtp-loss-chunk-size", "64", "--mtp-loss-recompute-logits",
         "--mtp-latent-consistency-weight", "0.1", "--mtp-semantic-anchoring-weight", "0.2"]
    )
    assert (config.loss_chunk_size, config.loss_recompute_logits) == (64, True)
    assert (config.latent_consistency_weight, config.semantic_anchoring_weight, config.latent_losses) == (0.1, 0.2, True)
    assert _parse(["--mtp-num-layers", "1", "--no-mtp-loss-recompute-logits"]).loss_recompute_logits is False
    assert _parse(["--mtp-num-layers", "1", "--mtp-loss-implementation", "plain"]).loss_implementation == "plain"
    assert default.main_loss_implementation is None  # chosen per micro-batch
    no_mtp = _parse(["--main-loss-implementation", "plain", "--mtp-loss-implementation", "plain"])
    assert (no_mtp.enabled, no_mtp.main_loss_implementation) == (False, "plain")
    chunked_main = _parse(["--mtp-loss-implementation", "plain", "--mtp-loss-chunk-size", "8"])
    assert (chunked_main.main_loss_implementation, chunked_main.loss_chunk_size) == (None, 8)
    assert default.main_loss_recompute_logits is None  # kept in 16 bits, recomputed in fp32
    assert _parse(["--main-loss-recompute-logits"]).main_loss_recompute_logits is True
    assert _parse(["--no-main-loss-recompute-logits"]).main_loss_recompute_logits is False


def test_megatron_lm_defaults_and_no_mtp_by_default():
    config = _parse([])
    assert (config.num_layers, config.loss_scaling_factor, config.enabled) == (0, 0.1, False)


def test_works_as_extra_args_provider_on_a_parser_that_has_megatrons_flags():
    parser = argparse.ArgumentParser(prog="megatron")
    parser.add_argument("--mtp-num-layers", type=int, default=None)
    parser.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1)
    config = _parse(["--mtp-num-layers", "1", "--mtp-mode", "sequential"], parser)
    assert config.num_layers == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mtp-mode", "parallel"], "--mtp-mode parallel needs --mtp-num-layers >= 1"),
        (["--mtp-num-layers", "1", "--mtp-geometric-gamma", "0.5"], "--mtp-geometric-gamma only applies with --mtp-depth-weighting geometric"),
        (["--mtp-loss-scaling-schedule", "10:0.1"], "--mtp-loss-scaling-schedule needs --mtp-num-layers >= 1"),
        (["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "-1"], "--mtp-loss-scaling-factor must be a finite number >= 0"),
        (["--mtp-num-layers", "1", "--mtp-loss-scaling-schedule", "10=0.1"], "expected STEP:LAMBDA"),
        (["--mtp-num-layers", "-2"], "--mtp-num-layers must be >= 0"),
        (["--mtp-num-layers", "1", "--mtp-loss-chunk-size", "0"], "--mtp-loss-chunk-size must be an int >= 1"),
        (["--mtp-loss-implementation", "plain", "--main-loss-implementation", "plain", "--mtp-loss-chunk-size", "8"],
         "--mtp-loss-chunk-size applies to --mtp-loss-implementation chunked or --main-loss-implementation chunked"),
        (["--mtp-loss-implementation", "plain", "--mtp-loss-recompute-logits"],
         "applies to --mtp-loss-implementation chunked"),
        (["--mtp-num-layers", "1", "--mtp-semantic-anchoring-weight", "-1"], "--mtp-semantic-anchoring-weight must be"),
        (["--main-loss-implementation", "plain", "--no-main-loss-recompute-logits"],
         "--[no-]main-loss-recompute-logits applies to the chunked main loss, not --main-loss-implementation plain"),
    ],
)
def test_contradictory_flags_fail_at_parse_time_naming_the_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (["--mtp-num-layers", "8", "--seq-length", "8"], "--mtp-num-layers 8 must be smaller than --seq-length 8"),
        (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model"),
        (["--tokenizer-type", "HuggingFace"], "invalid choice: 'HuggingFace' (choose from 'ByteLevel', 'HuggingFaceTokenizer')"),
        (["--data-cache-dir", "x"], "--data-cache-dir is now --data-cache-path, Megatron-LM's name for it"),
        (["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss"], "give one --moe-aux-loss-coeff per"),
        (["--save-interval", "5"], "--save-interval needs --save DIR"),
        (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], "must be divisible by --pipeline-model-parallel-size"),
        (["--data-path", "0.5", "a", "b"], "WEIGHT PREFIX pairs"),
        (["--num-experts", "4", "--moe-per-layer-logging"], "--moe-per-layer-logging writes to TensorBoard"),
        (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"],
         "--num-layers 2 must be divisible by --pipeline-model-parallel-size 2 x 2 virtual stages per rank"),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "0"],
         "--num-layers-per-virtual-pipeline-stage must be >= 1, got 0"),
        (["--num-virtual-stages-per-pipeline-rank", "2"],
         "--num-virtual-stages-per-pipeline-rank: virtual pipeline stages need --pipeline-model-parallel-size > 1"),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"],
         "--num-layers 2 / --pipeline-model-parallel-size 2 must be a multiple of --num-layers-per-virtual-pipeline-stage 2"),
        (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
          "--pipeline-model-parallel-layout", "Et|tL"],
         "give at most one of --num-virtual-stages-per-pipeline-rank, --pipeline-model-parallel-layout"),
        (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|t|tL"],
         "--pipeline-model-parallel-layout has 3 stages, not a multiple of --pipeline-model-parallel-size 2"),
        (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Ex|tL"],
         "Invalid layer character: x"),
        (["--pipeline-model-parallel-size", "2", "--mtp-num-layers", "2", "--pipeline-model-parallel-layout", "Et|t|mm|L"],
         "(--pipeline-model-parallel-layout): the MTP layers ('m') are on pipeline rank 0, virtual stage 1, without the "
         "loss ('L')"),
        (["--fp16"], "--fp16 is not supported"),
        (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs bf16 parameters: give --bf16"),
        (["--bf16", "--fp16"], "not allowed with argument"),
        (["--accumulate-allreduce-grads-in-fp32", "--grad-reduce-in-bf16"], "not allowed with argument"),
        (["--mtp-num-layers", "1", "--reset-attention-mask"], "--reset-attention-mask with MTP needs --eod-mask-loss"),
        (["--reset-attention-mask", "--context-parallel-size", "2"],
         "--reset-attention-mask (packed documents) with --context-parallel-size > 1 is not supported"),
    ],
)
def test_pretrain_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(REQUIRED + argv)
    assert message in capsys.readouterr().err


def test_flags_megatron_lm_requires_are_required(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "2"])
    assert (
        "the following arguments are required: --hidden-size, --num-attention-heads, --seq-length, "
        "--micro-batch-size, --train-iters, --lr, --tokenizer-type"
    ) in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, size",
    [
        ([], None),
        (["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2"], 2),
        (["--num-virtual-stages-per-pipeline-rank", "2", "--num-layers", "4"], 2),
        (["--num-virtual-stages-per-pipeline-rank", "1"], None),
        (["--pipeline-model-parallel-layout", "Et|(t|)*4,mL", "--mtp-num-layers", "1", "--num-layers", "5"], 3),
        (["--pipeline-model-parallel-layout", "Et|tmL"], None),
    ],
)
def test_virtual_pipeline_size_is_derived_as_megatron_lm_derives_it(argv, size):
    args = parse_args(REQUIRED + ["--pipeline-model-parallel-size", "2", *argv])
    assert args.virtual_pipeline_model_parallel_size == size


def test_derived_defaults_follow_megatron_lm():
    args = parse_args(REQUIRED)
    assert (args.ffn_hidden_size, args.num_query_groups, args.max_position_embeddings) == (256, None, 16)
    assert (args.split, args.mtp_config.num_layers, args.bf16, args.gradient_accumulation_fusion) == ("969,30,1", 0, False, True)
    swiglu_gqa = parse_args(REQUIRED + ["--swiglu", "--group-query-attention", "--num-query-groups", "2"])
    assert (swiglu_gqa.ffn_hidden_size, swiglu_gqa.num_query_groups) == (128, 2)  # int(8/3 * 64 / 64) * 64
    assert parse_args(REQUIRED + ["--moe-aux-loss-coeff", "1e-2"]).moe_aux_loss_coeff == 1e-2
    two = parse_args(REQUIRED + ["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff", "1", "2"])
    assert (two.moe_router_load_balancing_type, two.moe_aux_loss_coeff) == (["aux_loss", "seq_aux_loss"], [1.0, 2.0])


@pytest.mark.parametrize("tp, padded", [(1, 384), (2, 512), (4, 512)])
def test_vocabulary_pads_to_a_multiple_of_divisible_by_times_tp_as_megatron_lm(tp, padded):
    args = parse_args(REQUIRED + ["--tensor-model-parallel-size", str(tp)])
    assert padded_vocab_size(257, args) == padded


def test_pretrain_help_explains_the_mtp_flags():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_mtp.pretrain", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--mtp-num-layers", "--mtp-loss-scaling-factor", "--mtp-mode", "--mtp-depth-weighting",
                 "--mtp-loss-scaling-schedule", "--tensor-model-parallel-size", "--data-path", "--save"):
        assert flag in out
    assert "Depth k predicts token t+k+1" in " ".join(out.split())


def test_moe_with_bias_linears_is_refused_without_transformer_engine(single_process):
    from megatron_mtp.training.setup import Runtime, build_model, precision, transformer_config

    args = parse_args(REQUIRED + ["--num-experts", "2"])
    runtime = Runtime("cpu", *precision(args), 1, 1, 2)
    with pytest.raises(ValueError, match=r"--num-experts with bias linears \(the default; --disable-bias-linear removes"):
        build_model(args, runtime, transformer_config(args, runtime), 384)


def test_pretrain_models_know_that_their_ddp_does_not_overlap_gradient_reduction(single_process):
    # So that, under gradient-accumulation fusion, they hand DDP no stand-in weight gradient (MTPConfig).
    from megatron_mtp.training.setup import Runtime, build_model, precision, transformer_config

    args = parse_args(REQUIRED + ["--mtp-num-layers", "1"])
    runtime = Runtime("cpu", *precision(args), 1, 1, 2)
    (chunk,) = build_model(args, runtime, transformer_config(args, runtime), 384)
    assert chunk.ddp_config.overlap_grad_reduce is False
    assert chunk.module.mtp_config.ddp_overlaps_grad_reduce is False
