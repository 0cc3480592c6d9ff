"""Hugging Face checkpoint directories: read tensor by tensor (fp8 dequantized), account for use, write sharded.

Reading: ``config.json``, ``model.safetensors.index.json`` (or a single ``model.safetensors``) and the shards it
names, read a tensor at a time with plain file reads (:mod:`megatron_mtp.deepseek.safetensors_io`; no memory map,
so resident memory is only the tensors in use). FP8 e4m3 weights
carry a float32 ``<name>_scale_inv`` of shape ``[ceil(out/128), ceil(in/128)]``, one scale per 128x128 block (edge
blocks partial); :meth:`HFCheckpointReader.get` returns ``float(Wq) * S[i // 128, j // 128]`` in bf16 and counts
the scale as used. Every tensor must be used exactly once; :meth:`HFCheckpointReader.unused` lists the rest.
"""

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from megatron_mtp.deepseek.safetensors_io import TensorLocation, read_header, read_tensor

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

    The product is taken in float32 and rounded once. Whole-tensor ops (the scales expanded to ``[out, in]``):
    transiently 8 bytes per element, and ~10x faster on CPU than looping over block rows.
    """
    block_rows, block_cols = block
    rows, cols = quantized.shape
    scales = scale_inv.float().repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    return (quantized.float() * scales).to(out_dtype)


class HFCheckpointReader:
    """A Hugging Face checkpoint directory, read tensor by tensor.

    Raises :class:`CheckpointError` on construction for an unreadable index, a missing shard or a tensor the index
    places in a shard that does not hold it, and from :meth:`get` for a tensor the index lacks, a wrong shape, or an
    fp8 tensor without its scale.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.config = _read_json(os.path.join(directory, "config.json"), "config.json")
        self.weight_map = self._read_weight_map()
        self.used: Set[str] = set()
        self._locations: Dict[str, TensorLocation] = {}
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
            return {name: SINGLE_FILE for name in read_header(single)}
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
            locations = read_header(path)
            self._locations.update({name: locations[name] for name in names if name in locations})
            absent = [name for name in names if name not in locations]
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

    # -- tensors ---------------------------------------------------------------------------------------------

    def shape(self, name: str) -> List[int]:
        self.shard_of(name)
        return list(self._locations[name].shape)

    def _read(self, name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return read_tensor(os.path.join(self.directory, self.shard_of(name)), self._locations[name], rows)

    def _load(self, name: str) -> torch.Tensor:
        shard = self.shard_of(name)
        if name in self.used:
            raise CheckpointError(f"{name} (in {shard}) is read twice: each tensor maps to exactly one place")
        tensor = self._read(name)
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
        largest = 0.0
        for start in range(0, self.shape(name)[0], rows_per_step):
            a = self._read(name, (start, start + rows_per_step)).float()
            b = self._read(reference, (start, start + rows_per_step)).float()
            largest = max(largest, (a - b).abs().max().item() if a.numel() else 0.0)
        return largest

    def unused(self) -> List[str]:
        return sorted(set(self.weight_map) - self.used)

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.directory, shard)) for shard in set(self.weight_map.values()))


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
