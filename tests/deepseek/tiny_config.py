"""A tiny DeepSeek-V3-shaped Hugging Face config (fp32, CPU-sized), shared by the DeepSeek tests.

Layer 0 is dense, layers 1-2 and the MTP layer (index 3) are MoE. Routing is group-limited: 8 experts in
2 groups of 4, one group kept per token, top-2 inside it (DeepSeek scores a group by the sum of its top-2
experts, which Megatron-Core reproduces when num_experts_per_tok == 2 * topk_group). YaRN is on, with
mscale != mscale_all_dim so both the cos/sin factor and the softmax-scale correction are exercised.
"""

import copy

TINY_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}


def tiny_config(**changes) -> dict:
    """A fresh copy of :data:`TINY_DEEPSEEK_V3` with ``changes`` applied (``None`` removes a key)."""
    config = copy.deepcopy(TINY_DEEPSEEK_V3)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config
