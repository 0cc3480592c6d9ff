"""Write a random DeepSeek-V3-shaped Hugging Face checkpoint in the real on-disk layout.

Per-expert tensors, fp8 e4m3 weights with float32 ``weight_scale_inv`` (128x128 blocks) for the same tensors as the
released checkpoint, bf16 norms/embeddings/router/eh_proj, a float32 router bias, and the MTP layers
``model.layers.{num_hidden_layers + i}`` with their copies of ``embed_tokens`` and ``shared_head.head``. Tensors are
spread over several shards listed in ``model.safetensors.index.json``. Nothing is downloaded.
"""

import json
import math
import os
import zlib
from typing import Dict, List, Tuple

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128

# (name, shape, stored as): "fp8" means an fp8 weight plus its <name>_scale_inv.
TensorSpec = Tuple[str, Tuple[int, ...], str]


def hf_tensor_specs(config: dict) -> List[TensorSpec]:
    """Every tensor of a DeepSeek-V3 checkpoint for ``config`` (a config.json dict), in the released order."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    specs: List[TensorSpec] = [("model.embed_tokens.weight", (vocab, hidden), "bf16")]
    num_layers = config["num_hidden_layers"]
    for layer in range(num_layers + config.get("num_nextn_predict_layers", 0)):
        prefix = f"model.layers.{layer}."
        if layer >= num_layers:
            specs += [
                (prefix + "embed_tokens.weight", (vocab, hidden), "bf16"),
                (prefix + "enorm.weight", (hidden,), "bf16"),
                (prefix + "hnorm.weight", (hidden,), "bf16"),
                (prefix + "eh_proj.weight", (hidden, 2 * hidden), "bf16"),
                (prefix + "shared_head.norm.weight", (hidden,), "bf16"),
                (prefix + "shared_head.head.weight", (vocab, hidden), "bf16"),
            ]
        specs += [(prefix + "input_layernorm.weight", (hidden,), "bf16")]
        specs += _attention_specs(config, prefix + "self_attn.")
        specs += [(prefix + "post_attention_layernorm.weight", (hidden,), "bf16")]
        specs += _mlp_specs(config, prefix + "mlp.", dense=layer < config["first_k_dense_replace"])
    specs += [("model.norm.weight", (hidden,), "bf16"), ("lm_head.weight", (vocab, hidden), "bf16")]
    return specs


def _attention_specs(config: dict, prefix: str) -> List[TensorSpec]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    q_head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    kv_lora = config["kv_lora_rank"]
    specs: List[TensorSpec] = []
    if config.get("q_lora_rank"):
        specs += [
            (prefix + "q_a_proj.weight", (config["q_lora_rank"], hidden), "fp8"),
            (prefix + "q_a_layernorm.weight", (config["q_lora_rank"],), "bf16"),
            (prefix + "q_b_proj.weight", (heads * q_head, config["q_lora_rank"]), "fp8"),
        ]
    else:
        specs += [(prefix + "q_proj.weight", (heads * q_head, hidden), "fp8")]
    specs += [
        (prefix + "kv_a_proj_with_mqa.weight", (kv_lora + config["qk_rope_head_dim"], hidden), "fp8"),
        (prefix + "kv_a_layernorm.weight", (kv_lora,), "bf16"),
        (prefix + "kv_b_proj.weight", (heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), kv_lora), "fp8"),
        (prefix + "o_proj.weight", (hidden, heads * config["v_head_dim"]), "fp8"),
    ]
    return specs


def _ffn_specs(prefix: str, hidden: int, intermediate: int) -> List[TensorSpec]:
    return [
        (prefix + "gate_proj.weight", (intermediate, hidden), "fp8"),
        (prefix + "up_proj.weight", (intermediate, hidden), "fp8"),
        (prefix + "down_proj.weight", (hidden, intermediate), "fp8"),
    ]


def _mlp_specs(config: dict, prefix: str, dense: bool) -> List[TensorSpec]:
    hidden = config["hidden_size"]
    if dense:
        return _ffn_specs(prefix, hidden, config["intermediate_size"])
    experts = config["n_routed_experts"]
    specs: List[TensorSpec] = []
    for expert in range(experts):
        specs += _ffn_specs(f"{prefix}experts.{expert}.", hidden, config["moe_intermediate_size"])
    specs += [
        (prefix + "gate.weight", (experts, hidden), "bf16"),
        (prefix + "gate.e_score_correction_bias", (experts,), "fp32"),
    ]
    if config.get("n_shared_experts"):
        specs += _ffn_specs(
            prefix + "shared_experts.", hidden, config["moe_intermediate_size"] * config["n_shared_experts"]
        )
    return specs


def quantize_fp8_blockwise(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` -> (fp8 e4m3 ``[out, in]``, float32 scale_inv ``[ceil(out/128), ceil(in/128)]``)."""
    rows, cols = weight.shape
    block_rows, block_cols = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(block_rows * BLOCK, block_cols * BLOCK)
    padded[:rows, :cols] = weight
    blocks = padded.view(block_rows, BLOCK, block_cols, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    quantized = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols]
    return quantized.to(torch.float8_e4m3fn).contiguous(), scale


def _random_value(name: str, shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic per name, so a tensor can be generated alone (and its MTP-layer copy made equal)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return 0.05 * torch.randn(shape, generator=generator)


def _copied_from(config: dict, name: str) -> str:
    """The MTP layers' embed_tokens / shared_head.head are copies of the main embedding / lm_head."""
    if name.startswith("model.layers.") and name.endswith(".embed_tokens.weight"):
        return "model.embed_tokens.weight"
    if name.startswith("model.layers.") and name.endswith(".shared_head.head.weight"):
        return "lm_head.weight"
    return name


def stored_tensors(config: dict, spec: TensorSpec, fp8: bool, seed: int) -> Dict[str, torch.Tensor]:
    """One spec's tensors as stored: ``{name: fp8, name_scale_inv: fp32}``, ``{name: bf16}`` or ``{name: fp32}``."""
    name, shape, kind = spec
    value = _random_value(_copied_from(config, name), shape, seed)
    if kind == "fp8" and fp8:
        quantized, scale = quantize_fp8_blockwise(value)
        return {name: quantized, name + "_scale_inv": scale}
    return {name: value.float() if kind == "fp32" else value.to(torch.bfloat16)}


def _stored_bytes(spec: TensorSpec, fp8: bool) -> int:
    _, shape, kind = spec
    return math.prod(shape) * (1 if kind == "fp8" and fp8 else 4 if kind == "fp32" else 2)


def write_checkpoint(directory: str, config: dict, fp8: bool, num_shards: int = 3, seed: int = 0) -> List[str]:
    """config.json, ``num_shards`` safetensors shards of about equal size (tensors in the released order) and
    the index, generating one shard's tensors at a time. Returns the shard file names."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    specs = hf_tensor_specs(config)
    total = sum(_stored_bytes(spec, fp8) for spec in specs)
    groups: List[List[TensorSpec]] = [[]]
    filled = 0
    for spec in specs:
        if filled >= total * len(groups) / num_shards and len(groups) < num_shards:
            groups.append([])
        groups[-1].append(spec)
        filled += _stored_bytes(spec, fp8)
    weight_map, files = {}, []
    for number, group in enumerate(groups):
        file_name = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors: Dict[str, torch.Tensor] = {}
        for spec in group:
            tensors.update(stored_tensors(config, spec, fp8, seed))
        save_file(tensors, os.path.join(directory, file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        files.append(file_name)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def fp8_config(config: dict) -> dict:
    """``config`` with the released checkpoint's quantization_config."""
    return dict(
        config,
        quantization_config=dict(
            quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[BLOCK, BLOCK]
        ),
    )


def write_tiny_checkpoint(directory: str, config: dict, fp8: bool = True, num_shards: int = 3, seed: int = 0) -> dict:
    """A random checkpoint for ``config`` in ``directory``; returns the config.json written."""
    config = fp8_config(config) if fp8 else {k: v for k, v in config.items() if k != "quantization_config"}
    write_checkpoint(directory, config, fp8, num_shards, seed)
    return config
