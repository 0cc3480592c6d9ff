"""Which pipeline ranks hold the word embedding (Megatron-LM's ``get_embedding_ranks``)."""

from typing import List

from megatron.training import get_args

from megatron_mtp.megatron_lm.arguments import mtp_config_from_megatron_args


def mtp_get_embedding_ranks(pp_ranks: List[int]) -> List[int]:
    """The first stage; the last one too when it reads the embedding: tied output weights, or sequential MTP
    (it embeds the rolled tokens there). Parallel heads do not read it, so unlike Megatron-LM's function, which
    counts every MTP module as needing it, they add no rank."""
    args = get_args()
    mtp_config = mtp_config_from_megatron_args(args)
    ranks = {pp_ranks[0]}
    tied = not args.untie_embeddings_and_output_weights
    if tied or mtp_config.megatron_mtp_num_layers is not None:
        ranks.add(pp_ranks[-1])
    return sorted(ranks)
