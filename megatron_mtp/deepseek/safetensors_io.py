"""The safetensors file format, read and written a tensor at a time with plain file I/O.

A file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}`` (offsets relative to the data that follows it) and the tensors' bytes, in
order, without gaps. Reading a tensor with ``readinto`` instead of a memory map keeps the process's resident memory
to the tensors it holds (the page cache is not counted), which is what bounds a converter's peak RSS; writing from a
known plan puts each header first, so a tensor goes to disk as soon as it exists.
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsFormatError(ValueError):
    """A file that is not valid safetensors; the message names the file (and the tensor)."""


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in its file (absolute offsets)."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int


def read_header(path: str) -> Dict[str, TensorLocation]:
    """The tensors of a safetensors file, by name."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SafetensorsFormatError(f"{path}: unreadable safetensors header ({error})") from error
    file_size = os.path.getsize(path)
    locations = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise SafetensorsFormatError(f"{name} in {path} has unsupported dtype {info.get('dtype')!r}")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = (8 + length + offset for offset in info["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > file_size:
            raise SafetensorsFormatError(f"{name} in {path}: data_offsets do not fit shape {list(shape)} {dtype}")
        locations[name] = TensorLocation(dtype, shape, begin, end)
    return locations


def read_tensor(path: str, location: TensorLocation, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The tensor at ``location`` of ``path``, or only its rows ``[start, stop)`` of dim 0."""
    begin, end, shape = location.begin, location.end, location.shape
    if rows is not None:
        start, stop = max(0, rows[0]), min(rows[1], shape[0])
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        begin, end, shape = begin + start * row_bytes, begin + max(stop, start) * row_bytes, (max(stop - start, 0),)
        shape += location.shape[1:]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(begin)
        filled = 0
        while filled < len(view):  # one read() returns at most ~2 GiB on Linux
            count = f.readinto(view[filled:])
            if not count:
                raise SafetensorsFormatError(f"{path} is truncated (ends before byte {end})")
            filled += count
    return buffer.view(location.dtype).reshape(shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class StreamingSafetensorsWriter:
    """Write the tensors of ``plan``, in plan order, into ``model-0000k-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own) and ``model.safetensors.index.json``.

    Holds no tensor: each :meth:`add` goes straight to disk. A tensor out of order, of another shape or dtype, or
    missing at :meth:`close` is an error.
    """

    def __init__(self, directory: str, plan: Sequence[PlannedTensor], max_shard_bytes: int = 5 * 2**30):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [item.name for item in plan]
        if len(set(names)) != len(names):
            raise ValueError("the plan names a tensor twice")
        self.directory = directory
        self.shards: List[List[PlannedTensor]] = _split(plan, max_shard_bytes)
        self.files = [f"model-{k + 1:05d}-of-{len(self.shards):05d}.safetensors" for k in range(len(self.shards))]
        self._shard, self._item, self._file = 0, 0, None
        os.makedirs(directory, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._shard >= len(self.shards):
            raise ValueError(f"{name}: every planned tensor was already written")
        expected = self.shards[self._shard][self._item]
        if name != expected.name:
            raise ValueError(f"expected {expected.name} next, got {name}")
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(
                f"{name}: planned {list(expected.shape)} {expected.dtype}, got {list(tensor.shape)} {tensor.dtype}"
            )
        if self._item == 0:
            self._file = open(os.path.join(self.directory, self.files[self._shard]), "wb")
            self._file.write(_header(self.shards[self._shard]))
        self._file.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._item += 1
        if self._item == len(self.shards[self._shard]):
            self._file.close()
            self._shard, self._item, self._file = self._shard + 1, 0, None

    def close(self) -> List[str]:
        """Write the index. Returns the shard file names."""
        if self._shard < len(self.shards):
            missing = self.shards[self._shard][self._item].name
            raise ValueError(f"{missing} and the tensors after it were never written")
        weight_map = {item.name: file for file, shard in zip(self.files, self.shards) for item in shard}
        total = sum(item.nbytes for shard in self.shards for item in shard)
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        return list(self.files)

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._file is not None:
            self._file.close()
        if exc_type is None:
            self.close()


def _split(plan: Sequence[PlannedTensor], max_shard_bytes: int) -> List[List[PlannedTensor]]:
    shards: List[List[PlannedTensor]] = []
    filled = 0
    for item in plan:
        if not shards or (shards[-1] and filled + item.nbytes > max_shard_bytes):
            shards.append([])
            filled = 0
        shards[-1].append(item)
        filled += item.nbytes
    return shards


def _header(shard: Sequence[PlannedTensor]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for item in shard:
        header[item.name] = {
            "dtype": DTYPE_NAMES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded
