"""Hugging Face checkpoint directories: read tensor by tensor (fp8 dequantized), account for use, write sharded.

Reading: ``config.json``, ``model.safetensors.index.json`` (or a single ``model.safetensors``) and the shards it
names, opened lazily with ``safetensors.safe_open``; at most a few shards are mapped at once. FP8 e4m3 weights
carry a float32 ``<name>_scale_inv`` of shape ``[ceil(out/128), ceil(in/128)]``, one scale per 128x128 block (edge
blocks partial); :meth:`HFCheckpointReader.get` returns ``float(Wq) * S[i // 128, j // 128]`` in bf16 and counts
the scale as used. Every tensor must be used exactly once; :meth:`HFCheckpointReader.unused` lists the rest.

Writing: :class:`ShardedSafetensorsWriter` buffers tensors up to a shard-size limit, writes
``model-0000k-of-0000n.safetensors`` files and ``model.safetensors.index.json``.
"""

import json
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Set

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)


class CheckpointError(ValueError):
    """The checkpoint on disk is incomplete or inconsistent; the message names the tensor and the file."""


def dequantize_fp8_blockwise(
    quantized: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int] = (128, 128), out_dtype=torch.bfloat16
) -> torch.Tensor:
    """``[out, in]`` fp8 weight times its ``[ceil(out/bo), ceil(in/bi)]`` block scales -> ``[out, in]`` out_dtype.

    Works a row block at a time so the float32 intermediate stays one block row (bo x in) large.
    """
    block_rows, block_cols = block
    rows, cols = quantized.shape
    result = torch.empty(rows, cols, dtype=out_dtype)
    column_scale_index = torch.arange(cols) // block_cols
    for block_row, start in enumerate(range(0, rows, block_rows)):
        stop = min(start + block_rows, rows)
        scales = scale_inv[block_row].float()[column_scale_index]  # [in]
        result[start:stop] = (quantized[start:stop].float() * scales).to(out_dtype)
    return result


class HFCheckpointReader:
    """A Hugging Face checkpoint directory, read tensor by tensor.

    Raises :class:`CheckpointError` on construction for an unreadable index, a missing shard or a tensor the index
    places in a shard that does not hold it, and from :meth:`get` for a tensor the index lacks, a wrong shape, or an
    fp8 tensor without its scale.
    """

    def __init__(self, directory: str, max_open_shards: int = 2):
        self.directory = directory
        self.config = _read_json(os.path.join(directory, "config.json"), "config.json")
        self.weight_map = self._read_weight_map()
        self.used: Set[str] = set()
        self._open: "OrderedDict[str, object]" = OrderedDict()
        self._max_open_shards = max_open_shards
        block = (self.config.get("quantization_config") or {}).get("weight_block_size", [128, 128])
        self.block = tuple(block)
        self._check_shards()

    # -- index -----------------------------------------------------------------------------------------------

    def _read_weight_map(self) -> Dict[str, str]:
        index_path = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index_path):
            index = _read_json(index_path, INDEX_FILE)
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            return dict(index["weight_map"])
        single = os.path.join(self.directory, SINGLE_FILE)
        if os.path.isfile(single):
            with safe_open(single, framework="pt") as handle:
                return {name: SINGLE_FILE for name in handle.keys()}
        raise CheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    def _check_shards(self) -> None:
        """Every shard the index names exists and holds the tensors the index places in it."""
        by_shard: Dict[str, List[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            path = os.path.join(self.directory, shard)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"missing shard {path}: {INDEX_FILE} places {len(names)} tensors there, e.g. {names[0]}"
                )
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
            absent = [name for name in names if name not in present]
            if absent:
                raise CheckpointError(
                    f"{absent[0]} is listed in {INDEX_FILE} under {shard}, but {shard} does not hold it"
                    + (f" (nor {len(absent) - 1} more)" if len(absent) > 1 else "")
                )

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> List[str]:
        return list(self.weight_map)

    def shard_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise CheckpointError(
                f"{name} is missing from {os.path.join(self.directory, INDEX_FILE)} (the model needs it)"
            )
        return self.weight_map[name]

    def _handle(self, shard: str):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if len(self._open) >= self._max_open_shards:  # unmap the least recently used shard: bounded RSS
            self._open.popitem(last=False)
        handle = safe_open(os.path.join(self.directory, shard), framework="pt")
        self._open[shard] = handle
        return handle

    def close(self) -> None:
        self._open.clear()

    # -- tensors ---------------------------------------------------------------------------------------------

    def shape(self, name: str) -> List[int]:
        return list(self._handle(self.shard_of(name)).get_slice(name).get_shape())

    def _load(self, name: str) -> torch.Tensor:
        shard = self.shard_of(name)
        if name in self.used:
            raise CheckpointError(f"{name} (in {shard}) is read twice: each tensor maps to exactly one place")
        tensor = self._handle(shard).get_tensor(name)
        self.used.add(name)
        return tensor

    def get(self, name: str, expected_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The tensor ``name``, fp8 dequantized to bf16, checked against ``expected_shape`` when given."""
        shard = self.shard_of(name)
        if expected_shape is not None and self.shape(name) != list(expected_shape):
            raise CheckpointError(
                f"{name} in {shard} has shape {self.shape(name)}, but config.json implies {list(expected_shape)}"
            )
        tensor = self._load(name)
        if tensor.dtype in FP8_DTYPES:
            return self._dequantize(name, shard, tensor)
        if name + SCALE_SUFFIX in self.weight_map:
            raise CheckpointError(
                f"{name} in {shard} is {tensor.dtype}, yet {name + SCALE_SUFFIX} exists: only fp8 tensors have a scale"
            )
        return tensor

    def _dequantize(self, name: str, shard: str, quantized: torch.Tensor) -> torch.Tensor:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.weight_map:
            raise CheckpointError(f"{name} in {shard} is fp8 but {scale_name} is missing from {INDEX_FILE}")
        if quantized.dim() != 2:
            raise CheckpointError(f"{name} in {shard} is fp8 with shape {list(quantized.shape)}; expected 2-D")
        expected = [math.ceil(size / block) for size, block in zip(quantized.shape, self.block)]
        if self.shape(scale_name) != expected:
            raise CheckpointError(
                f"{scale_name} in {self.weight_map[scale_name]} has shape {self.shape(scale_name)}, but {name} "
                f"{list(quantized.shape)} in blocks of {list(self.block)} needs {expected}"
            )
        return dequantize_fp8_blockwise(quantized, self._load(scale_name), self.block)

    def mark_used(self, name: str) -> None:
        """Account for a tensor consumed without :meth:`get` (e.g. compared slice by slice)."""
        self.shard_of(name)
        if name in self.used:
            raise CheckpointError(f"{name} is read twice: each tensor maps to exactly one place")
        self.used.add(name)

    def max_abs_difference(self, name: str, reference: str, rows_per_step: int = 4096) -> float:
        """max |name - reference| over the whole tensor, read a block of rows at a time (both may be huge)."""
        if self.shape(name) != self.shape(reference):
            raise CheckpointError(f"{name} has shape {self.shape(name)} but {reference} has {self.shape(reference)}")
        first = self._handle(self.shard_of(name)).get_slice(name)
        second_handle = self._handle(self.shard_of(reference))
        second = second_handle.get_slice(reference)
        largest = 0.0
        for start in range(0, self.shape(name)[0], rows_per_step):
            a = first[start : start + rows_per_step].float()
            b = second[start : start + rows_per_step].float()
            largest = max(largest, (a - b).abs().max().item() if a.numel() else 0.0)
        return largest

    def unused(self) -> List[str]:
        return sorted(set(self.weight_map) - self.used)

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.directory, shard)) for shard in set(self.weight_map.values()))


class ShardedSafetensorsWriter:
    """Write tensors into ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` (a single
    larger tensor gets a shard of its own), plus ``model.safetensors.index.json``. Use as a context manager."""

    def __init__(self, directory: str, max_shard_bytes: int = 5 * 2**30):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_storages: Set[int] = set()
        self._pending_bytes = 0
        self._names: Set[str] = set()
        self._written: List[List[str]] = []  # tensor names per shard, in order
        self._total_bytes = 0
        os.makedirs(directory, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"{name} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage()
        if storage.nbytes() != size or storage.data_ptr() in self._pending_storages:
            tensor = tensor.clone()  # safetensors refuses views and tensors sharing memory
        self._pending_storages.add(tensor.untyped_storage().data_ptr())
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        number = len(self._written)
        save_file(self._pending, os.path.join(self.directory, _temporary_shard_name(number)), metadata={"format": "pt"})
        self._written.append(list(self._pending))
        self._pending, self._pending_storages, self._pending_bytes = {}, set(), 0

    def close(self) -> List[str]:
        """Write the last shard, name the shards ``-of-n`` and write the index. Returns the shard file names."""
        if self._pending:
            self._flush()
        count = len(self._written)
        weight_map, files = {}, []
        for number, names in enumerate(self._written):
            final = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, _temporary_shard_name(number)), os.path.join(self.directory, final))
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        return files

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()


def _temporary_shard_name(number: int) -> str:
    return f"partial-{number:05d}.safetensors"


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def mtp_layer_names(names: Iterable[str], first_mtp_layer: int) -> List[str]:
    """The tensors of ``model.layers.{i}`` for i >= ``first_mtp_layer`` (num_hidden_layers)."""
    found = []
    for name in names:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            if int(parts[2]) >= first_mtp_layer:
                found.append(name)
    return found
