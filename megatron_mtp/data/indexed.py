"""Megatron indexed datasets on disk (``PREFIX.bin`` token ids + ``PREFIX.idx`` index): write them, check them.

One document is one sequence. The files are written by Megatron-Core's ``IndexedDatasetBuilder`` under
temporary names and renamed at the end, ``.bin`` first and ``.idx`` last, so a crash never leaves a
half-written dataset under the final names, and an ``.idx`` under the final name means its ``.bin`` is complete.
"""

import json
import os
import struct
import sys
import uuid
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

import numpy
from tqdm import tqdm

from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

INPUT_SUFFIXES = (".txt", ".jsonl")
# .idx layout: header (9 bytes), version (<Q), dtype code (<B), sequence count (<Q), document count (<Q),
# then int32 sequence lengths, int64 sequence byte offsets, int64 document boundaries.
_IDX_PREAMBLE = struct.Struct("<9sQBQQ")


class IndexedDatasetInfo(NamedTuple):
    """What ``check_indexed_dataset`` read from a valid ``.idx``."""

    sequences: int
    """Core splits GPT data into train/valid/test by sequence; our writer stores one per document."""
    tokens: int
    dtype: type


class IndexedDatasetWriter:
    """Tokenize documents into ``PREFIX.bin``/``PREFIX.idx``; use as a context manager.

    The files appear under their final names only when the ``with`` block ends without an exception.
    Documents that tokenize to nothing (empty text without eod) are skipped and counted.
    """

    def __init__(self, output_prefix: str, tokenizer, append_eod: bool = True) -> None:
        self.output_prefix = output_prefix
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.dtype = DType.optimal_dtype(tokenizer.vocab_size)
        self.documents = 0
        self.tokens = 0
        self.skipped_empty_documents = 0
        self._temp_prefix = f"{output_prefix}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"

    def __enter__(self) -> "IndexedDatasetWriter":
        os.makedirs(os.path.dirname(os.path.abspath(self.output_prefix)), exist_ok=True)
        self._builder = IndexedDatasetBuilder(get_bin_path(self._temp_prefix), dtype=self.dtype)
        return self

    def add_document(self, text: str) -> None:
        ids = self.tokenizer.tokenize(text)
        if self.append_eod:
            ids = list(ids) + [self.tokenizer.eod]
        if len(ids) == 0:
            self.skipped_empty_documents += 1
            return
        self._builder.add_document(numpy.asarray(ids, dtype=self.dtype), [len(ids)])
        self.documents += 1
        self.tokens += len(ids)

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        temp_bin, temp_idx = get_bin_path(self._temp_prefix), get_idx_path(self._temp_prefix)
        try:
            self._builder.finalize(temp_idx)  # closes the .bin, writes the .idx
            if exc_type is None:
                if self.documents == 0:
                    raise ValueError(f"no document with any token to write to {self.output_prefix}.bin/.idx")
                os.replace(temp_bin, get_bin_path(self.output_prefix))
                os.replace(temp_idx, get_idx_path(self.output_prefix))
        finally:
            for path in (temp_bin, temp_idx):
                if os.path.exists(path):
                    os.remove(path)

    def counts(self) -> Dict[str, int]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "skipped_empty_documents": self.skipped_empty_documents,
        }


def find_input_files(paths: Sequence[str]) -> List[str]:
    """Files as given; each directory becomes all ``*.txt``/``*.jsonl`` below it, recursively, sorted."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(INPUT_SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(f"--input directory {path} has no *.txt or *.jsonl file")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {path}: no such file or directory")
    return files


def read_documents(path: str, json_key: str = "text") -> Iterator[Tuple[str, int]]:
    """Yield ``(document text, byte offset in the file just past it)``: a ``.txt`` is one document, a
    ``.jsonl`` one per line.

    Raises:
        ValueError: an unsupported suffix, invalid UTF-8, or a ``.jsonl`` line that is not a JSON object
            with a string under ``json_key`` (the message gives ``file:line``). Blank lines are skipped.
    """
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            raw = f.read()
        yield _decode(raw, path), len(raw)
    elif path.endswith(".jsonl"):
        offset = 0
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                offset += len(raw)
                if raw.strip():
                    yield _jsonl_text(raw, json_key, f"{path}:{line_number}"), offset
    else:
        raise ValueError(f"{path}: unsupported input file type; expected one of {', '.join(INPUT_SUFFIXES)}")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not valid UTF-8 ({error})") from None


def _jsonl_text(raw: bytes, json_key: str, where: str) -> str:
    try:
        record = json.loads(_decode(raw, where))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error})") from None
    if not isinstance(record, dict):
        problem = f"got a JSON {type(record).__name__}"
    elif json_key not in record:
        problem = f"the object has no {json_key!r} (keys: {', '.join(sorted(record))})"
    elif not isinstance(record[json_key], str):
        problem = f"{json_key!r} holds a {type(record[json_key]).__name__}"
    else:
        return record[json_key]
    raise ValueError(f"{where}: expected a JSON object with a string under {json_key!r} (--json-key); {problem}")


def write_indexed_dataset(
    input_paths: Sequence[str],
    output_prefix: str,
    tokenizer,
    json_key: str = "text",
    append_eod: bool = True,
    show_progress: bool = True,
) -> Dict[str, int]:
    """Tokenize ``.txt``/``.jsonl`` files into ``output_prefix.bin``/``.idx``, in the order given.

    Returns:
        ``{"files", "documents", "tokens", "skipped_empty_documents"}``; ``tokens`` counts the eods.
    """
    unsupported = [path for path in input_paths if not path.endswith(INPUT_SUFFIXES)]
    if unsupported:
        raise ValueError(f"unsupported input file type (expected {', '.join(INPUT_SUFFIXES)}): {', '.join(unsupported)}")
    total_bytes = sum(os.path.getsize(path) for path in input_paths)
    with IndexedDatasetWriter(output_prefix, tokenizer, append_eod) as writer, tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr, disable=not show_progress
    ) as progress:
        for path in input_paths:
            done = 0
            for text, offset in read_documents(path, json_key):
                writer.add_document(text)
                progress.update(offset - done)
                done = offset
            progress.update(os.path.getsize(path) - done)
    return {"files": len(input_paths), **writer.counts()}


def check_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Check that ``prefix.bin`` and ``prefix.idx`` exist and that the ``.idx`` is a complete Megatron index
    consistent with the ``.bin`` size, reading only a few bytes of each.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming the ``.idx`` (bad header/version/dtype, wrong size, no documents) or ``.bin``
            (size does not match the index).
    """
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    remake = "; re-create it with tools/preprocess_data.py"
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        preamble = f.read(_IDX_PREAMBLE.size)
        if len(preamble) < _IDX_PREAMBLE.size:
            raise ValueError(f"{idx_path}: truncated Megatron index ({idx_size} bytes){remake}")
        header, version, dtype_code, sequences, boundaries = _IDX_PREAMBLE.unpack(preamble)
        if header != _INDEX_HEADER:
            raise ValueError(f"{idx_path}: not a Megatron index file (header {header!r}, not {_INDEX_HEADER!r}){remake}")
        if version != 1 or dtype_code not in {code.value for code in DType}:
            raise ValueError(f"{idx_path}: unsupported index version {version} or dtype code {dtype_code}{remake}")
        expected_size = _IDX_PREAMBLE.size + sequences * (4 + 8) + boundaries * 8
        if idx_size != expected_size:
            raise ValueError(
                f"{idx_path}: {idx_size} bytes, but an index of {sequences} sequences and {boundaries} document "
                f"boundaries has {expected_size}: truncated or corrupt{remake}"
            )
        if sequences == 0 or boundaries < 2:
            raise ValueError(f"{idx_path}: the dataset has no documents{remake}")
        dtype = DType.dtype_from_code(dtype_code)
        f.seek(_IDX_PREAMBLE.size + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(_IDX_PREAMBLE.size + 4 * sequences + 8 * (sequences - 1))
        (last_offset,) = struct.unpack("<q", f.read(8))
        f.seek(idx_size - 8)
        (last_boundary,) = struct.unpack("<q", f.read(8))
    if last_boundary != sequences:
        raise ValueError(f"{idx_path}: last document boundary {last_boundary} != {sequences} sequences{remake}")
    bin_size, expected_bin_size = os.path.getsize(bin_path), last_offset + last_length * DType.size(dtype)
    if bin_size != expected_bin_size:
        raise ValueError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} describes {expected_bin_size}: the two files do not "
            f"belong together or one is truncated{remake}"
        )
    return IndexedDatasetInfo(sequences=sequences, tokens=expected_bin_size // DType.size(dtype), dtype=dtype)
