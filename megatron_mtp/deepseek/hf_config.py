"""Read a Hugging Face DeepSeek-V3 ``config.json`` into Megatron-Core's ``MLATransformerConfig`` and our ``MTPConfig``.

Everything the DeepSeek-V3 architecture has is translated: MLA (with or without the query low-rank
projection), YaRN rope, dense-then-MoE layers, routed + shared experts, the sigmoid router with expert bias
(``noaux_tc``), group-limited top-k, ``routed_scaling_factor``, RMSNorm and the MTP depth count
(``num_nextn_predict_layers``). Settings Megatron-Core would compute differently raise ``ValueError`` naming
the key; other architectures raise ``NotImplementedError`` naming the architecture.
"""

import json
import os
from dataclasses import dataclass
from typing import List, Mapping, Union

import torch.nn.functional as F

from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_mtp.compat import MEGATRON_CORE_VERSION, MLA_WITHOUT_QUERY_LOW_RANK
from megatron_mtp.config import MTPConfig

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("deepseek_v3",)
# Same MTP naming, but GQA attention with partial rotary and qkv bias: a different decoder layer to map.
KNOWN_UNSUPPORTED = {
    "Glm4MoeForCausalLM": "GLM-4.5 MoE (GQA attention with partial rotary and qkv bias, not MLA)",
    "DeepseekV2ForCausalLM": "DeepSeek-V2 (softmax router without expert bias)",
}


@dataclass(frozen=True)
class DeepSeekV3Configs:
    """Everything needed to build the Megatron model of one HF DeepSeek-V3 config."""

    transformer: MLATransformerConfig
    mtp: MTPConfig
    vocab_size: int
    max_sequence_length: int
    share_embeddings_and_output_weights: bool
    mtp_layer_is_moe: bool
    """Whether the MTP layers' decoder layer is MoE (it is for DeepSeek-V3: layer index >= first_k_dense_replace)."""


def load_hf_config(source: Union[str, os.PathLike, Mapping]) -> dict:
    """A config dict from a dict, a ``config.json`` path or a directory holding one."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def moe_layer_pattern(hf_config: Mapping) -> List[int]:
    """1 for each MoE layer index, 0 for dense, over main layers then MTP layers (DeepSeek's rule)."""
    total = hf_config["num_hidden_layers"] + hf_config.get("num_nextn_predict_layers", 0)
    first_dense = hf_config.get("first_k_dense_replace", 0) or 0
    frequency = hf_config.get("moe_layer_freq", 1) or 1
    has_experts = bool(hf_config.get("n_routed_experts"))
    return [int(has_experts and i >= first_dense and i % frequency == 0) for i in range(total)]


def megatron_configs(hf_config: Union[str, os.PathLike, Mapping], **overrides) -> DeepSeekV3Configs:
    """Translate ``hf_config``; ``overrides`` are extra ``MLATransformerConfig`` fields (parallel sizes, dtypes,
    dispatcher...). An override of an architecture field the HF config sets is an error."""
    hf = load_hf_config(hf_config)
    _check_architecture(hf)
    architecture = _architecture_fields(hf)
    clashing = sorted(set(overrides) & set(architecture))
    if clashing:
        raise ValueError(f"these settings come from the HF config and cannot be overridden: {', '.join(clashing)}")
    mtp_layers = _get(hf, "num_nextn_predict_layers", 0)
    mtp = MTPConfig(num_layers=mtp_layers, mode="sequential")
    transformer = MLATransformerConfig(**architecture, mtp_num_layers=mtp.megatron_mtp_num_layers, **overrides)
    pattern = moe_layer_pattern(hf)
    return DeepSeekV3Configs(
        transformer=transformer,
        mtp=mtp,
        vocab_size=_get(hf, "vocab_size"),
        max_sequence_length=_get(hf, "max_position_embeddings"),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        mtp_layer_is_moe=bool(mtp_layers) and all(pattern[hf["num_hidden_layers"] :]),
    )


def _check_architecture(hf: Mapping) -> None:
    architectures = hf.get("architectures") or []
    for name in architectures:
        if name in KNOWN_UNSUPPORTED:
            raise NotImplementedError(f"architecture {name} is not supported: {KNOWN_UNSUPPORTED[name]}")
    if not any(name in SUPPORTED_ARCHITECTURES for name in architectures) and hf.get("model_type") not in (
        SUPPORTED_MODEL_TYPES
    ):
        raise NotImplementedError(
            f"architectures={architectures} model_type={hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _get(hf: Mapping, key: str, default=None):
    value = hf.get(key, default)
    if value is None:
        raise ValueError(f"HF config key {key!r} is missing")
    return value


def _require(hf: Mapping, key: str, expected, default, why: str) -> None:
    value = hf.get(key, default)
    if value != expected:
        raise ValueError(f"HF config {key}={value!r} is not supported ({why}); expected {expected!r}")


def _architecture_fields(hf: Mapping) -> dict:
    _require(hf, "hidden_act", "silu", "silu", "experts and dense MLPs are SwiGLU")
    _require(hf, "attention_bias", False, False, "MLA projections have no bias here")
    _require(hf, "rope_interleave", True, True, "Megatron-Core's MLA rope reads DeepSeek's interleaved layout")
    if hf.get("q_lora_rank") is None and not MLA_WITHOUT_QUERY_LOW_RANK:
        raise NotImplementedError(
            f"HF config q_lora_rank=null (no query low-rank projection, as in DeepSeek-V2-Lite) cannot be built "
            f"faithfully with megatron-core {MEGATRON_CORE_VERSION}: its MLA adds a query norm that the checkpoint "
            "does not have. Use megatron-core 0.16."
        )
    heads = _get(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise ValueError(f"HF config num_key_value_heads={kv_heads} must equal num_attention_heads={heads} for MLA")
    fields = dict(
        num_layers=_get(hf, "num_hidden_layers"),
        hidden_size=_get(hf, "hidden_size"),
        ffn_hidden_size=_get(hf, "intermediate_size"),
        num_attention_heads=heads,
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=_get(hf, "kv_lora_rank"),
        qk_head_dim=_get(hf, "qk_nope_head_dim"),
        qk_pos_emb_head_dim=_get(hf, "qk_rope_head_dim"),
        v_head_dim=_get(hf, "v_head_dim"),
        qk_layernorm=True,  # with MLA: the q_a / kv_a layernorms
        normalization="RMSNorm",
        layernorm_epsilon=_get(hf, "rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
        hidden_dropout=0.0,
        init_method_std=_get(hf, "initializer_range", 0.02),
        **_rope_fields(hf),
    )
    if hf.get("n_routed_experts"):
        fields.update(_moe_fields(hf))
    return fields


def _rope_fields(hf: Mapping) -> dict:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type == "default":
        # Megatron's softmax scale multiplies by yarn mscale(mscale_all_dim) squared; 0 makes it 1.
        return dict(rope_type="rope", rotary_base=theta, rotary_percent=1.0, mscale=1.0, mscale_all_dim=0.0)
    if rope_type != "yarn":
        raise ValueError(f"HF config rope_scaling type {rope_type!r} is not supported (only yarn or none)")
    for key in ("attention_factor", "partial_rotary_factor"):
        if scaling.get(key) is not None:
            raise ValueError(f"HF config rope_scaling.{key} is not supported")
    if scaling.get("truncate", True) is not True:
        raise ValueError("HF config rope_scaling.truncate=False is not supported (Megatron rounds the YaRN range)")
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        raise ValueError("HF config key 'rope_scaling.original_max_position_embeddings' is missing")
    factor = scaling.get("factor")
    if factor is None:
        factor = _get(hf, "max_position_embeddings") / original
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        # HF then uses 0.1*ln(factor)+1 for cos/sin and no softmax correction: Megatron's (1, 0).
        mscale, mscale_all_dim = 1.0, 0.0
    return dict(
        rope_type="yarn",
        rotary_base=theta,
        rotary_scaling_factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(scaling.get("beta_fast") or 32),
        beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(mscale),
        mscale_all_dim=float(mscale_all_dim),
    )


def _moe_fields(hf: Mapping) -> dict:
    _require(hf, "scoring_func", "sigmoid", "sigmoid", "DeepSeek-V3 routes with sigmoid scores")
    _require(hf, "topk_method", "noaux_tc", "noaux_tc", "DeepSeek-V3 routes with the expert-bias (noaux_tc) method")
    topk = _get(hf, "num_experts_per_tok")
    if topk > 1 and not hf.get("norm_topk_prob", True):
        raise ValueError("HF config norm_topk_prob=False is not supported: Megatron normalises sigmoid top-k weights")
    groups = hf.get("n_group") or 1
    group_topk = hf.get("topk_group") or groups
    experts = _get(hf, "n_routed_experts")
    if experts % groups:
        raise ValueError(f"HF config n_routed_experts={experts} is not divisible by n_group={groups}")
    group_limited = groups > 1 and group_topk < groups
    if group_limited and topk != 2 * group_topk:
        # DeepSeek scores a group by its top-2 experts; Megatron by its top-(topk / topk_group).
        raise ValueError(
            f"HF config num_experts_per_tok={topk} must be 2 * topk_group={group_topk} (group score = top-2 sum)"
        )
    intermediate = _get(hf, "moe_intermediate_size")
    shared = hf.get("n_shared_experts") or 0
    return dict(
        moe_layer_freq=moe_layer_pattern(hf)[: hf["num_hidden_layers"]],
        num_moe_experts=experts,
        moe_ffn_hidden_size=intermediate,
        moe_shared_expert_intermediate_size=shared * intermediate or None,
        moe_router_topk=topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=groups if group_limited else None,
        moe_router_group_topk=group_topk if group_limited else None,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        moe_router_dtype="fp32",
        moe_router_pre_softmax=False,
    )
