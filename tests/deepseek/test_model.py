"""DeepSeek-V3 on Megatron-Core against Hugging Face transformers' DeepseekV3ForCausalLM.

A random fp32 HF model of the tiny config is mapped through ``mapping.py`` into our Megatron model, whose
logits must equal transformers' at TP=1 (this process), TP=2, EP=2 and TP=2 x EP=2 (one spawned world).
transformers ignores the MTP layer, so its tensors are generated here (its decoder layer as layer 3 of a
4-layer HF model) and the depth-1 logits are compared with a plain-PyTorch reference of DeepSeek's MTP
module: ``eh_proj(cat(enorm(embed(next tokens)), hnorm(h))) -> decoder layer -> shared_head.norm -> head``.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from megatron.core import parallel_state

from deepseek.tiny_config import tiny_config
from megatron_mtp import cpu_bridge
from megatron_mtp.checkpoint_names import te_state_dict_names
from megatron_mtp.compat import MLA_WITHOUT_QUERY_LOW_RANK
from megatron_mtp.deepseek.hf_config import megatron_configs
from megatron_mtp.deepseek.load import load_hf_state_dict
from megatron_mtp.deepseek.mapping import (
    CONCAT,
    TensorMapping,
    hf_to_megatron,
    megatron_to_hf,
    mtp_shared_copies,
    tensor_mappings,
)
from megatron_mtp.deepseek.model import build_model
from megatron_mtp.training.arguments import parse_args
from mp_world import run_world

BATCH, SEQ = 2, 12
ATOL = 1e-4
PARALLEL_CASES = (
    {"tp": 2, "ep": 1},
    {"tp": 1, "ep": 2},
    {"tp": 2, "ep": 2},
    {"tp": 1, "ep": 2, "dispatcher": "alltoall"},
)
PIPELINE_CASE = {"tp": 1, "ep": 1, "pp": 2}  # on a 4-layer variant: 2 layers per stage


# ---- the HF side -------------------------------------------------------------------------------------------------


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights large enough that routing and attention are far from uniform; non-zero expert bias."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
            elif "norm" in name:
                tensor.copy_(1 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("gate.weight"):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
            elif tensor.dim() >= 2:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor.shape[-1] ** 0.5)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def hf_reference(config: dict, seed: int = 0) -> dict:
    """Random HF model of ``config`` plus MTP tensors; returns the HF checkpoint tensors and reference outputs."""
    generator = torch.Generator().manual_seed(seed)
    layers = config["num_hidden_layers"]
    # Layer ``layers`` of a one-layer-deeper model is the MTP module's decoder layer (same index, same kind).
    deeper = DeepseekV3ForCausalLM(DeepseekV3Config(**{**config, "num_hidden_layers": layers + 1})).eval()
    _randomize(deeper, generator)
    main_config = DeepseekV3Config(**config)
    main_config._attn_implementation = "eager"
    main = DeepseekV3ForCausalLM(main_config).eval()
    prefix = f"model.layers.{layers}."
    main.load_state_dict({k: v for k, v in deeper.state_dict().items() if not k.startswith(prefix)})
    with tempfile.TemporaryDirectory() as directory:
        deeper.save_pretrained(directory)  # the checkpoint layout: one tensor per expert projection
        hf_state = load_file(os.path.join(directory, "model.safetensors"))
    hidden = config["hidden_size"]
    mtp = {
        prefix + "enorm.weight": 1 + 0.2 * torch.randn(hidden, generator=generator),
        prefix + "hnorm.weight": 1 + 0.2 * torch.randn(hidden, generator=generator),
        prefix + "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator) / (2 * hidden) ** 0.5,
        prefix + "shared_head.norm.weight": 1 + 0.2 * torch.randn(hidden, generator=generator),
    }
    hf_state.update(mtp)
    for copy, original in mtp_shared_copies(config).items():
        hf_state[copy] = hf_state[original].clone()

    tokens = torch.randint(0, config["vocab_size"], (BATCH, SEQ), generator=generator)
    routed = _capture_router_inputs(main)
    with torch.no_grad():
        logits = main(tokens).logits
        h = main.model(tokens).last_hidden_state
        mtp_logits = _mtp_reference(main, deeper.model.layers[layers], hf_state, prefix, tokens, h, config)
    return dict(hf_state=hf_state, tokens=tokens, logits=logits, mtp_logits=mtp_logits, routed=routed())


def _mtp_reference(main, decoder_layer, hf_state, prefix, tokens, h, config) -> torch.Tensor:
    """DeepSeek-V3's MTP depth 1, written from the paper / vLLM's description; logits [b, s, V].
    The last position has no next token; it embeds token 0, as our roll does."""
    eps = config["rms_norm_eps"]
    next_tokens = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    embedded = torch.nn.functional.embedding(next_tokens, hf_state[prefix + "embed_tokens.weight"])
    combined = torch.cat(
        [
            _rms_norm(embedded, hf_state[prefix + "enorm.weight"], eps),
            _rms_norm(h, hf_state[prefix + "hnorm.weight"], eps),
        ],
        dim=-1,
    )
    x = combined @ hf_state[prefix + "eh_proj.weight"].T
    positions = torch.arange(SEQ).unsqueeze(0)
    causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]
    decoder_layer.self_attn.config._attn_implementation = "eager"
    x = decoder_layer(
        x, attention_mask=causal, position_ids=positions, position_embeddings=main.model.rotary_emb(x, positions)
    )
    x = _rms_norm(x, hf_state[prefix + "shared_head.norm.weight"], eps)
    return x @ hf_state[prefix + "shared_head.head.weight"].T


def _capture_router_inputs(model):
    """Records each MoE router's input; returns a function giving how often routing choices depend on
    group limiting and on the expert bias (so a router ignoring either would change the logits)."""
    captured = []
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    hooks = [
        gate.register_forward_hook(lambda module, args, output: captured.append((module, args[0].detach())))
        for gate in gates
    ]

    def summary():
        for hook in hooks:
            hook.remove()
        group_changes = bias_changes = total = 0
        for gate, x in captured:
            scores = torch.sigmoid(x.reshape(-1, x.shape[-1]) @ gate.weight.T)
            chosen = gate(x)[2].sort(dim=-1).values
            no_groups = torch.topk(scores + gate.e_score_correction_bias, gate.top_k, dim=-1)[1].sort(dim=-1).values
            gate.e_score_correction_bias.zero_()
            no_bias = gate(x)[2].sort(dim=-1).values
            group_changes += (chosen != no_groups).any(-1).sum().item()
            bias_changes += (chosen != no_bias).any(-1).sum().item()
            total += chosen.shape[0]
        return dict(group_changes=group_changes, bias_changes=bias_changes, tokens=total)

    return summary


# ---- the Megatron side -------------------------------------------------------------------------------------------


def megatron_outputs(
    config: dict,
    hf_state: dict,
    tokens: torch.Tensor,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    dispatcher: str = "allgather",
    attention_mask: Optional[torch.Tensor] = None,
) -> Optional[dict]:
    """Our model of ``config`` at this process's parallel state, loaded from ``hf_state``: full logits and
    depth-1 logits [b, s, V] (None on pipeline stages other than the last). ``attention_mask``: bool,
    True where masked; None lets the attention apply its causal mask."""
    model = build_model(
        config,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1 if ep > 1 else tp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,
    ).eval()
    load_hf_state_dict(model, hf_state, config)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    depth_states = []
    if model.post_process:
        model.mtp.register_forward_hook(lambda module, args, output: depth_states.extend(output))
    with torch.no_grad():
        logits = _pipelined(model, lambda: model(tokens, positions, attention_mask, runtime_gather_output=True))
        _pipelined(model, lambda: model(
            tokens, positions, attention_mask, labels=tokens, loss_mask=torch.ones_like(tokens), compute_mtp=True
        ))
        if not model.post_process:
            return None
        mtp_logits, _ = model.output_layer(depth_states[0], runtime_gather_output=True)
    return dict(logits=logits, mtp_logits=mtp_logits.transpose(0, 1))


def _pipelined(model, forward):
    """One forward through the pipeline stages (stage i sends its [s, b, h] output to stage i+1)."""
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(SEQ, BATCH, model.config.hidden_size)
        torch.distributed.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    output = forward()
    if not parallel_state.is_pipeline_last_stage():
        torch.distributed.send(output.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
    return output


def _parallel_worlds(cases: list) -> list:
    """Run in each spawned rank: every (parallel sizes, config, HF tensors, tokens) case in turn,
    re-initialising Megatron's groups."""
    results = []
    for sizes, config, hf_state, tokens in cases:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=sizes["tp"],
            pipeline_model_parallel_size=sizes.get("pp", 1),
            expert_model_parallel_size=sizes["ep"],
            expert_tensor_parallel_size=1 if sizes["ep"] > 1 else sizes["tp"],
        )
        cpu_bridge.manual_seed(1234)
        results.append(megatron_outputs(config, hf_state, tokens, **sizes))
    return results


# ---- tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return hf_reference(tiny_config())


def test_routing_depends_on_group_limit_and_expert_bias(reference):
    routed = reference["routed"]
    assert routed["group_changes"] > 0, f"group-limited top-k never changes a choice: {routed}"
    assert routed["bias_changes"] > 0, f"the expert bias never changes a choice: {routed}"


def test_logits_and_mtp_logits_match_transformers_at_tp1(single_process, reference):
    causal_mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    for mask in (None, causal_mask):  # the attention's own causal mask, then an explicit one
        ours = megatron_outputs(tiny_config(), reference["hf_state"], reference["tokens"], attention_mask=mask)
        torch.testing.assert_close(ours["logits"], reference["logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours["mtp_logits"], reference["mtp_logits"], atol=ATOL, rtol=0)


def test_logits_match_transformers_without_query_low_rank(single_process):
    config = {**tiny_config(), "q_lora_rank": None}  # null in config.json, as in DeepSeek-V2-Lite
    if not MLA_WITHOUT_QUERY_LOW_RANK:  # this release's MLA adds a query norm the checkpoint lacks
        with pytest.raises(NotImplementedError, match="q_lora_rank=null"):
            build_model(config, use_cpu_initialization=True, gradient_accumulation_fusion=False)
        return
    reference = hf_reference(config, seed=1)
    ours = megatron_outputs(config, reference["hf_state"], reference["tokens"])
    torch.testing.assert_close(ours["logits"], reference["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["mtp_logits"], reference["mtp_logits"], atol=ATOL, rtol=0)


def test_logits_match_transformers_at_tp2_ep2_tp2xep2_alltoall_and_pp2(reference):
    deeper_config = tiny_config(num_hidden_layers=4)
    deeper = hf_reference(deeper_config, seed=2)
    cases = [(sizes, tiny_config(), reference["hf_state"], reference["tokens"]) for sizes in PARALLEL_CASES]
    cases.append((PIPELINE_CASE, deeper_config, deeper["hf_state"], deeper["tokens"]))
    ranks = run_world(_parallel_worlds, 2, cases)
    expected = [reference] * len(PARALLEL_CASES) + [deeper]
    assert ranks[0][-1] is None, "pipeline stage 0 must not produce logits"
    for rank, results in enumerate(ranks):
        for (sizes, *_), ours, wanted in zip(cases, results, expected):
            if ours is None:
                continue
            for key in ("logits", "mtp_logits"):
                where = f"rank {rank} {sizes} {key}"
                torch.testing.assert_close(
                    ours[key], wanted[key], atol=ATOL, rtol=0, msg=lambda m, w=where: f"{w}: {m}"
                )
    assert ranks[1][-1] is not None


def test_every_mapping_round_trips_bit_exactly(reference):
    config = tiny_config()
    hf_state = reference["hf_state"]
    for mapping in tensor_mappings(config):
        hf_tensors = [hf_state[key] for key in mapping.hf_keys]
        back = mapping.to_hf(mapping.to_megatron(hf_tensors))
        assert all(torch.equal(a, b) for a, b in zip(back, hf_tensors)), mapping.megatron_key
    round_trip = megatron_to_hf(hf_to_megatron(hf_state, config), config)
    assert round_trip.keys() == hf_state.keys()
    assert all(torch.equal(round_trip[key], hf_state[key]) for key in hf_state)


def test_mapping_names_every_megatron_tensor_once(single_process):
    configs = [tiny_config()]
    if MLA_WITHOUT_QUERY_LOW_RANK:
        configs.append({**tiny_config(tie_word_embeddings=True), "q_lora_rank": None})
    for config in configs:
        model = build_model(config, use_cpu_initialization=True, gradient_accumulation_fusion=False)
        own_names = [k for k in model.state_dict() if not k.endswith("_extra_state")]
        expected = set(te_state_dict_names(model, own_names).values())
        names = [m.megatron_key for m in tensor_mappings(config)]
        assert len(names) == len(set(names))
        assert set(names) == expected
        assert names[0] == "embedding.word_embeddings.weight"
        assert names.index("decoder.final_layernorm.weight") < names.index("mtp.layers.0.enorm.weight")


def test_transformer_engine_names_fuse_norms_into_linears():
    names = {m.megatron_key: m.hf_keys[0] for m in tensor_mappings(tiny_config())}
    assert names["decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight"].endswith("q_a_layernorm.weight")
    assert names["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"].endswith("post_attention_layernorm.weight")
    assert names["decoder.layers.1.pre_mlp_layernorm.weight"].endswith("post_attention_layernorm.weight")


def test_swiglu_mapping_concatenates_gate_then_up():
    mapping = TensorMapping("x.linear_fc1.weight", ("x.gate_proj.weight", "x.up_proj.weight"), CONCAT)
    gate, up = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(mapping.to_megatron([gate, up]), torch.cat([gate, up]))
    with pytest.raises(ValueError, match="one shape"):
        mapping.to_megatron([gate, torch.zeros(3, 3)])


def test_config_translation():
    configs = megatron_configs(tiny_config(), tensor_model_parallel_size=2)
    t = configs.transformer
    assert (t.num_layers, t.moe_layer_freq, t.num_moe_experts, t.moe_router_topk) == (3, [0, 1, 1], 8, 2)
    assert (t.moe_router_num_groups, t.moe_router_group_topk, t.moe_router_topk_scaling_factor) == (2, 1, 2.5)
    assert t.moe_router_enable_expert_bias and t.moe_router_score_function == "sigmoid"
    assert t.moe_shared_expert_intermediate_size == 32 and t.tensor_model_parallel_size == 2
    assert (t.q_lora_rank, t.kv_lora_rank, t.qk_head_dim, t.qk_pos_emb_head_dim, t.v_head_dim) == (32, 16, 16, 8, 16)
    assert (t.rope_type, t.rotary_scaling_factor, t.original_max_position_embeddings) == ("yarn", 4.0, 32)
    assert (t.mscale, t.mscale_all_dim) == (1.0, 0.707)
    assert configs.mtp.num_layers == 1 and t.mtp_num_layers == 1 and configs.mtp_layer_is_moe
    assert (configs.vocab_size, configs.share_embeddings_and_output_weights) == (256, False)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe"), NotImplementedError, "Glm4MoeForCausalLM"),
        (dict(architectures=["LlamaForCausalLM"], model_type="llama"), NotImplementedError, "LlamaForCausalLM"),
        (dict(scoring_func="softmax"), ValueError, "scoring_func"),
        (dict(topk_method="greedy"), ValueError, "topk_method"),
        (dict(num_experts_per_tok=3), ValueError, "num_experts_per_tok"),
        (dict(norm_topk_prob=False), ValueError, "norm_topk_prob"),
        (dict(rope_interleave=False), ValueError, "rope_interleave"),
        (dict(hidden_act="gelu"), ValueError, "hidden_act"),
        (dict(num_key_value_heads=2), ValueError, "num_key_value_heads"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), ValueError, "linear"),
        (dict(kv_lora_rank=None), ValueError, "kv_lora_rank"),
    ],
)
def test_unsupported_configs_raise_naming_the_key(changes, error, match):
    with pytest.raises(error, match=match):
        megatron_configs(tiny_config(**changes))


def test_override_of_an_hf_setting_is_an_error():
    with pytest.raises(ValueError, match="hidden_size"):
        megatron_configs(tiny_config(), hidden_size=128)


# ---- the pretrain script's --hf-config ---------------------------------------------------------------------------


RUN_FLAGS = ["--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3", "--tokenizer-type", "ByteLevel"]
"""What a pretrain run needs beside --hf-config."""


@pytest.fixture
def hf_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config()))
    return str(path)


def test_hf_config_flag_sets_the_architecture(hf_config_file):
    args = parse_args([*RUN_FLAGS, "--hf-config", hf_config_file, "--num-layers", "3", "--mtp-loss-scaling-factor", "0.3"])
    assert (args.num_layers, args.hidden_size, args.num_experts, args.moe_router_topk) == (3, 64, 8, 2)
    assert args.swiglu and args.untie_embeddings_and_output_weights and args.hf_vocab_size == 256
    assert (args.mtp_config.num_layers, args.mtp_config.mode, args.mtp_config.loss_scaling_factor) == (
        1,
        "sequential",
        0.3,
    )


@pytest.mark.parametrize("depths", [0, 2])
def test_hf_config_flag_takes_the_mtp_depth_of_the_config(tmp_path, depths):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config(num_nextn_predict_layers=depths)))
    assert parse_args([*RUN_FLAGS, "--hf-config", str(path)]).mtp_config.num_layers == depths


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-layers", "4"], "--num-layers 4 contradicts"),
        (["--swiglu", "--hidden-size", "128"], "--hidden-size 128 contradicts"),
        (["--mtp-mode", "parallel"], "--mtp-mode parallel contradicts"),
        (["--mtp-num-layers", "2"], "--mtp-num-layers 2 contradicts"),
    ],
)
def test_hf_config_flag_refuses_contradicting_flags(hf_config_file, flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args([*RUN_FLAGS, "--hf-config", hf_config_file, *flags])
    assert message in capsys.readouterr().err


def test_hf_config_flag_names_an_unsupported_architecture(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe")))
    with pytest.raises(SystemExit):
        parse_args([*RUN_FLAGS, "--hf-config", str(path)])
    assert "Glm4MoeForCausalLM is not supported" in capsys.readouterr().err


def test_pretrain_trains_the_hf_config_model(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(vocab_size=384)))  # room for the byte-level tokenizer
    command = [
        sys.executable,
        "-m",
        "megatron_mtp.pretrain",
        "--hf-config",
        str(config),
        "--train-iters",
        "4",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--lr-warmup-iters",
        "1",
        "--lr",
        "1e-3",
        "--tokenizer-type",
        "ByteLevel",
        "--data-cache-path",
        os.path.join(os.path.expanduser("~"), ".cache", "megatron_mtp"),
        "--json-log",
        str(tmp_path / "log.jsonl"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MTP sequential D=1" in result.stdout
    with open(tmp_path / "log.jsonl") as f:
        log = {record["iteration"]: record for record in map(json.loads, f)}
    assert sorted(log) == [1, 2, 3, 4]
    # Untrained, the untied output layer's rows are N(0, std^2), independent of the final norm's output x (RMS 1,
    # |x|^2 = hidden): every logit is N(0, s^2) with s = std * sqrt(hidden), and the expected cross-entropy is
    # E[logsumexp] = ln V + s^2 / 2, for the main and the MTP head alike. The batch mean of the label's logit has
    # a standard deviation of s at most (all its tokens alike); allow 2 s. Iteration 1 runs before any step.
    vocab, hidden, std = 384, 64, 0.02
    s = std * math.sqrt(hidden)
    for key in ("lm_loss", "mtp_1_loss"):
        assert log[1][key] == pytest.approx(math.log(vocab) + s**2 / 2, abs=2 * s), (key, log[1][key])
    assert log[4]["lm_loss"] < log[1]["lm_loss"] - 0.1, "3 steps should have lowered the loss"
