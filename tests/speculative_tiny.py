"""Tiny GPT+MTP models for the generation tests, a few seconds of training on a low-entropy Markov chain (so drafts
are sometimes accepted and sometimes not), and an uncached reference for the MTP drafts.

The same code runs in the pytest process and in spawned TP=2 ranks.
"""

import functools
from typing import Dict, List, Tuple

import torch

from megatron.core import parallel_state

from megatron_mtp import cpu_bridge
from megatron_mtp.config import MTPConfig
from megatron_mtp.inference import greedy_ids
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.model import MTPGPTModel

import tiny

VOCAB = 64
MAX_SEQ = 48
CASES: Tuple[Tuple[str, int], ...] = (("sequential", 1), ("sequential", 3), ("parallel", 1), ("parallel", 3))


def build(mode: str, depths: int, tp: int = 1, position: str = "rope") -> MTPGPTModel:
    """A 2-layer hidden-32 GPT with ``depths`` MTP depths or heads, random weights."""
    mtp = MTPConfig(num_layers=depths, mode=mode, loss_scaling_factor=1.0)
    config = tiny.transformer_config(mtp, tp=tp, num_layers=2)
    spec = tiny.decoder_spec(config)
    return MTPGPTModel(
        config, spec, VOCAB, MAX_SEQ, mtp_config=mtp,
        mtp_block_spec=cpu_bridge.with_sequence_parallel_norms(get_mtp_block_spec(spec, mtp)),
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type=position,
    )


def markov_chain(seed: int = 0) -> torch.Tensor:
    """[VOCAB, VOCAB] transition probabilities: each token has three successors (0.45, 0.35, 0.2), so the most
    likely next-but-one token is often not the greedy path's and drafts are rejected now and then."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.full((VOCAB, VOCAB), 0.0)
    for token in range(VOCAB):
        successors = torch.randperm(VOCAB, generator=generator)[:3]
        probabilities[token, successors] = torch.tensor([0.45, 0.35, 0.2])
    return probabilities


def sample_chain(chain: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """[count, length] token streams from ``chain``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (count,), generator=generator)
    for position in range(1, length):
        tokens[:, position] = torch.multinomial(chain[tokens[:, position - 1]], 1, generator=generator).squeeze(1)
    return tokens


def train(model: MTPGPTModel, steps: int = 20, batch: int = 8, seq: int = 24) -> None:
    """Adam on the main + MTP loss over Markov-chain streams."""
    chain = markov_chain()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)
    positions = torch.arange(seq).expand(batch, seq)
    model.train()
    for step in range(steps):
        stream = sample_chain(chain, batch, seq + 1, seed=100 + step)
        loss = model(
            stream[:, :-1], positions, mask, labels=stream[:, 1:], loss_mask=torch.ones(batch, seq), compute_mtp=True
        )
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    model.eval()


@functools.lru_cache(maxsize=None)
def trained_states() -> Dict[Tuple[str, int], Dict[str, torch.Tensor]]:
    """Full (TP=1) parameters of each test model after training, by (mode, D); trained once per process.
    Needs Megatron's parallel state at TP=1."""
    states = {}
    for mode, depths in CASES:
        torch.manual_seed(0)
        model = build(mode, depths)
        train(model)
        states[(mode, depths)] = {name: p.detach().clone() for name, p in tiny.global_names(model).items()}
    return states


def trained(states: Dict[str, torch.Tensor], mode: str, depths: int, tp: int = 1) -> MTPGPTModel:
    """The test model of (mode, D) built at this TP size with ``states`` (one entry of ``trained_states()``), in
    eval mode."""
    model = build(mode, depths, tp)
    tiny.load_full_state(model, states)
    return model.eval()


def prompts(count: int, seed: int = 7) -> List[List[int]]:
    """Held-out prompts of 4 to 12 tokens from the training chain (other seeds than training's)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 13, (count,), generator=generator).tolist()
    streams = sample_chain(markov_chain(), count, 12, seed=seed)
    return [streams[i, :length].tolist() for i, length in enumerate(lengths)]


@torch.no_grad()
def uncached_greedy(model: MTPGPTModel, prompt: List[int], new_tokens: int) -> List[int]:
    """Greedy decoding by re-running the whole sequence each step, no KV cache: the reference."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        length = len(tokens)
        logits = model(
            torch.tensor([tokens]), torch.arange(length).view(1, -1),
            torch.ones(length, length, dtype=torch.bool).triu(1).view(1, 1, length, length), runtime_gather_output=True,
        )
        tokens.append(int(greedy_ids(logits[0, -1], VOCAB)))
    return tokens[len(prompt):]


@torch.no_grad()
def uncached_drafts(model: MTPGPTModel, committed: List[int], count: int) -> List[int]:
    """The drafts of ``count`` MTP depths/heads at the last main position, from the training forward of the MTP
    block over the whole sequence (no cache): committed x[0..n], drafts x^[n+1..n+count]."""
    last = len(committed) - 1
    length = last + count  # depth k at position n-1 reads token n-1+k; later positions are never read
    positions = torch.arange(length).view(1, -1)
    mask = torch.ones(length, length, dtype=torch.bool).triu(1).view(1, 1, length, length)
    rotary = model.rotary_pos_emb(length) if model.position_embedding_type == "rope" else None
    hidden = {}
    handle = model.decoder.register_forward_hook(lambda module, inputs, output: hidden.update(h0=output))
    drafts: List[int] = []
    try:
        for k in range(1, count + 1):
            ids = torch.tensor([(committed + drafts + [0] * count)[:length]])
            model(ids, positions, mask, runtime_gather_output=True)
            embeddings = {}
            if model.mtp_config.mode == "sequential":
                embeddings = dict(
                    token_embeddings=model.embedding(input_ids=ids, position_ids=positions),
                    tail_embeddings=model.embedding(input_ids=torch.zeros_like(ids), position_ids=torch.zeros_like(positions)),
                )
            outputs = model.mtp(hidden["h0"], mask, **embeddings, rotary_pos_emb=rotary)
            logits, _ = model.output_layer(outputs[k - 1][last - 1 : last], runtime_gather_output=True)
            drafts.append(int(greedy_ids(logits[0, 0], VOCAB)))
    finally:
        handle.remove()
    return drafts
