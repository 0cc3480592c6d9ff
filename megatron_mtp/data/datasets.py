"""GPT train/valid/test datasets from Megatron indexed datasets, and the micro-batches one data-parallel rank reads.

``build_gpt_datasets`` checks the files, then hands them to Megatron-Core's ``BlendedMegatronDatasetBuilder``
with ``GPTDatasetConfig``/``GPTDataset``. ``MicroBatchIterator`` reproduces Megatron-LM's pretraining sampler
(``MegatronPretrainingSampler``) and is exactly resumable from a ``consumed_samples`` count.
"""

import dataclasses
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split, get_blend_from_list

from megatron_mtp.data.indexed import check_indexed_dataset

_SPLIT_PATTERN = re.compile(r"^\s*\d+(\.\d*)?\s*(,\s*\d+(\.\d*)?\s*){0,2}$")


def parse_blend(data_path: Sequence[str]) -> Tuple[List[str], List[float]]:
    """``--data-path`` in Megatron-LM's blend syntax -> ``(prefixes, weights)``.

    ``[prefix]`` and ``[prefix1, prefix2, ...]`` weigh the datasets equally (note: Megatron-LM would weigh
    unweighted prefixes by their sizes, capped at one epoch each); ``[w1, prefix1, w2, prefix2, ...]`` uses
    the weights ``w``, which need not sum to 1.
    """
    if not data_path:
        raise ValueError("--data-path is empty; give PREFIX [PREFIX ...] or WEIGHT PREFIX [WEIGHT PREFIX ...]")
    prefixes, weights = get_blend_from_list(list(data_path))
    if weights is None:
        weights = [1.0] * len(prefixes)
    for weight, prefix in zip(weights, prefixes):
        if not weight > 0:
            raise ValueError(f"--data-path: weight {weight} for {prefix} must be positive")
    return prefixes, weights


def _split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    """Validate ``--split`` ("train,valid,test" weights) and return core's split matrix."""
    if not _SPLIT_PATTERN.match(split) or sum(map(float, split.split(","))) <= 0:
        raise ValueError(f"--split {split!r}: expected up to 3 comma-separated non-negative weights, e.g. '969,30,1'")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _check_dataset(prefix: str, split: str, split_matrix, num_samples: Sequence[int]) -> None:
    """Clear errors for missing/corrupt files and for splits that would get no sequence of this dataset."""
    try:
        info = check_indexed_dataset(prefix)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"--data-path {prefix}: {error}") from None
    for split_name, bounds, samples in zip((s.name for s in Split), split_matrix, num_samples):
        # the same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits
        if bounds is not None and samples > 0 and round(bounds[0] * info.sequences) == round(bounds[1] * info.sequences):
            raise ValueError(
                f"--split {split!r} leaves the {split_name} split no document of --data-path {prefix} "
                f"({info.sequences} documents); give that split a larger share, 0, or use more data"
            )


def _build_on_every_rank() -> bool:
    """``is_built_on_rank``: core builds rank 0 first and caches; after a barrier the others load the cache."""
    return True


class _Builder(BlendedMegatronDatasetBuilder):
    """Core's builder, except that without ``torch.distributed`` a ``BlendedDataset`` gets no cache directory.

    Megatron-Core 0.16's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded when its cache
    misses, which raises if no process group exists. Its indices are cheap, so they are built in memory then.
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            *dataset_args, config = args
            args = (*dataset_args, dataclasses.replace(config, path_to_cache=None))
        return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)


def build_gpt_datasets(
    data_path: List[str],
    split: str,
    seq_length: int,
    tokenizer,
    seed: int,
    num_samples: Tuple[int, int, int],
    cache_dir: Optional[str],
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
) -> Tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """Train, valid and test datasets (each ``None`` if its ``--split`` weight is 0).

    Each sample is a dict of ``tokens``, ``labels`` (int64 [seq_length], ``labels[i] = tokens[i + 1]`` in the
    document stream), ``loss_mask`` (float32 [seq_length]) and ``position_ids`` (int64 [seq_length]);
    a blend adds ``dataset_id``. Documents are concatenated with their eods; positions restart after each eod
    with ``reset_position_ids`` and eods are masked from the loss with ``eod_mask_loss`` (Megatron-LM's
    flags). No per-sample attention mask is built (see ``MicroBatchIterator``; ``data/packing.py`` separates
    documents). Each split holds at least its ``num_samples`` entry of samples: core repeats
    the data over as many shuffled epochs as that takes.

    Must be called on every rank when ``torch.distributed`` is initialized; works without it too.

    Args:
        data_path: ``--data-path``, see ``parse_blend``.
        split: ``--split``, e.g. "969,30,1": the share of each dataset's documents in train, valid, test.
        cache_dir: where core caches its shuffled sample indices; must be shared by all ranks. ``None`` means
            core's default, ``<prefix>/cache/GPTDataset_indices`` next to each dataset.
    """
    if seq_length < 1:
        raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
    if len(num_samples) != len(Split) or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples {tuple(num_samples)}: expected 3 non-negative (train, valid, test) counts")
    prefixes, weights = parse_blend(data_path)
    split_matrix = _split_matrix(split)
    for prefix in prefixes:
        _check_dataset(prefix, split, split_matrix, num_samples)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=False,  # it only shapes a dense mask, which is not built
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    train, valid, test = _Builder(GPTDataset, list(num_samples), _build_on_every_rank, config).build()
    return train, valid, test


def causal_attention_mask(seq_length: int) -> torch.Tensor:
    """Bool [1, 1, seq, seq], True where attention is masked (key after query): what ``GPTDataset`` builds
    with ``create_attention_mask=True``, shared by every sample since positions are not reset at documents."""
    return torch.ones(seq_length, seq_length, dtype=torch.bool).triu(diagonal=1).view(1, 1, seq_length, seq_length)


class MicroBatchIterator(Iterator[Dict[str, torch.Tensor]]):
    """Micro-batches for one data-parallel rank, with Megatron-LM's pretraining-sampler order.

    The arguments after ``dataset`` are those of Megatron-LM's ``MegatronPretrainingSampler``, in its order.

    Global sample indices run consecutively from ``consumed_samples`` in chunks of
    ``micro_batch_size * data_parallel_size``; rank ``r`` takes positions ``[r * mbs, (r + 1) * mbs)`` of
    each chunk. Global sample ``g`` is ``dataset[g % len(dataset)]``: past the end, the same (already shuffled)
    order starts again; size ``num_samples`` in ``build_gpt_datasets`` to the samples the run will consume
    and this never happens.

    ``consumed_samples`` advances by ``micro_batch_size * data_parallel_size`` per micro-batch; save it in the
    checkpoint: an iterator created with the saved value yields exactly what this one yields next.

    Each item: ``tokens``, ``labels``, ``position_ids`` (int64 [mbs, seq]), ``loss_mask`` (float32 [mbs, seq])
    and ``attention_mask`` (bool [1, 1, seq, seq], True = masked; the same tensor every time, do not modify it).
    """

    KEYS = ("tokens", "labels", "loss_mask", "position_ids")

    def __init__(
        self,
        dataset,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset has no samples")
        if micro_batch_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"need micro_batch_size >= 1 and 0 <= data_parallel_rank < data_parallel_size, got "
                f"{micro_batch_size}, {data_parallel_rank}, {data_parallel_size}"
            )
        samples_per_step = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % samples_per_step:
            raise ValueError(
                f"consumed_samples {consumed_samples} must be a non-negative multiple of micro_batch_size * "
                f"data_parallel_size = {samples_per_step}"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self.attention_mask = causal_attention_mask(len(dataset[0]["tokens"]))

    def __next__(self) -> Dict[str, torch.Tensor]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        samples = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.data_parallel_size
        batch = {key: torch.stack([sample[key] for sample in samples]) for key in self.KEYS}
        batch["attention_mask"] = self.attention_mask
        return batch
