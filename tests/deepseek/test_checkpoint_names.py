"""Checkpoints carry TransformerEngine's tensor names whichever spec built the DeepSeek-V3 model.

The reference is Megatron-Core's TE spec itself (built here with CPU stand-ins for the TE modules, see
``te_stand_ins.py``): the local-spec model and the HF importer must write exactly the tensors, under the same keys,
global shapes and offsets, that the TE-spec model writes.
"""

import os

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from deepseek.te_stand_ins import te_placeholders, te_stand_ins
from deepseek.tiny_checkpoint import write_tiny_checkpoint
from deepseek.tiny_config import tiny_config
from megatron_mtp.deepseek import model as deepseek_model
from megatron_mtp.deepseek.convert import (
    check_mapping_covers_model,
    export_hf_checkpoint,
    import_hf_checkpoint,
    te_named_sharded_state_dict,
)
from megatron_mtp.compat import MLA_WITHOUT_QUERY_LOW_RANK
from megatron_mtp.deepseek.mapping import tensor_mappings
from megatron_mtp.deepseek.model import build_model
from megatron_mtp.training.checkpointing import TRACKER_FILE, iteration_dir, load_model_weights

CONFIGS = {"q_lora": tiny_config()}
if MLA_WITHOUT_QUERY_LOW_RANK:  # refused under releases whose MLA adds a query norm (test_model.py checks that)
    CONFIGS["no_q_lora_tied"] = {**tiny_config(tie_word_embeddings=True), "q_lora_rank": None}


def build(config: dict, use_transformer_engine: bool):
    return build_model(
        config,
        use_transformer_engine=use_transformer_engine,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )


def checkpoint_layout(model):
    """(key, global shape, global offset) of every tensor chunk the model saves, and its object keys."""
    state = model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group({}))
    apply_factories(state)
    values = list(nested_values(state))
    tensors = {
        (v.key, tuple(v.global_shape), tuple(v.global_offset)) for v in values if isinstance(v, ShardedTensor)
    }
    objects = {v.key for v in values if isinstance(v, ShardedObject)}
    return tensors, objects


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_local_spec_saves_the_tensors_of_the_transformer_engine_spec(single_process, monkeypatch, name):
    config = CONFIGS[name]
    local = build(config, use_transformer_engine=False)
    local_tensors, local_objects = checkpoint_layout(local)
    te_stand_ins(monkeypatch)
    te = build(config, use_transformer_engine=True)
    assert not te_placeholders(te)
    te_tensors, te_objects = checkpoint_layout(te)

    assert local_tensors == te_tensors
    # TE fuses norms into linear layers where the local spec has norm modules: dense, MoE and MTP layers alike.
    te_keys = {key for key, _, _ in te_tensors}
    for fused in (
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight",
        "mtp.layers.0.transformer_layer.self_attention.linear_kv_up_proj.layer_norm_weight",
    ):
        assert fused in te_keys
    norms = ("pre_mlp_layernorm.weight", "kv_layernorm.weight")
    local_norms = [name for name, _ in local.named_parameters() if name.endswith(norms)]
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in local_norms and any(n.startswith("mtp.") for n in local_norms)
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in te_keys  # MoE layers keep their own norm under TE
    # Only TE's extra state (FP8 metadata) differs, which loading tolerates.
    assert all(key.endswith("._extra_state") for key in te_objects ^ local_objects)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("use_transformer_engine", [False, True], ids=["local", "te"])
def test_conversion_mapping_covers_the_model_of_either_spec(single_process, monkeypatch, use_transformer_engine, name):
    if use_transformer_engine:
        te_stand_ins(monkeypatch)
    model = build(CONFIGS[name], use_transformer_engine)
    check_mapping_covers_model(tensor_mappings(CONFIGS[name]), te_named_sharded_state_dict(model))


def test_import_writes_the_tensors_of_the_transformer_engine_spec(single_process, monkeypatch, tmp_path):
    hf_dir, root = str(tmp_path / "hf"), str(tmp_path / "megatron")
    config = write_tiny_checkpoint(hf_dir, tiny_config(), fp8=False)
    import_hf_checkpoint(hf_dir, root)
    written = dist_checkpointing.load_tensors_metadata(iteration_dir(root, 0))
    te_stand_ins(monkeypatch)
    te_tensors, _ = checkpoint_layout(build(config, use_transformer_engine=True))
    assert {key: tuple(value.global_shape) for key, value in written.items()} == {
        key: shape for key, shape, _ in te_tensors
    }


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model.eval()(tokens, positions, None, runtime_gather_output=True)


def save_model_weights(model, root: str) -> None:
    """A model-only checkpoint ``root/iter_0000000``, as :func:`load_model_weights` reads it."""
    os.makedirs(iteration_dir(root, 0))
    state = {"model": model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group({}))}
    dist_checkpointing.save(state, iteration_dir(root, 0))
    with open(os.path.join(root, TRACKER_FILE), "w") as f:
        f.write("0")


def test_checkpoints_move_between_the_local_and_the_te_spec(single_process, monkeypatch, tmp_path):
    """Import on a host without TE, fine-tune with TE (the TE model has extra state the import lacks); a checkpoint
    the TE model saves loads into the local model."""
    hf_dir, imported, saved_by_te = (str(tmp_path / name) for name in ("hf", "imported", "saved_by_te"))
    config = write_tiny_checkpoint(hf_dir, tiny_config(), fp8=False)
    import_hf_checkpoint(hf_dir, imported)
    tokens = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    local = build(config, use_transformer_engine=False)
    load_model_weights(imported, local)
    expected = logits(local, tokens)

    te_stand_ins(monkeypatch)
    te = build(config, use_transformer_engine=True)
    assert any(key.endswith("core_attention._extra_state") for key in te.state_dict())
    load_model_weights(imported, te)
    assert torch.equal(logits(te, tokens), expected)

    save_model_weights(te, saved_by_te)
    local_again = build(config, use_transformer_engine=False)
    load_model_weights(saved_by_te, local_again)
    assert torch.equal(logits(local_again, tokens), expected)


def test_checkpoint_with_earlier_local_names_is_refused_saying_what_to_do(single_process, monkeypatch, tmp_path):
    root, out = str(tmp_path / "legacy"), str(tmp_path / "hf")
    config = tiny_config()
    with monkeypatch.context() as before:  # the local spec as this project built it before: no keys map
        before.setattr(deepseek_model, "with_te_checkpoint_names", lambda layer_spec: layer_spec)
        save_model_weights(build(config, use_transformer_engine=False), root)
    saved = dist_checkpointing.load_tensors_metadata(iteration_dir(root, 0))
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in saved

    # q_ and kv_layernorm of 3 decoder layers and the MTP layer, the dense layer's pre_mlp_layernorm
    message = r"names 9 tensors as megatron_mtp did before .*saved as decoder\.layers\.0\.pre_mlp_layernorm\.weight"
    with pytest.raises(ValueError, match=message):
        load_model_weights(root, build(config, use_transformer_engine=False))
    with pytest.raises(ValueError, match=message):
        export_hf_checkpoint(root, out, hf_config=config)
