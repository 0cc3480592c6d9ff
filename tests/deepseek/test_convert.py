"""DeepSeek-V3 checkpoint conversion on tiny random checkpoints written in the released on-disk layout.

fp8 block dequantization against a direct reference; import -> load at TP=1, TP=2, EP=2 and PP=2 equals loading the
dequantized HF tensors directly (weights and logits); HF -> Megatron -> HF bit-exact (bf16); each bad input is a
clear error naming the tensor and file; leftovers are reported; a differing MTP copy warns with the difference.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state
from mp_world import run_world
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek.tiny_checkpoint import write_tiny_checkpoint
from deepseek.tiny_config import tiny_config
from megatron_mtp import cpu_bridge
from megatron_mtp.deepseek.convert import export_hf_checkpoint, import_hf_checkpoint
from megatron_mtp.deepseek.hf_checkpoint import CheckpointError, dequantize_fp8_blockwise
from megatron_mtp.deepseek.load import load_hf_state_dict
from megatron_mtp.deepseek.model import build_model
from megatron_mtp.data.datasets import MicroBatchIterator
from megatron_mtp.data.tokenizers import build_tokenizer
from megatron_mtp.pretrain import build_datasets
from megatron_mtp.training.arguments import parse_args
from megatron_mtp.training.checkpointing import load_model_weights

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# hidden 160 and intermediate 200: fp8 weights span several 128-blocks with partial edge blocks. 4 layers: 2 per
# pipeline stage at PP=2; the MTP layer is model.layers.4.
FP8_CONFIG = tiny_config(hidden_size=160, intermediate_size=200, num_hidden_layers=4)
INDEX = "model.safetensors.index.json"


def read_hf_dir(directory: str) -> dict:
    with open(os.path.join(directory, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(directory, shard), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    assert set(tensors) == set(weight_map)
    return tensors


def reference_dequantize(quantized: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W[i, j] = float(Wq[i, j]) * S[i // 128, j // 128], by explicit index arrays."""
    rows = torch.arange(quantized.shape[0])[:, None] // 128
    cols = torch.arange(quantized.shape[1])[None, :] // 128
    return (quantized.float() * scale_inv[rows, cols]).to(torch.bfloat16)


def dequantized_hf_state(directory: str) -> dict:
    """The HF tensors as a model loads them: fp8 dequantized by the reference, scales dropped."""
    stored = read_hf_dir(directory)
    state = {}
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = reference_dequantize(tensor, stored[name + "_scale_inv"])
        state[name] = tensor
    return state


def edit_shard_of(directory: str, name: str, edit) -> None:
    """Rewrite the shard holding ``name`` after ``edit(tensors)`` (a dict it may change)."""
    with open(os.path.join(directory, INDEX)) as f:
        shard = json.load(f)["weight_map"][name]
    path = os.path.join(directory, shard)
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_index(directory: str, edit) -> None:
    path = os.path.join(directory, INDEX)
    with open(path) as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(path, "w") as f:
        json.dump(index, f)


def build(config: dict, tp: int = 1, ep: int = 1, pp: int = 1):
    return build_model(
        config,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1 if ep > 1 else tp,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
    ).eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None, runtime_gather_output=True)


def compare_loaded(
    config: dict, root: str, hf_state: dict, tokens: torch.Tensor, tp: int, ep: int, pp: int = 1
) -> dict:
    """This rank's model loaded from the converted checkpoint vs one loaded from the HF tensors directly (logits
    only without pipeline parallelism)."""
    converted, direct = build(config, tp, ep, pp), build(config, tp, ep, pp)
    load_model_weights(root, converted)
    load_hf_state_dict(direct, hf_state, config)
    expected = direct.state_dict()
    weights = {
        name: (value.float() - expected[name].float()).abs().max().item()
        for name, value in converted.state_dict().items()
        if torch.is_tensor(value) and value.is_floating_point()
    }
    if pp > 1:
        return dict(weights=weights, logits=None)
    return dict(weights=weights, logits=(logits(converted, tokens) - logits(direct, tokens)).abs().max().item())


def _parallel_cases(config: dict, root: str, hf_state: dict, tokens: torch.Tensor) -> list:
    results = []
    for tp, ep, pp in ((2, 1, 1), (1, 2, 1), (1, 1, 2)):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=1 if ep > 1 else tp,
        )
        cpu_bridge.manual_seed(1234)
        results.append(dict(tp=tp, ep=ep, pp=pp, **compare_loaded(config, root, hf_state, tokens, tp, ep, pp)))
    return results


# ---- fp8 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (5, 7), (129, 385)])
def test_fp8_dequantization_matches_direct_reference(shape):
    generator = torch.Generator().manual_seed(0)
    quantized = (torch.randn(shape, generator=generator) * 100).to(torch.float8_e4m3fn)
    scale_inv = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=generator) + 0.5
    result = dequantize_fp8_blockwise(quantized, scale_inv)
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, reference_dequantize(quantized, scale_inv))


def test_fp8_checkpoint_imports_and_loads_like_dequantized_hf_tensors(single_process, tmp_path):
    hf_dir, root = str(tmp_path / "hf"), str(tmp_path / "megatron")
    config = write_tiny_checkpoint(hf_dir, FP8_CONFIG, fp8=True, num_shards=4)
    stored = read_hf_dir(hf_dir)
    assert any(t.dtype == torch.float8_e4m3fn for t in stored.values())
    assert any(name.startswith("model.layers.4.mlp.experts.7.") for name in stored)  # per-expert MTP tensors
    partial = [
        n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn and min(t.shape) > 128 and t.shape[1] % 128
    ]
    assert partial, "no fp8 tensor has several blocks with a partial edge block"

    report = import_hf_checkpoint(hf_dir, root, group_bytes=100_000)
    assert report.tensors == len(stored)
    assert os.path.isdir(os.path.join(root, "iter_0000000"))
    assert report.mtp_copy_max_difference == {
        "model.layers.4.embed_tokens.weight": 0.0,
        "model.layers.4.shared_head.head.weight": 0.0,
    }
    hf_state = dequantized_hf_state(hf_dir)
    tokens = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    single = compare_loaded(config, root, hf_state, tokens, tp=1, ep=1)
    assert single["weights"] and max(single["weights"].values()) == 0.0, single["weights"]
    assert single["logits"] == 0.0

    ranks = run_world(_parallel_cases, 2, config, root, hf_state, tokens)
    for rank in ranks:
        for case in rank:
            assert case["weights"] and max(case["weights"].values()) == 0.0, case
            assert case["logits"] == (None if case["pp"] > 1 else 0.0), case
    pipeline_stages = [next(case for case in rank if case["pp"] == 2)["weights"] for rank in ranks]
    assert (
        "embedding.word_embeddings.weight" in pipeline_stages[0] and "mtp.layers.0.eh_proj.weight" in pipeline_stages[1]
    )


# ---- round trip ---------------------------------------------------------------------------------------------------


def test_bf16_round_trip_is_bit_exact_and_writes_mtp_copies(tmp_path):
    hf_dir, root, out = str(tmp_path / "hf"), str(tmp_path / "megatron"), str(tmp_path / "out")
    write_tiny_checkpoint(hf_dir, tiny_config(), fp8=False)
    import_hf_checkpoint(hf_dir, root, group_bytes=50_000)
    files = export_hf_checkpoint(root, out, max_shard_bytes=200_000, group_bytes=50_000)
    assert len(files) > 1
    original, exported = read_hf_dir(hf_dir), read_hf_dir(out)
    assert set(exported) == set(original)
    assert "model.layers.3.embed_tokens.weight" in exported and "model.layers.3.shared_head.head.weight" in exported
    differing = [
        n for n in original if original[n].dtype != exported[n].dtype or not torch.equal(original[n], exported[n])
    ]
    assert not differing, differing
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == tiny_config()


def test_conversion_inside_a_running_world_leaves_its_process_groups_as_they_were(gloo_world, tmp_path):
    from torch.distributed import distributed_c10d

    assert not parallel_state.model_parallel_is_initialized()
    groups = set(distributed_c10d._world.pg_map)
    hf_dir, root = str(tmp_path / "hf"), str(tmp_path / "megatron")
    write_tiny_checkpoint(hf_dir, tiny_config(), fp8=False)
    import_hf_checkpoint(hf_dir, root)
    export_hf_checkpoint(root, str(tmp_path / "out"))
    assert set(distributed_c10d._world.pg_map) == groups  # Megatron's groups destroyed, the world's own kept
    assert torch.distributed.is_initialized()


def test_cli_imports_with_progress_and_explains_itself(tmp_path):
    hf_dir, root = str(tmp_path / "hf"), str(tmp_path / "megatron")
    write_tiny_checkpoint(hf_dir, tiny_config(), fp8=True)
    script = os.path.join(REPO, "tools", "convert_deepseek_v3.py")
    usage = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "import" in usage and "export" in usage and "fp8" in usage
    run = subprocess.run([sys.executable, script, "import", hf_dir, root], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "imported" in run.stdout and "import: 100%" in run.stderr
    again = subprocess.run([sys.executable, script, "import", hf_dir, root], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fp8_dir(tmp_path):
    directory = str(tmp_path / "hf")
    write_tiny_checkpoint(directory, tiny_config(), fp8=True, num_shards=3)
    return directory


def _import(directory, tmp_path):
    return import_hf_checkpoint(directory, str(tmp_path / "megatron"))


def test_missing_shard_is_named(fp8_dir, tmp_path):
    os.remove(os.path.join(fp8_dir, "model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing shard .*model-00002-of-00003\.safetensors"):
        _import(fp8_dir, tmp_path)


def test_tensor_missing_from_index_is_named(fp8_dir, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    edit_index(fp8_dir, lambda weight_map: weight_map.pop(name))
    with pytest.raises(CheckpointError, match=rf"{name} is missing from .*{INDEX}"):
        _import(fp8_dir, tmp_path)
    assert not os.path.exists(tmp_path / "megatron" / "iter_0000000")


def test_index_entry_absent_from_its_shard_is_named(fp8_dir, tmp_path):
    edit_index(fp8_dir, lambda weight_map: weight_map.update({"model.norm.weight": "model-00001-of-00003.safetensors"}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is listed .* under model-00001-of-00003"):
        _import(fp8_dir, tmp_path)


def test_wrong_shape_is_named_with_file_and_shapes(fp8_dir, tmp_path):
    name = "model.layers.0.input_layernorm.weight"
    edit_shard_of(fp8_dir, name, lambda tensors: tensors.update({name: torch.ones(65, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"{name} in model-0000\d-of-00003.safetensors has shape \[65\].*\[64\]"):
        _import(fp8_dir, tmp_path)


def test_missing_scale_inv_is_named(fp8_dir, tmp_path):
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    edit_index(fp8_dir, lambda weight_map: weight_map.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"{name} in .* is fp8 but {name}_scale_inv is missing"):
        _import(fp8_dir, tmp_path)


def test_mtp_layer_without_num_nextn_predict_layers_is_an_error(fp8_dir, tmp_path):
    with open(os.path.join(fp8_dir, "config.json")) as f:
        config = json.load(f)
    del config["num_nextn_predict_layers"]
    with open(os.path.join(fp8_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\..* config\.json has no num_nextn_predict_layers"):
        _import(fp8_dir, tmp_path)


def test_leftover_tensors_are_reported_by_name(fp8_dir, tmp_path):
    name = "model.layers.1.self_attn.unexpected.weight"
    edit_shard_of(fp8_dir, "model.norm.weight", lambda tensors: tensors.update({name: torch.zeros(3)}))
    with open(os.path.join(fp8_dir, INDEX)) as f:
        shard = json.load(f)["weight_map"]["model.norm.weight"]
    edit_index(fp8_dir, lambda weight_map: weight_map.update({name: shard}))
    with pytest.raises(CheckpointError, match=rf"1 tensors of .* were not used: {name} \({shard}\)"):
        _import(fp8_dir, tmp_path)
    assert not os.path.exists(tmp_path / "megatron" / "iter_0000000")


def test_differing_mtp_copy_warns_with_max_difference(fp8_dir, tmp_path):
    name = "model.layers.3.embed_tokens.weight"

    def perturb(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][7, 3] += 0.5

    edit_shard_of(fp8_dir, name, perturb)
    stored = read_hf_dir(fp8_dir)
    expected = (stored[name].float() - stored["model.embed_tokens.weight"].float()).abs().max().item()
    assert expected > 0
    with pytest.warns(
        UserWarning, match=rf"{name} .* differs from model\.embed_tokens\.weight by up to {expected:.6g}"
    ):
        report = _import(fp8_dir, tmp_path)
    assert report.mtp_copy_max_difference[name] == expected


def test_pretrain_finetunes_from_an_imported_checkpoint_and_its_save_exports(tmp_path):
    hf_dir, root, trained, out = (str(tmp_path / name) for name in ("hf", "megatron", "trained", "out"))
    write_tiny_checkpoint(hf_dir, tiny_config(vocab_size=384), fp8=True)  # room for the byte-level tokenizer
    import_hf_checkpoint(hf_dir, root)
    command = [sys.executable, "-m", "megatron_mtp.pretrain", "--hf-config", os.path.join(hf_dir, "config.json")]
    command += ["--load", root, "--finetune", "--train-iters", "2", "--seq-length", "32", "--micro-batch-size", "2"]
    command += [
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--lr-warmup-iters",
        "1",
        "--lr",
        "1e-2",
        "--save",
        trained,
        "--json-log",
        str(tmp_path / "log.jsonl"),
    ]
    command += ["--tokenizer-type", "ByteLevel", "--data-cache-path", os.path.join(os.path.expanduser("~"), ".cache", "megatron_mtp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded model weights from {root}; training starts at iteration 0" in result.stdout
    assert "records no model signature" not in result.stderr  # the import wrote the one the run checks
    with open(tmp_path / "log.jsonl") as f:
        losses = [record["lm_loss"] for record in map(json.loads, f)]
    # The first step's loss is the imported weights' on the first batch: transformers computes it from the HF files.
    assert len(losses) == 2
    expected = transformers_lm_loss(hf_dir, first_batch(command[3:]), tmp_path / "hf_bf16")
    assert losses[0] == pytest.approx(expected, abs=1e-4)

    no_mtp = tmp_path / "no_mtp.json"  # same tensor shapes, no MTP layer: only the signature tells them apart
    no_mtp.write_text(json.dumps(tiny_config(vocab_size=384, num_nextn_predict_layers=0)))
    mismatch = subprocess.run(
        [*command[:3], "--hf-config", str(no_mtp), *command[5:]], capture_output=True, text=True, timeout=300
    )
    assert mismatch.returncode != 0 and "mtp_num_layers: checkpoint 1, this run 0" in mismatch.stderr, mismatch.stderr

    with pytest.raises(CheckpointError, match="records no HF config"):
        export_hf_checkpoint(trained, out)
    export_hf_checkpoint(trained, out, hf_config=os.path.join(hf_dir, "config.json"))
    original, exported = dequantized_hf_state(hf_dir), read_hf_dir(out)
    assert set(exported) == set(original)
    assert all(exported[name].shape == original[name].shape for name in original)
    changed = [name for name in original if not torch.equal(exported[name], original[name].to(exported[name].dtype))]
    assert "model.layers.3.eh_proj.weight" in changed and "lm_head.weight" in changed, changed
    assert torch.equal(exported["model.layers.3.embed_tokens.weight"], exported["model.embed_tokens.weight"])
    assert torch.equal(exported["model.layers.3.shared_head.head.weight"], exported["lm_head.weight"])


def first_batch(flags: list) -> dict:
    """The first micro-batch a one-process pretrain run with ``flags`` trains on."""
    args = parse_args(flags)
    _, train_set, _ = build_datasets(args, build_tokenizer(args.tokenizer_type, args.tokenizer_model), args.micro_batch_size)
    return next(MicroBatchIterator(train_set, 0, args.micro_batch_size, 0, 1))


def transformers_lm_loss(hf_dir: str, batch: dict, scratch) -> float:
    """Mean next-token loss of transformers' DeepseekV3ForCausalLM (fp32) on ``batch``, from the dequantized files
    of ``hf_dir`` (transformers loads them its own way; its model has no MTP layer, whose tensors it skips)."""
    from transformers import AutoModelForCausalLM

    with open(os.path.join(hf_dir, "config.json")) as f:
        config = {key: value for key, value in json.load(f).items() if key != "quantization_config"}
    os.makedirs(scratch)
    with open(os.path.join(scratch, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(dequantized_hf_state(hf_dir), os.path.join(scratch, "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(str(scratch), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(batch["tokens"], position_ids=batch["position_ids"]).logits
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    return ((per_token * mask).sum() / mask.sum()).item()
