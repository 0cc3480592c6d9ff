import pytest

from megatron_mtp.config import MTPConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=-1), "must be >= 0"),
        (dict(num_layers=1.5), "must be an int"),
        (dict(mode="medusa"), "unknown MTP mode 'medusa'"),
        (dict(mode="parallel", num_layers=0), "at least 1 head"),
        (dict(loss_scaling_factor=-0.1), "loss_scaling_factor must be a finite number >= 0"),
        (dict(loss_scaling_factor=float("nan")), "loss_scaling_factor must be a finite number >= 0"),
        (dict(depth_weighting="linear"), "unknown MTP depth_weighting 'linear'"),
        (dict(depth_weighting="geometric", geometric_gamma=0.0), "geometric_gamma must be in"),
        (dict(loss_scaling_schedule=((10, 0.1), (5, 0.2))), "increasing"),
        (dict(loss_scaling_schedule=((0, -1.0),)), "schedule value must be"),
        (dict(loss_scaling_schedule=((0,),)), "entries are"),
        (dict(main_loss_recompute_logits=0), "main_loss_recompute_logits must be None, True or False"),
        (dict(main_loss_implementation="plain", main_loss_recompute_logits=True), "applies to the chunked main loss"),
    ],
)
def test_bad_configs_fail_with_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MTPConfig(**kwargs)


def test_sequence_length_and_position_embedding_checks():
    config = MTPConfig(num_layers=4)
    config.check_model(max_sequence_length=5, position_embedding_type="rope")
    with pytest.raises(ValueError, match=r"must be smaller than the sequence length \(4\)"):
        config.check_model(max_sequence_length=4, position_embedding_type="rope")
    with pytest.raises(ValueError, match="cannot roll position ids of position_embedding_type='mrope'"):
        config.check_model(max_sequence_length=64, position_embedding_type="mrope")


def test_depth_weights():
    assert MTPConfig(num_layers=3).depth_weights() == (1.0, 1.0, 1.0)
    assert MTPConfig(num_layers=3, depth_weighting="harmonic").depth_weights() == (1.0, 0.5, 1.0 / 3)
    assert MTPConfig(num_layers=3, depth_weighting="geometric", geometric_gamma=0.5).depth_weights() == (1.0, 0.5, 0.25)


def test_loss_scaling_schedule_is_a_step_function():
    config = MTPConfig(loss_scaling_factor=0.3, loss_scaling_schedule=((100, 0.1), (200, 0.05)))
    assert [config.loss_scale_at(s) for s in (0, 99, 100, 199, 200, 10**9)] == [0.3, 0.3, 0.1, 0.1, 0.05, 0.05]


def test_megatron_mtp_num_layers_only_for_sequential_mode():
    assert MTPConfig(num_layers=2).megatron_mtp_num_layers == 2
    assert MTPConfig(num_layers=0).megatron_mtp_num_layers is None
    assert MTPConfig(num_layers=2, mode="parallel").megatron_mtp_num_layers is None
