"""Write and read a Megatron-Core torch_dist checkpoint a group of tensors at a time, never the whole model.

A group is a piece of a model's sharded state dict (ShardedTensors, factories, ShardedObjects) holding real data.
Each is saved with ``torch.distributed.checkpoint`` into a scratch directory, every ShardedTensor as one chunk of its
global tensor (Megatron's own save cannot do this in one process: it expects each process to hold all of its
chunks). Its ``.distcp`` files move into the checkpoint under new names and its DCP metadata is merged into one
``.metadata`` (a pickled ``torch.distributed.checkpoint.metadata.Metadata``): ``state_dict_metadata`` lists every chunk
of every global tensor (an expert's slice of a ``[num_experts, ...]`` tensor is one chunk, so a layer's experts
can span groups) and ``storage_data`` points each chunk at its file. A final Megatron-Core save of the non-tensor
state adds ``metadata.json`` and the common state, in whichever form the installed release writes it.
:meth:`StreamingDistCheckpointWriter.finish` refuses to write ``.metadata`` unless the chunks of every tensor cover
it exactly.

:func:`load_group` reads a piece of a sharded state dict the same way, chunk by chunk (Megatron's own load, too,
expects each process to ask for whole grids of chunks).
"""

import math
import os
import pickle
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner, mcore_to_pyt_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megatron_mtp.compat import save_torch_dist

DCP_METADATA = ".metadata"


class StreamingDistCheckpointWriter:
    """``save_group(sharded_state_dict)`` repeatedly, then ``finish(common_state)``. Single process.

    A group is written in a background thread while the caller prepares the next one (disk and CPU overlap), so
    two groups may be in memory at once. Use as a context manager: leaving it waits for the write in flight.
    """

    def __init__(self, directory: str):
        if os.path.exists(directory) and os.listdir(directory):
            raise FileExistsError(f"{directory} exists and is not empty")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.groups = 0
        self.state_dict_metadata: Dict[str, Any] = {}
        self.storage_data: Dict[Any, Any] = {}
        self.planner_data: Dict[str, Any] = {}
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._in_flight: Optional[Future] = None

    def save_group(self, sharded_state_dict: Dict[str, Any]) -> None:
        """Save ShardedTensors (or factories) whose chunks no earlier group saved; returns once the previous
        group is on disk and this one is being written."""
        state = _dcp_state_dict(sharded_state_dict)
        self.wait()
        self._in_flight = self._executor.submit(self._write_group, state)

    def wait(self) -> None:
        """Block until the group in flight is written (raising its error, if any)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def __enter__(self) -> "StreamingDistCheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._in_flight is not None:
                self._in_flight.exception()  # let it finish; the caller's error is the one to report
        finally:
            self._executor.shutdown()

    def _write_group(self, state: Dict[str, Any]) -> None:
        scratch = os.path.join(self.directory, f".group_{self.groups:06d}")
        os.makedirs(scratch)
        metadata = dcp.save(
            state,
            storage_writer=dcp.FileSystemWriter(scratch, thread_count=1),
            planner=_ChunkSavePlanner(flatten_state_dict=False, can_run_decentralized_global_plan=False),
            no_dist=True,
        )
        self._take_over(scratch, metadata)
        shutil.rmtree(scratch)

    def _take_over(self, scratch: str, metadata: Metadata) -> None:
        """Move the ``.distcp`` files of a save into ``scratch`` into the checkpoint, merging their metadata."""
        renamed = {}
        for file_name in sorted(os.listdir(scratch)):
            if file_name.endswith(".distcp"):
                renamed[file_name] = f"__{self.groups}_{len(renamed)}.distcp"
                os.replace(os.path.join(scratch, file_name), os.path.join(self.directory, renamed[file_name]))
        for index, info in metadata.storage_data.items():
            info.relative_path = renamed[info.relative_path]
            self.storage_data[index] = info
        for key, entry in metadata.state_dict_metadata.items():
            self._merge_entry(key, entry)
        self.planner_data.update(metadata.planner_data or {})
        self.groups += 1

    def _merge_entry(self, key: str, entry) -> None:
        known = self.state_dict_metadata.get(key)
        if known is None:
            self.state_dict_metadata[key] = entry
            return
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(known, TensorStorageMetadata):
            raise ValueError(f"{key} saved twice")
        if known.size != entry.size or known.properties.dtype != entry.properties.dtype:
            raise ValueError(
                f"{key}: groups disagree on the global tensor ({known.size} {known.properties.dtype} vs "
                f"{entry.size} {entry.properties.dtype})"
            )
        offsets = {tuple(chunk.offsets) for chunk in known.chunks}
        for chunk in entry.chunks:
            if tuple(chunk.offsets) in offsets:
                raise ValueError(f"{key}: the chunk at offset {tuple(chunk.offsets)} was saved twice")
            known.chunks.append(chunk)

    def finish(self, common_state: Dict[str, Any]) -> None:
        """Check coverage, write the common state and ``metadata.json``, then the merged ``.metadata``."""
        self.wait()
        for key, entry in self.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                continue
            covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
            if covered != math.prod(entry.size):
                raise ValueError(f"{key}: saved chunks cover {covered} of {math.prod(entry.size)} elements")
        scratch = os.path.join(self.directory, ".common")
        os.makedirs(scratch)
        # Megatron-Core 0.17+ keeps the common state as a "common_state" object in the
        # torch.distributed.checkpoint files, and save_torch_dist adds the common.pt 0.16 reads: keep all of it.
        save_torch_dist(dict(common_state), scratch)
        self._take_over(scratch, dcp.FileSystemReader(scratch).read_metadata())
        for file_name in os.listdir(scratch):
            if file_name != DCP_METADATA:
                os.replace(os.path.join(scratch, file_name), os.path.join(self.directory, file_name))
        shutil.rmtree(scratch)
        metadata = Metadata(
            state_dict_metadata=self.state_dict_metadata,
            planner_data=self.planner_data,
            storage_data=self.storage_data,
        )
        temporary = os.path.join(self.directory, DCP_METADATA + ".tmp")
        with open(temporary, "wb") as f:
            pickle.dump(metadata, f)
        os.replace(temporary, os.path.join(self.directory, DCP_METADATA))


def load_group(sharded_state_dict: Dict[str, Any], directory: str) -> None:
    """Fill the data of the ShardedTensors (and factories) in ``sharded_state_dict`` from the checkpoint."""
    state = _dcp_state_dict(sharded_state_dict)
    if any(not isinstance(value, _Chunks) for value in state.values()):
        raise ValueError("load_group reads tensors only")
    dcp.load(
        state,
        storage_reader=dcp.FileSystemReader(directory),
        planner=_ChunkLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
        no_dist=True,
    )


def _dcp_state_dict(sharded_state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``{global key: _Chunks}`` for the ShardedTensors, ``{unique key: BytesIO}`` (Megatron's encoding) for the
    ShardedObjects. Factories (e.g. SwiGLU's fused fc1) are built first, as Megatron's save does."""
    sharded_state_dict = dict(sharded_state_dict)
    apply_factories(sharded_state_dict)
    chunks: Dict[str, _Chunks] = {}
    objects: Dict[str, List[ShardedObject]] = {}
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensor):
            if value.flattened_range is not None:
                raise ValueError(f"{value.key}: flattened (distributed-optimizer) tensors are not supported here")
            chunks.setdefault(value.key, _Chunks(value.global_shape)).add(value)
        elif isinstance(value, ShardedObject):
            objects.setdefault(value.unique_key, []).append(value)
        else:
            raise TypeError(f"only sharded values can be streamed, got {type(value).__name__}")
    return {**chunks, **mcore_to_pyt_state_dict(objects)}


class _Chunks:
    """Chunks of one global tensor, presented to ``torch.distributed.checkpoint`` as its write items."""

    def __init__(self, global_shape: Tuple[int, ...]):
        self.global_shape = torch.Size(global_shape)
        self.by_offset: Dict[torch.Size, torch.Tensor] = {}

    def add(self, sharded: ShardedTensor) -> None:
        if torch.Size(sharded.global_shape) != self.global_shape:
            raise ValueError(f"{sharded.key}: global shapes {tuple(self.global_shape)} and {sharded.global_shape}")
        if not sharded.data.is_contiguous():  # a copy would not receive loaded data
            raise ValueError(f"{sharded.key}: chunk data must be contiguous")
        view = sharded.data.view((1,) * sharded.prepend_axis_num + tuple(sharded.local_shape))
        self.by_offset[torch.Size(sharded.global_offset)] = view

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offset, sizes=tensor.shape) for offset, tensor in self.by_offset.items()]

    def __create_write_items__(self, fqn: str, _object) -> List[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, offset),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offset, sizes=tensor.shape),
                    properties=TensorProperties.create_from_tensor(tensor),
                    size=self.global_shape,
                ),
            )
            for offset, tensor in self.by_offset.items()
        ]


class _ChunkSavePlanner(MCoreSavePlanner):
    """Megatron's save planner (ShardedObjects arrive serialized) that also resolves :class:`_Chunks`."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        value = self.state_dict[index.fqn]
        if isinstance(value, _Chunks):
            return value.by_offset[index.offset]
        return super().lookup_object(index)


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Loads into :class:`_Chunks`, whose tensors are views of the caller's buffers."""

    def set_up_planner(self, state_dict, metadata: Metadata = None, is_coordinator: bool = False) -> None:
        # The default set-up walks the state dict and replaces values of types it does not know (ours) with None.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        value = self.state_dict[index.fqn]
        if isinstance(value, _Chunks):
            return value.by_offset[index.offset]
        return super().lookup_tensor(index)
