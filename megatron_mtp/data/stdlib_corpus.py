"""The built-in default training corpus: this Python's own standard library sources, one document per file.

Every ``.py`` below ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` and ``__pycache__`` excluded),
sorted by relative path, is tokenized into ``<cache_dir>/stdlib_py<major><minor>_<tokenizer name>.bin/.idx``.
A few stdlib files (encoding tests) are not UTF-8; their undecodable bytes become U+FFFD.
"""

import logging
import os
import sys
import sysconfig
from typing import List, Optional

import torch
from tqdm import tqdm

from megatron_mtp.data.indexed import IndexedDatasetWriter, check_indexed_dataset

logger = logging.getLogger(__name__)

EXCLUDED_DIRECTORIES = ("site-packages", "__pycache__")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/megatron_mtp``, i.e. ``~/.cache/megatron_mtp`` when ``XDG_CACHE_HOME`` is unset."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "megatron_mtp")


def stdlib_directory() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_source_files() -> List[str]:
    """Absolute paths of the standard library's ``.py`` files, sorted by path relative to the stdlib."""
    root = stdlib_directory()
    relative_paths = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in EXCLUDED_DIRECTORIES]
        relative_paths.extend(
            os.path.relpath(os.path.join(directory, name), root) for name in names if name.endswith(".py")
        )
    if not relative_paths:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}")
    return [os.path.join(root, path) for path in sorted(relative_paths)]


def stdlib_corpus_prefix(cache_dir: str, tokenizer) -> str:
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(cache_dir, f"stdlib_py{version}_{tokenizer.name}")


def prepare_stdlib_corpus(cache_dir: Optional[str], tokenizer, show_progress: bool = True) -> str:
    """Build the stdlib corpus unless a valid one is cached; return its prefix (for ``--data-path``).

    Concurrency: when ``torch.distributed`` is initialized, global rank 0 builds first and every rank waits
    on ``torch.distributed.barrier()``; a rank that then still finds no valid files (a cache directory that
    is not shared between nodes, or a failure on rank 0) builds them itself. Independent processes may call
    this at the same time: each writes under its own temporary names and renames atomically, so readers
    only ever see complete files (at worst the corpus is built more than once).

    Args:
        cache_dir: where the files go; ``None`` means ``default_cache_dir()``.
        tokenizer: a tokenizer from ``megatron_mtp.data.tokenizers``; its ``name`` keys the cache.
    """
    prefix = stdlib_corpus_prefix(cache_dir or default_cache_dir(), tokenizer)
    if torch.distributed.is_initialized():
        try:
            if torch.distributed.get_rank() == 0:
                _build_unless_cached(prefix, tokenizer, show_progress)
        finally:
            torch.distributed.barrier()
    _build_unless_cached(prefix, tokenizer, show_progress)
    return prefix


def _build_unless_cached(prefix: str, tokenizer, show_progress: bool) -> None:
    try:
        check_indexed_dataset(prefix)
        return
    except FileNotFoundError:
        pass
    except ValueError as error:
        logger.warning("rebuilding the stdlib corpus: %s", error)
    files = stdlib_source_files()
    with IndexedDatasetWriter(prefix, tokenizer) as writer:
        for path in tqdm(files, desc="stdlib corpus", unit="file", file=sys.stderr, disable=not show_progress):
            with open(path, "rb") as f:
                writer.add_document(f.read().decode("utf-8", errors="replace"))
    logger.info("stdlib corpus: %d files, %d tokens -> %s.{bin,idx}", writer.documents, writer.tokens, prefix)
