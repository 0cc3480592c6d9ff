"""Name and tensor mapping between Hugging Face DeepSeek-V3 checkpoints and our Megatron state dict.

HF names are the checkpoint's (safetensors) names, one tensor per expert projection
(``model.layers.3.mlp.experts.7.gate_proj.weight``), not transformers' fused in-memory layout. Megatron names
are full, unsharded ``model.state_dict()`` names of :func:`megatron_mtp.deepseek.model.build_model` at
TP=PP=EP=1 built with TransformerEngine's spec, whose norms before ``linear_q_up_proj``, ``linear_kv_up_proj`` and
a dense layer's ``linear_fc1`` are fused into them (``linear_q_up_proj.layer_norm_weight`` for ``q_a_layernorm``):
the names every checkpoint carries, whichever spec built the model. A local-spec model's own names translate to
them with :func:`megatron_mtp.checkpoint_names.te_state_dict_names`. Only the SwiGLU input projections change
shape: ``linear_fc1 = cat([gate_proj, up_proj], dim=0)``; every other tensor is copied as is.

The MTP module ``model.layers.{N}`` (N = num_hidden_layers + i) maps to ``mtp.layers.{i}``: its decoder layer
to ``transformer_layer`` (``mtp_model_layer`` in state dicts of Megatron-Core 0.17+, see ``compat``), ``shared_head.norm`` to ``final_layernorm``, ``enorm``/``hnorm``/``eh_proj`` by
name (``eh_proj`` input columns: embedding first, then hidden state, in both). Its ``embed_tokens`` and
``shared_head.head`` are copies of the main embedding and output layer, which the Megatron MTP layer reuses:
they map to nothing here and are listed by :func:`mtp_shared_copies`.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from megatron_mtp.compat import MTP_INNER_LAYER
from megatron_mtp.deepseek.hf_config import load_hf_config, moe_layer_pattern

COPY = "copy"
CONCAT = "concat"  # concatenated along dim 0, in hf_keys order


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron tensor and the HF tensors it is made from."""

    megatron_key: str
    """e.g. ``decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight``."""
    hf_keys: Tuple[str, ...]
    """The HF tensors, in order (``gate_proj`` then ``up_proj`` for ``linear_fc1``)."""
    kind: str = COPY
    """``copy`` (one HF tensor, same shape) or ``concat`` (HF tensors of equal shape stacked along dim 0)."""

    def __post_init__(self):
        if self.kind == COPY and len(self.hf_keys) != 1:
            raise ValueError(f"{self.megatron_key}: a copy mapping takes one HF tensor, got {self.hf_keys}")
        if self.kind == CONCAT and len(self.hf_keys) < 2:
            raise ValueError(f"{self.megatron_key}: a concat mapping takes several HF tensors, got {self.hf_keys}")
        if self.kind not in (COPY, CONCAT):
            raise ValueError(f"{self.megatron_key}: unknown mapping kind {self.kind!r}")

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The Megatron tensor from the HF tensors (given in ``hf_keys`` order); dtype unchanged."""
        if len(hf_tensors) != len(self.hf_keys):
            raise ValueError(f"{self.megatron_key}: expected {len(self.hf_keys)} HF tensors, got {len(hf_tensors)}")
        if self.kind == COPY:
            return hf_tensors[0]
        shapes = {tuple(t.shape) for t in hf_tensors}
        if len(shapes) != 1:
            raise ValueError(f"{self.megatron_key}: {self.hf_keys} must have one shape, got {sorted(shapes)}")
        return torch.cat(list(hf_tensors), dim=0)

    def to_hf(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """The HF tensors (``hf_keys`` order) from the Megatron tensor; exact inverse of :meth:`to_megatron`."""
        if self.kind == COPY:
            return [tensor]
        parts = len(self.hf_keys)
        if tensor.shape[0] % parts:
            raise ValueError(f"{self.megatron_key}: dim 0 of {tuple(tensor.shape)} does not split into {parts}")
        return list(torch.chunk(tensor, parts, dim=0))


def tensor_mappings(hf_config) -> List[TensorMapping]:
    """Every Megatron parameter (and the router's ``expert_bias`` buffer): embedding, main layers, final norm,
    output layer (unless tied), then the MTP layers."""
    hf = load_hf_config(hf_config)
    layers = hf["num_hidden_layers"]
    moe = moe_layer_pattern(hf)
    mappings = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for layer in range(layers):
        mappings += _decoder_layer(hf, f"model.layers.{layer}.", f"decoder.layers.{layer}.", moe[layer])
    mappings.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not hf.get("tie_word_embeddings", False):
        mappings.append(TensorMapping("output_layer.weight", ("lm_head.weight",)))
    for depth in range(hf.get("num_nextn_predict_layers", 0)):
        hf_prefix, mg_prefix = f"model.layers.{layers + depth}.", f"mtp.layers.{depth}."
        mappings += [
            TensorMapping(mg_prefix + name, (hf_prefix + name,))
            for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight")
        ]
        mappings += _decoder_layer(hf, hf_prefix, f"{mg_prefix}{MTP_INNER_LAYER}.", moe[layers + depth])
        mappings.append(TensorMapping(mg_prefix + "final_layernorm.weight", (hf_prefix + "shared_head.norm.weight",)))
    return mappings


def mtp_shared_copies(hf_config) -> Dict[str, str]:
    """HF tensors of the MTP layers that duplicate a main tensor: MTP key -> the main HF key it copies."""
    hf = load_hf_config(hf_config)
    head = "model.embed_tokens.weight" if hf.get("tie_word_embeddings", False) else "lm_head.weight"
    copies = {}
    for depth in range(hf.get("num_nextn_predict_layers", 0)):
        prefix = f"model.layers.{hf['num_hidden_layers'] + depth}."
        copies[prefix + "embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[prefix + "shared_head.head.weight"] = head
    return copies


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], hf_config) -> dict:
    """Full Megatron state dict from a full HF one (dequantized). MTP shared copies are not read;
    a missing or unused HF tensor is an error."""
    mappings = tensor_mappings(hf_config)
    needed = {key for m in mappings for key in m.hf_keys}
    missing = sorted(needed - set(hf_state))
    if missing:
        raise KeyError(f"{len(missing)} HF tensors missing, e.g. {missing[:5]}")
    unused = sorted(set(hf_state) - needed - set(mtp_shared_copies(hf_config)))
    if unused:
        raise KeyError(f"{len(unused)} HF tensors have no Megatron counterpart, e.g. {unused[:5]}")
    return {m.megatron_key: m.to_megatron([hf_state[k] for k in m.hf_keys]) for m in mappings}


def megatron_to_hf(megatron_state: Mapping[str, torch.Tensor], hf_config, mtp_copies: bool = True) -> dict:
    """Full HF state dict from a full Megatron one; with ``mtp_copies`` the MTP layers' copies of the
    embedding and output layer are written too (vLLM and SGLang read them)."""
    hf_state = {}
    for mapping in tensor_mappings(hf_config):
        if mapping.megatron_key not in megatron_state:
            raise KeyError(f"Megatron tensor {mapping.megatron_key} is missing")
        hf_state.update(zip(mapping.hf_keys, mapping.to_hf(megatron_state[mapping.megatron_key])))
    if mtp_copies:
        for copy_key, main_key in mtp_shared_copies(hf_config).items():
            hf_state[copy_key] = hf_state[main_key]
    return hf_state


def _decoder_layer(hf: Mapping, hf_prefix: str, mg_prefix: str, is_moe: bool) -> List[TensorMapping]:
    def copy(megatron_name: str, hf_name: str) -> TensorMapping:
        return TensorMapping(mg_prefix + megatron_name, (hf_prefix + hf_name,))

    def swiglu(megatron_prefix: str, hf_module: str) -> List[TensorMapping]:
        fc1 = TensorMapping(
            mg_prefix + megatron_prefix + "linear_fc1.weight",
            (hf_prefix + hf_module + "gate_proj.weight", hf_prefix + hf_module + "up_proj.weight"),
            CONCAT,
        )
        return [fc1, copy(megatron_prefix + "linear_fc2.weight", hf_module + "down_proj.weight")]

    attention = "self_attention."
    out = [copy("input_layernorm.weight", "input_layernorm.weight")]
    if hf.get("q_lora_rank") is None:
        out.append(copy(attention + "linear_q_proj.weight", "self_attn.q_proj.weight"))
    else:
        out += [
            copy(attention + "linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
            copy(attention + "linear_q_up_proj.layer_norm_weight", "self_attn.q_a_layernorm.weight"),
            copy(attention + "linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
        ]
    out += [
        copy(attention + "linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
        copy(attention + "linear_kv_up_proj.layer_norm_weight", "self_attn.kv_a_layernorm.weight"),
        copy(attention + "linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
        copy(attention + "linear_proj.weight", "self_attn.o_proj.weight"),
    ]
    if not is_moe:  # TE fuses a dense layer's pre-MLP norm into linear_fc1 and keeps an MoE layer's separate
        norm = copy("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight")
        return out + [norm] + swiglu("mlp.", "mlp.")
    out += [
        copy("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        copy("mlp.router.weight", "mlp.gate.weight"),
        copy("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"),
    ]
    for expert in range(hf["n_routed_experts"]):
        out += swiglu(f"mlp.experts.local_experts.{expert}.", f"mlp.experts.{expert}.")
    if hf.get("n_shared_experts"):
        out += swiglu("mlp.shared_experts.", "mlp.shared_experts.")
    return out
