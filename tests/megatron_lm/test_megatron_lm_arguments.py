"""Our flags inside Megatron-LM's own parser: what Megatron-LM derives from ``--mtp-num-layers`` for each MTP mode
(FLOPs, embedding ranks, the model's config) and the combinations refused, naming the flags."""

import sys
import typing

import pytest
from megatron_lm_files import CPU_FLAGS, TINY_GPT, megatron_lm_dir


@pytest.fixture
def megatron_lm(monkeypatch):
    """Megatron-LM's ``megatron.training`` importable (from the release matching megatron-core)."""
    if not hasattr(typing, "override"):  # core_r0.19.0 imports it (Python >= 3.12)
        import typing_extensions

        monkeypatch.setattr(typing, "override", typing_extensions.override, raising=False)
    monkeypatch.syspath_prepend(megatron_lm_dir())
    from megatron.training import arguments, global_vars

    yield arguments
    global_vars.set_args(None)


def _parse(megatron_lm, monkeypatch, *flags, world_size=1, validate=True):
    from megatron.training.global_vars import set_args

    from megatron_mtp.megatron_lm import mtp_extra_args_provider

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *CPU_FLAGS, *TINY_GPT, "--train-iters", "3", *flags])
    args = megatron_lm.parse_args(mtp_extra_args_provider())
    if validate:
        megatron_lm.validate_args(args, {})
    set_args(args)
    return args


def _flops(args) -> float:
    from megatron.training.training import num_floating_point_operations

    args.padded_vocab_size = 128  # set by Megatron-LM's tokenizer setup, not by argument validation
    return num_floating_point_operations(args, args.global_batch_size)


def test_flops_count_parallel_heads_like_mtp_modules(megatron_lm, monkeypatch):
    """Megatron-LM's FLOPs count reads ``--mtp-num-layers`` as MTP modules (transformer layer + logits): parallel
    heads are counted as such, not dropped."""
    without = _flops(_parse(megatron_lm, monkeypatch))
    sequential = _flops(_parse(megatron_lm, monkeypatch, "--mtp-num-layers", "2"))
    parallel = _flops(_parse(megatron_lm, monkeypatch, "--mtp-num-layers", "2", "--mtp-mode", "parallel"))
    assert parallel == sequential > without


@pytest.mark.parametrize(
    "mode, untie, expected",
    [("sequential", True, [0, 1]), ("parallel", True, [0]), ("parallel", False, [0, 1]), (None, True, [0])],
)
def test_embedding_ranks(megatron_lm, monkeypatch, mode, untie, expected):
    from megatron_mtp.megatron_lm import mtp_get_embedding_ranks

    flags = ["--pipeline-model-parallel-size", "2"] + (["--untie-embeddings-and-output-weights"] if untie else [])
    if mode:
        flags += ["--mtp-num-layers", "2", "--mtp-mode", mode]
    _parse(megatron_lm, monkeypatch, *flags, world_size=2)
    assert mtp_get_embedding_ranks([0, 1]) == expected


@pytest.mark.parametrize("mode, expected", [("sequential", 2), ("parallel", None)])
def test_model_config_mtp_num_layers(megatron_lm, monkeypatch, mode, expected):
    """``args.mtp_num_layers`` stays 2 for Megatron-LM; the model's config carries what MTPGPTModel needs."""
    from megatron_mtp.megatron_lm import mtp_model_config

    args = _parse(megatron_lm, monkeypatch, "--mtp-num-layers", "2", "--mtp-mode", mode)
    assert args.mtp_num_layers == 2
    assert mtp_model_config(args).mtp_num_layers == expected


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_layout_with_mtp_on_the_last_stage_is_accepted(megatron_lm, monkeypatch, mode):
    from megatron_mtp.megatron_lm import mtp_config_from_megatron_args, mtp_model_config

    args = _parse(
        megatron_lm, monkeypatch, "--mtp-num-layers", "1", "--mtp-mode", mode, "--pipeline-model-parallel-size", "2",
        "--pipeline-model-parallel-layout", "Et|tmL", world_size=2,
    )
    assert mtp_config_from_megatron_args(args).num_layers == 1
    assert mtp_model_config(args).pipeline_model_parallel_layout is not None


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_layout_with_mtp_off_the_last_stage_is_refused(megatron_lm, monkeypatch, mode):
    from megatron_mtp.megatron_lm import mtp_config_from_megatron_args

    args = _parse(
        megatron_lm, monkeypatch, "--mtp-num-layers", "1", "--mtp-mode", mode, "--pipeline-model-parallel-size", "3",
        "--pipeline-model-parallel-layout", "Et|tm|L", world_size=3, validate=False,
    )
    with pytest.raises(ValueError, match=r"--pipeline-model-parallel-layout 'Et\|tm\|L' places 1 of the MTP"):
        mtp_config_from_megatron_args(args)


@pytest.mark.parametrize("dest, flag", [("mtp_use_repeated_layer", "--mtp-use-repeated-layer"),
                                        ("mtp_detach_heads", "--mtp-detach-heads")])
def test_megatron_core_mtp_options_are_refused(megatron_lm, monkeypatch, dest, flag):
    """Megatron-LM core_r0.19.0 has these flags (core_v0.16.1 does not: there argparse refuses them)."""
    from megatron_mtp.megatron_lm import mtp_config_from_megatron_args

    args = _parse(megatron_lm, monkeypatch, "--mtp-num-layers", "2", "--mtp-mode", "parallel", validate=False)
    if hasattr(args, dest):
        args = _parse(megatron_lm, monkeypatch, "--mtp-num-layers", "2", "--mtp-mode", "parallel", flag, validate=False)
    else:
        setattr(args, dest, True)
    with pytest.raises(ValueError, match=f"{flag} is an option of Megatron-Core's own MTP"):
        mtp_config_from_megatron_args(args)


def test_our_flag_errors_name_the_flag(megatron_lm, monkeypatch):
    from megatron_mtp.megatron_lm import mtp_config_from_megatron_args

    args = _parse(megatron_lm, monkeypatch, "--mtp-num-layers", "2", "--mtp-geometric-gamma", "0.5", validate=False)
    with pytest.raises(ValueError, match="--mtp-geometric-gamma only applies with --mtp-depth-weighting geometric"):
        mtp_config_from_megatron_args(args)


@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap-grad-reduce"])
def test_the_mtp_config_knows_whether_ddp_overlaps_its_gradient_reduction(megatron_lm, monkeypatch, overlap):
    # Without overlap (Megatron-LM's default) the model may hand DDP no stand-in weight gradient.
    from megatron_mtp.megatron_lm import mtp_config_from_megatron_args

    flags = ["--overlap-grad-reduce"] if overlap else []
    args = _parse(megatron_lm, monkeypatch, "--mtp-num-layers", "1", *flags)
    assert args.overlap_grad_reduce == overlap
    assert mtp_config_from_megatron_args(args).ddp_overlaps_grad_reduce == overlap
