"""Models built from Megatron-Core's TransformerEngine specs on a host without TransformerEngine.

Without TransformerEngine, Megatron-Core's TE module classes are MagicMock placeholders, but its TE spec
functions still lay out which module goes where: which norms are fused into which linear layer, which stay
separate. :func:`te_stand_ins` makes ``TESpecProvider`` (which every TE spec function, this project's MTP spec and
Megatron-Core 0.19's MLA norm resolver ask) hand out CPU modules with the TE modules' parameter names and
computation:

- ``TELayerNormColumnParallelLinear``: TE's ``LayerNormLinear`` holds ``layer_norm_weight`` (and
  ``layer_norm_bias`` for LayerNorm) beside ``weight``; normalises its input, then the column-parallel linear;
- ``TELinear`` / ``TEColumnParallelLinear`` / ``TERowParallelLinear``: ``weight`` (and ``bias``);
- ``TENorm``: the norm's ``weight`` (and ``bias``);
- ``TEDotProductAttention``: no parameters, but an ``_extra_state`` (TE's FP8 metadata) in the state dict, which
  checkpoints written without TE lack.

The rest of the model (TransformerLayer, MLA, MoE, the MTP block) is Megatron-Core's and this project's own code
built from the TE specs, so its ``sharded_state_dict`` keys are those a TE host writes and reads.
"""

from unittest import mock

import torch
import torch.nn.functional as F

from megatron.core.extensions import transformer_engine_spec_provider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_mtp.deepseek.cpu_attention import SDPACoreAttention


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """``TELayerNormColumnParallelLinear`` on CPU: y = norm(x) W^T, the norm's weight named ``layer_norm_weight``.

    x: [s, b, input_size] -> ([s, b, output_size / tp], bias or None)
    """

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        if config.normalization == "LayerNorm":
            self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))

    def forward(self, input_):
        shape = (input_.shape[-1],)
        if self.normalization == "RMSNorm":
            normed = F.rms_norm(input_, shape, self.layer_norm_weight, self.eps)
        else:
            normed = F.layer_norm(input_, shape, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return super().forward(normed)


class CoreAttentionWithExtraState(SDPACoreAttention):
    """``TEDotProductAttention`` on CPU: SDPA, plus the ``_extra_state`` entry TE's module has."""

    def get_extra_state(self):
        return None

    def set_extra_state(self, state) -> None:
        pass


def te_stand_ins(monkeypatch) -> None:
    """Make Megatron-Core's TE specs (as with TE >= 1.9) build the CPU stand-ins; ``build_model(...,
    use_transformer_engine=True)`` then builds a model with the TE spec's module tree."""
    stand_ins = {
        "TELayerNormColumnParallelLinear": LayerNormColumnParallelLinear,
        "TELinear": ColumnParallelLinear,  # TE's is 'duplicated' in MLA: the same at TP=1
        "TEColumnParallelLinear": ColumnParallelLinear,
        "TERowParallelLinear": RowParallelLinear,
        "TEDotProductAttention": CoreAttentionWithExtraState,
        "TENorm": WrappedTorchNorm,
        "_TENormWithResidual": WrappedTorchNorm,  # Megatron-Core 0.19
    }
    for name, stand_in in stand_ins.items():
        monkeypatch.setattr(transformer_engine_spec_provider, name, stand_in, raising=False)
    monkeypatch.setattr(transformer_engine_spec_provider, "is_te_min_version", lambda *args, **kwargs: True)
    # gpt_layer_specs imports these only when TE is importable.
    provider = transformer_engine_spec_provider.TESpecProvider
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider, raising=False)
    monkeypatch.setattr(gpt_layer_specs, "TENorm", WrappedTorchNorm, raising=False)


def te_placeholders(model: torch.nn.Module) -> list:
    """Names of TE placeholders (MagicMocks) a model built with :func:`te_stand_ins` still holds: none, unless a
    TE module went without a stand-in."""
    return [
        f"{name}.{attribute}"
        for name, module in model.named_modules()
        for attribute, value in vars(module).items()
        if isinstance(value, mock.Mock)
    ]
