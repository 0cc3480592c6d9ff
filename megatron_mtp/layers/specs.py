"""Turn the decoder's TransformerLayer spec into the MTP block spec, so MTP layers are whatever the
decoder uses (dense, MoE, MLA; local or TransformerEngine modules)."""

from typing import Optional, Union

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_mtp.config import MTPConfig
from megatron_mtp.layers.block import MTPBlock, MTPBlockSubmodules
from megatron_mtp.layers.parallel_heads import ParallelMTPHead, ParallelMTPHeadSubmodules
from megatron_mtp.layers.sequential import SequentialMTPLayer, SequentialMTPLayerSubmodules


def get_mtp_block_spec(
    transformer_layer_spec: Union[ModuleSpec, TransformerBlockSubmodules],
    mtp_config: MTPConfig,
    backend: Optional[BackendSpecProvider] = None,
    use_transformer_engine: bool = False,
) -> ModuleSpec:
    """
    Args:
        transformer_layer_spec: the decoder's layer spec, or its block submodules (then the last layer's
            spec is used, as Megatron-Core does, so an MoE decoder gives MoE MTP layers).
        mtp_config: selects sequential depths or parallel heads.
        backend: where norms and the ``eh_proj`` linear come from; default local, or TransformerEngine
            when ``use_transformer_engine``.
    Returns:
        A spec building :class:`MTPBlock`, to pass to ``MTPGPTModel(mtp_block_spec=...)``.
    """
    if isinstance(transformer_layer_spec, TransformerBlockSubmodules):
        transformer_layer_spec = transformer_layer_spec.layer_specs[-1]
    if not isinstance(transformer_layer_spec, ModuleSpec):
        raise TypeError(f"expected a TransformerLayer ModuleSpec, got {type(transformer_layer_spec).__name__}")
    if backend is None:
        if use_transformer_engine:
            from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

            backend = TESpecProvider()
        else:
            backend = LocalSpecProvider()
    norm = backend.layer_norm()
    if mtp_config.mode == "sequential":
        layer = ModuleSpec(
            module=SequentialMTPLayer,
            submodules=SequentialMTPLayerSubmodules(
                enorm=norm,
                hnorm=norm,
                eh_proj=backend.column_parallel_linear(),
                transformer_layer=transformer_layer_spec,
                final_layernorm=norm,
            ),
        )
    else:
        layer = ModuleSpec(
            module=ParallelMTPHead,
            submodules=ParallelMTPHeadSubmodules(transformer_layer=transformer_layer_spec, final_layernorm=norm),
        )
    return ModuleSpec(module=MTPBlock, submodules=MTPBlockSubmodules(layer=layer), params={"mtp_config": mtp_config})
