"""Pretraining data: tokenizers, Megatron indexed datasets, the stdlib default corpus, GPT datasets, micro-batches."""

from megatron_mtp.data.datasets import MicroBatchIterator, build_gpt_datasets, parse_blend
from megatron_mtp.data.indexed import check_indexed_dataset, find_input_files, write_indexed_dataset
from megatron_mtp.data.stdlib_corpus import default_cache_dir, prepare_stdlib_corpus
from megatron_mtp.data.tokenizers import ByteTokenizer, HuggingFaceTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "HuggingFaceTokenizer",
    "MicroBatchIterator",
    "build_gpt_datasets",
    "build_tokenizer",
    "check_indexed_dataset",
    "default_cache_dir",
    "find_input_files",
    "parse_blend",
    "prepare_stdlib_corpus",
    "write_indexed_dataset",
]
