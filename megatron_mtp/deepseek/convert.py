"""Convert DeepSeek-V3 checkpoints: Hugging Face directory <-> Megatron-Core torch_dist, streaming.

Import reads the HF shards tensor by tensor (fp8 dequantized to bf16), maps them with
:mod:`megatron_mtp.deepseek.mapping` and saves them a group at a time (``group_bytes``; one group is written in the
background while the next is read, so about twice that is resident) into
``ROOT/iter_0000000`` plus the tracker file, the layout :mod:`megatron_mtp.training.checkpointing` loads. Keys,
global shapes and chunking come from the model's own ``sharded_state_dict`` at TP=PP=EP=1, built on the meta
device (no memory): torch_dist stores global tensors, so the checkpoint loads at any TP/PP/EP. The model is built
with the local spec, on any host: its checkpoint keys are TransformerEngine's (:mod:`megatron_mtp.checkpoint_names`),
so the checkpoint loads with either spec. The common state holds the HF ``config.json`` (``hf_config``) so export
needs nothing else, and the model signature the pretrain script's ``--load`` / ``--finetune`` checks.

Export loads the checkpoint a group at a time and streams bf16 safetensors shards (the router's expert bias stays
float32, as DeepSeek stores it) with an index, including the MTP layers' copies of ``embed_tokens`` and
``shared_head.head`` that vLLM and SGLang read.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_mtp import cpu_bridge
from megatron_mtp.checkpoint_names import absent_tensors_error, te_state_dict_names
from megatron_mtp.deepseek.hf_checkpoint import CheckpointError, HFCheckpointReader, mtp_layer_names
from megatron_mtp.deepseek.hf_config import load_hf_config
from megatron_mtp.deepseek.mapping import TensorMapping, mtp_shared_copies, tensor_mappings
from megatron_mtp.deepseek.safetensors_io import PlannedTensor, StreamingSafetensorsWriter
from megatron_mtp.deepseek.torch_dist_stream import StreamingDistCheckpointWriter, load_group
from megatron_mtp.deepseek.training import checkpoint_signature
from megatron_mtp.training.checkpointing import TRACKER_FILE, iteration_dir, latest_iteration
from megatron_mtp.training.process_groups import destroy_model_parallel, process_groups

HF_FLOAT32_SUFFIXES = ("e_score_correction_bias",)
"""HF tensors DeepSeek stores in float32; export writes every other floating tensor in bf16."""


@dataclasses.dataclass
class ImportReport:
    checkpoint_dir: str
    tensors: int
    input_bytes: int
    mtp_copy_max_difference: Dict[str, float]


def import_hf_checkpoint(
    hf_dir: str,
    output_root: str,
    group_bytes: int = 2**29,
    progress: bool = False,
    tqdm_factory: Optional[Callable] = None,
) -> ImportReport:
    """HF checkpoint directory -> torch_dist checkpoint ``output_root/iter_0000000`` (iteration 0).

    Raises :class:`CheckpointError` naming the tensor and file for a missing shard, a tensor missing from the index,
    a wrong shape, an fp8 tensor without its scale, MTP-layer tensors the config does not declare, or tensors left
    unused. A mismatched MTP copy of the embedding / output layer only warns (the main one is used).
    """
    reader = HFCheckpointReader(hf_dir)
    config = reader.config
    _check_mtp_layers_declared(reader)
    mappings = tensor_mappings(config)
    final = iteration_dir(output_root, 0)
    if os.path.exists(final):
        raise FileExistsError(f"{final} already exists")
    staging = final + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    with _single_process_world():
        model_state = _meta_sharded_state_dict(config)
        check_mapping_covers_model(mappings, model_state)
        try:
            with StreamingDistCheckpointWriter(staging) as writer:
                group, filled = {}, 0
                for mapping in _progress(mappings, progress, tqdm_factory, "import", "tensor"):
                    tensor = _read_megatron_tensor(reader, mapping, model_state[mapping.megatron_key])
                    group[mapping.megatron_key] = _with_data(model_state[mapping.megatron_key], tensor)
                    filled += tensor.numel() * tensor.element_size()
                    if filled >= group_bytes:
                        writer.save_group(group)
                        group, filled = {}, 0
                group.update({key: value for key, value in model_state.items() if isinstance(value, ShardedObject)})
                writer.save_group(group)
                differences = _check_mtp_copies(reader)
                leftovers = reader.unused()
                if leftovers:
                    raise CheckpointError(
                        f"{len(leftovers)} tensors of {hf_dir} were not used: "
                        + ", ".join(f"{name} ({reader.weight_map[name]})" for name in leftovers[:20])
                        + (" ..." if len(leftovers) > 20 else "")
                    )
                writer.finish(
                    dict(
                        iteration=0,
                        train_state=dict(consumed_samples=0),
                        hf_config=config,
                        signature=checkpoint_signature(config),
                    )
                )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    os.replace(staging, final)
    tracker = os.path.join(output_root, TRACKER_FILE)
    with open(tracker + ".tmp", "w") as f:
        f.write("0")
    os.replace(tracker + ".tmp", tracker)
    return ImportReport(final, len(reader.used), reader.total_bytes(), differences)


def export_hf_checkpoint(
    checkpoint_root: str,
    output_dir: str,
    max_shard_bytes: int = 5 * 2**30,
    group_bytes: int = 2**30,
    progress: bool = False,
    tqdm_factory: Optional[Callable] = None,
    hf_config: Optional[str] = None,
) -> List[str]:
    """torch_dist checkpoint (its latest iteration) -> HF safetensors shards + index + config.json.

    ``hf_config`` (a config.json path or dict) is needed when the checkpoint does not record one, i.e. when the
    pretrain script saved it rather than :func:`import_hf_checkpoint`. Returns the shard file names. The MTP layers'
    ``embed_tokens`` / ``shared_head.head`` copies are written.
    """
    directory = iteration_dir(checkpoint_root, latest_iteration(checkpoint_root))
    common = dist_checkpointing.load_common_state_dict(directory)
    config = load_hf_config(hf_config) if hf_config is not None else common.get("hf_config")
    if config is None:
        raise CheckpointError(f"{directory} records no HF config (the pretrain script saved it): give hf_config")
    mappings = tensor_mappings(config)
    copies_of: Dict[str, List[str]] = {}
    for copy_name, main_name in mtp_shared_copies(config).items():
        copies_of.setdefault(main_name, []).append(copy_name)
    with _single_process_world():
        model_state = _meta_sharded_state_dict(config)
        check_mapping_covers_model(mappings, model_state)
        _check_checkpoint_holds(mappings, model_state, directory)
        plan = _export_plan(mappings, model_state, copies_of)
        with StreamingSafetensorsWriter(output_dir, plan, max_shard_bytes) as hf_writer:
            for group in _progress(
                list(_groups(mappings, model_state, group_bytes)), progress, tqdm_factory, "export", "group"
            ):
                request = {m.megatron_key: _with_empty_data(model_state[m.megatron_key]) for m in group}
                load_group(request, directory)
                for mapping in group:
                    for name, tensor in zip(mapping.hf_keys, mapping.to_hf(request[mapping.megatron_key].data)):
                        tensor = tensor.to(_hf_dtype(name))
                        for written_name in [name, *copies_of.get(name, [])]:
                            hf_writer.add(written_name, tensor)
    hf_config = {key: value for key, value in config.items() if key != "quantization_config"}
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return sorted(name for name in os.listdir(output_dir) if name.endswith(".safetensors"))


# -- import helpers --------------------------------------------------------------------------------------------


def _check_mtp_layers_declared(reader: HFCheckpointReader) -> None:
    config = reader.config
    first_extra = config["num_hidden_layers"] + config.get("num_nextn_predict_layers", 0)
    undeclared = mtp_layer_names(reader.names(), first_extra)
    if undeclared:
        name = undeclared[0]
        if "num_nextn_predict_layers" not in config:
            why = "config.json has no num_nextn_predict_layers (DeepSeek-V3: 1)"
        else:
            why = f"config.json declares num_nextn_predict_layers={config['num_nextn_predict_layers']}"
        raise CheckpointError(
            f"{name} ({reader.weight_map[name]}) is a layer beyond num_hidden_layers={config['num_hidden_layers']}, "
            f"but {why}: set it to the number of MTP layers in the checkpoint"
        )


def _read_megatron_tensor(reader: HFCheckpointReader, mapping: TensorMapping, target) -> torch.Tensor:
    """The mapping's HF tensors, shape-checked against what the model expects, as the Megatron tensor."""
    megatron_shape = _full_shape(target)
    expected = [tuple(t.shape) for t in mapping.to_hf(torch.empty(megatron_shape, device="meta"))]
    tensors = [reader.get(name, shape) for name, shape in zip(mapping.hf_keys, expected)]
    return mapping.to_megatron(tensors).contiguous()


def _check_mtp_copies(reader: HFCheckpointReader) -> Dict[str, float]:
    """Compare the MTP layers' embed_tokens / shared_head.head with the main tensors; warn if they differ."""
    differences = {}
    for copy_name, main_name in mtp_shared_copies(reader.config).items():
        if copy_name not in reader:
            continue
        differences[copy_name] = reader.max_abs_difference(copy_name, main_name)
        reader.mark_used(copy_name)
        if differences[copy_name] != 0:
            warnings.warn(
                f"{copy_name} ({reader.weight_map[copy_name]}) differs from {main_name} by up to "
                f"{differences[copy_name]:.6g}; the MTP layer uses {main_name}"
            )
    return differences


def check_mapping_covers_model(mappings: List[TensorMapping], model_state: Dict) -> None:
    """Raise unless ``mappings`` name every tensor of ``model_state`` (from :func:`te_named_sharded_state_dict`)
    and nothing else."""
    tensors = {key for key, value in model_state.items() if not isinstance(value, ShardedObject)}
    mapped = {m.megatron_key for m in mappings}
    if tensors != mapped:
        raise ValueError(
            "the HF mapping and the model disagree: unmapped model tensors "
            f"{sorted(tensors - mapped)[:5]}, mapped tensors absent from the model {sorted(mapped - tensors)[:5]}"
        )


def _check_checkpoint_holds(mappings: List[TensorMapping], model_state: Dict, directory: str) -> None:
    stored = dist_checkpointing.load_tensors_metadata(directory)
    absent = {model_state[m.megatron_key].key for m in mappings} - set(stored)
    if absent:
        raise absent_tensors_error(directory, absent, stored)


# -- sharded state dict helpers ---------------------------------------------------------------------------------


def _meta_sharded_state_dict(config: dict) -> Dict:
    """The TP=PP=EP=1 local-spec model's :func:`te_named_sharded_state_dict`, on the meta device (shapes only)."""
    from megatron_mtp.deepseek.model import build_model

    with torch.device("meta"):
        model = build_model(config, use_transformer_engine=False, use_cpu_initialization=True)
    return te_named_sharded_state_dict(model)


def te_named_sharded_state_dict(model: torch.nn.Module) -> Dict:
    """A TP=PP=EP=1 model's flat sharded state dict keyed by TE-spec state-dict names, the names
    :mod:`megatron_mtp.deepseek.mapping` uses, whichever spec built ``model``."""
    state = model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group({}))
    for key, value in state.items():
        if isinstance(value, ShardedObject) and torch.is_tensor(value.data):
            raise NotImplementedError(f"{key}: tensor-valued extra state cannot be converted")
    names = te_state_dict_names(model, state)
    return {names[key]: value for key, value in state.items()}


def _full_shape(target) -> torch.Size:
    if isinstance(target, (ShardedTensor, ShardedTensorFactory)):
        return target.data.shape
    raise TypeError(f"unexpected sharded value {type(target).__name__}")


def _with_data(target, tensor: torch.Tensor):
    if tensor.shape != target.data.shape:
        raise CheckpointError(
            f"{target.key}: got shape {tuple(tensor.shape)}, the model has {tuple(target.data.shape)}"
        )
    if isinstance(target, ShardedTensor):
        return dataclasses.replace(target, data=tensor, dtype=tensor.dtype)
    return dataclasses.replace(target, data=tensor)


def _with_empty_data(target):
    """The sharded value with a real buffer to load into, in the dtype the checkpoint stores."""
    return _with_data(target, torch.empty(target.data.shape, dtype=torch.float32))


def _groups(mappings: List[TensorMapping], model_state: Dict, group_bytes: int) -> Iterator[List[TensorMapping]]:
    group, filled = [], 0
    for mapping in mappings:
        group.append(mapping)
        filled += _full_shape(model_state[mapping.megatron_key]).numel() * 4
        if filled >= group_bytes:
            yield group
            group, filled = [], 0
    if group:
        yield group


def _hf_dtype(name: str) -> torch.dtype:
    return torch.float32 if name.endswith(HF_FLOAT32_SUFFIXES) else torch.bfloat16


def _export_plan(
    mappings: List[TensorMapping], model_state: Dict, copies_of: Dict[str, List[str]]
) -> List[PlannedTensor]:
    """Every HF tensor export writes, in writing order (MTP copies right after their main tensor)."""
    plan = []
    for mapping in mappings:
        shapes = [
            t.shape for t in mapping.to_hf(torch.empty(_full_shape(model_state[mapping.megatron_key]), device="meta"))
        ]
        for name, shape in zip(mapping.hf_keys, shapes):
            for written_name in [name, *copies_of.get(name, [])]:
                plan.append(PlannedTensor(written_name, tuple(shape), _hf_dtype(name)))
    return plan


@contextlib.contextmanager
def _single_process_world():
    """Megatron parallel state for one process (TP=PP=EP=1), creating a gloo world if there is none."""
    if not torch.cuda.is_available():
        cpu_bridge.enable()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in one process; this world has several")
    had_model_parallel = parallel_state.model_parallel_is_initialized()
    if not had_model_parallel:
        groups_before = process_groups()
        parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        if not had_model_parallel:
            destroy_model_parallel(keep=groups_before)
        if created:
            dist.destroy_process_group()


def _progress(items, enabled: bool, tqdm_factory, description: str, unit: str):
    if not enabled:
        return items
    if tqdm_factory is None:
        from tqdm import tqdm as tqdm_factory
    return tqdm_factory(items, desc=description, unit=unit)
