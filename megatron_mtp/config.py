"""Multi-token prediction settings: one dataclass, checked when it is built."""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

MTP_MODES = ("sequential", "parallel")
DEPTH_WEIGHTINGS = ("uniform", "harmonic", "geometric")
LOSS_IMPLEMENTATIONS = ("chunked", "plain")
# Position embeddings whose position ids are one id per token, so rolling them left is meaningful.
ROLLABLE_POSITION_EMBEDDINGS = ("learned_absolute", "rope", "yarn", "none")


@dataclass(frozen=True)
class MTPConfig:
    """How many future tokens to predict, with which modules, and how much they weigh in the loss.

    Depth k (1-based) at position t predicts token t+k+1: depth 1 predicts the token after the next one.
    The combined loss is ``L = L_main + lambda * sum_k w_k L_k / sum_k w_k``; with uniform weights this is
    Megatron-Core's ``L_main + lambda / D * sum_k L_k``.
    """

    num_layers: int = 1
    """D: sequential depths, or parallel heads beside the next-token head. 0 disables MTP (sequential mode)."""

    mode: str = "sequential"
    """``sequential`` (DeepSeek-V3: each depth conditions on the previous depth and the next token's
    embedding) or ``parallel`` (Meta: independent transformer-layer heads on the trunk output)."""

    loss_scaling_factor: float = 0.1
    """lambda, the weight of the MTP term (Megatron-LM's ``--mtp-loss-scaling-factor``, default 0.1)."""

    depth_weighting: str = "uniform"
    """w_k: ``uniform`` (1), ``harmonic`` (1/k) or ``geometric`` (gamma^(k-1)); normalised by their sum."""

    geometric_gamma: float = 0.5
    """gamma for ``geometric`` depth weighting, in (0, 1]."""

    loss_scaling_schedule: Tuple[Tuple[int, float], ...] = ()
    """Optional ``((start_step, lambda), ...)``, steps increasing: from ``start_step`` on, lambda takes that
    value; before the first entry it is ``loss_scaling_factor``. DeepSeek-V3: 0.3, then 0.1 late in training."""

    loss_implementation: str = "chunked"
    """``chunked``: each depth's output layer + cross-entropy runs over token chunks, never holding more than one
    chunk's logits (``loss/chunked.py``); ``plain``: full logits per depth, as Megatron-Core does."""

    loss_chunk_size: int = 512
    """Tokens per chunk for the chunked losses (MTP depths and main)."""

    main_loss_implementation: Optional[str] = None
    """The main next-token loss in training and evaluation with labels: ``chunked`` runs the output layer +
    cross-entropy over token chunks like the MTP depths (``loss.chunked.chunked_token_loss``: the fp32 [tokens,
    V/tp] logits and their softmax, the largest activation at large vocabularies, never exist at once; see
    ``main_loss_recompute_logits``); ``plain``: ``GPTModel``'s output layer and loss. None (default): chunked
    wherever it holds fewer logits, i.e. when a micro-batch has more tokens than ``loss_chunk_size``. Applies
    without MTP too (``num_layers=0``). Without labels the logits are returned."""

    main_loss_recompute_logits: Optional[bool] = None
    """Chunked main loss only: True recomputes each chunk's logits in backward (one more output-layer matmul per
    chunk than the plain path; only fp32 chunk-sized buffers, nothing vocabulary-sized kept); False keeps the
    logits in the output layer's dtype from forward (as many matmuls as the plain path; in bf16 half the bytes of
    the fp32 softmax the plain path keeps). None (default): keep them when they are 16-bit (bf16/fp16 training:
    the memory halves at no cost in time), recompute when they are fp32 (keeping would save nothing)."""

    loss_recompute_logits: Optional[bool] = None
    """Chunked loss only: True recomputes each chunk's logits in backward (four matmuls per chunk, keeps only the
    depth's input); False computes the gradients in forward and keeps them (three matmuls, an fp32 output-weight
    gradient and an input gradient per depth until backward). None (default) chooses: recompute when the weight
    gradient goes into Megatron DDP's ``main_grad`` (gradient-accumulation fusion), else keep the gradients only
    where they are no larger than the depth's logits (``loss.chunked.gradients_in_forward``)."""

    ddp_overlaps_grad_reduce: bool = True
    """Whether Megatron DDP wrapping the model overlaps its gradient reduction with backward
    (``DistributedDataParallelConfig.overlap_grad_reduce``, Megatron-LM's ``--overlap-grad-reduce``). Matters only
    under gradient-accumulation fusion, where the chunked main loss and the word-embedding lookup add their weight
    gradient into ``main_grad`` (``main_grad.py``). True (default, safe with any DDP setting): when no output layer
    of Megatron's returns its dummy weight gradient for the weight, they return it themselves ([V/tp, h], kept live
    through backward), because DDP's hook asserts ``param.grad is not None`` under overlap. False (Megatron-LM's
    default setting): they return None, so that buffer never exists (no MTP with the chunked main loss peaks
    below GPTModel). False while DDP does overlap fails in backward with Megatron's assertion "param.grad being
    None is not safe when overlap_grad_reduce is True", never silently. Megatron-LM's integration and our
    pretrain script set it from their DDP config."""

    latent_consistency_weight: float = 0.0
    """alpha of ``MSE(h_k[t], stopgrad(h_0[t+k]))`` (latent semantic enhancement, arXiv 2604.06155); 0 = off."""

    semantic_anchoring_weight: float = 0.0
    """beta of ``MSE(h_k[t], stopgrad(E[token t+k+1]))`` toward the target token's embedding; 0 = off."""

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise TypeError(f"MTP num_layers must be an int, got {self.num_layers!r}")
        if self.num_layers < 0:
            raise ValueError(f"MTP num_layers (D) must be >= 0, got {self.num_layers}")
        if self.mode not in MTP_MODES:
            raise ValueError(f"unknown MTP mode {self.mode!r}; choose one of {', '.join(MTP_MODES)}")
        if self.mode == "parallel" and self.num_layers < 1:
            raise ValueError(
                f"parallel MTP mode needs at least 1 head beside the next-token head, got num_layers={self.num_layers}"
            )
        _check_scale("MTP loss_scaling_factor", self.loss_scaling_factor)
        if self.depth_weighting not in DEPTH_WEIGHTINGS:
            raise ValueError(
                f"unknown MTP depth_weighting {self.depth_weighting!r}; choose one of {', '.join(DEPTH_WEIGHTINGS)}"
            )
        if not (0.0 < self.geometric_gamma <= 1.0):
            raise ValueError(f"MTP geometric_gamma must be in (0, 1], got {self.geometric_gamma}")
        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown MTP loss_implementation {self.loss_implementation!r}; "
                f"choose one of {', '.join(LOSS_IMPLEMENTATIONS)}"
            )
        if self.main_loss_implementation not in (None, *LOSS_IMPLEMENTATIONS):
            raise ValueError(
                f"unknown main_loss_implementation {self.main_loss_implementation!r}; "
                f"choose one of {', '.join(LOSS_IMPLEMENTATIONS)} (or None: chosen per micro-batch)"
            )
        for name in ("loss_recompute_logits", "main_loss_recompute_logits"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise ValueError(f"MTP {name} must be None, True or False, got {getattr(self, name)!r}")
        if self.main_loss_recompute_logits is not None and self.main_loss_implementation == "plain":
            raise ValueError(
                "main_loss_recompute_logits applies to the chunked main loss, not main_loss_implementation='plain'"
            )
        if not isinstance(self.ddp_overlaps_grad_reduce, bool):
            raise TypeError(f"MTP ddp_overlaps_grad_reduce must be a bool, got {self.ddp_overlaps_grad_reduce!r}")
        if type(self.loss_chunk_size) is not int or self.loss_chunk_size < 1:
            raise ValueError(f"MTP loss_chunk_size must be an int >= 1, got {self.loss_chunk_size!r}")
        _check_scale("MTP latent_consistency_weight", self.latent_consistency_weight)
        _check_scale("MTP semantic_anchoring_weight", self.semantic_anchoring_weight)
        previous_step = -1
        for entry in self.loss_scaling_schedule:
            if len(entry) != 2:
                raise ValueError(f"MTP loss_scaling_schedule entries are (start_step, lambda), got {entry!r}")
            step, value = entry
            if not isinstance(step, int) or step <= previous_step:
                raise ValueError(
                    f"MTP loss_scaling_schedule steps must be increasing non-negative ints, got {self.loss_scaling_schedule!r}"
                )
            _check_scale("MTP loss_scaling_schedule value", value)
            previous_step = step

    @property
    def enabled(self) -> bool:
        return self.num_layers > 0

    @property
    def latent_losses(self) -> bool:
        return bool(self.latent_consistency_weight or self.semantic_anchoring_weight)

    @property
    def megatron_mtp_num_layers(self) -> Optional[int]:
        """The value ``TransformerConfig.mtp_num_layers`` must have for this MTP config.

        Megatron-Core reads that field to keep a copy of the word embedding on the last pipeline stage
        (and to all-reduce its gradient with stage 0). Sequential MTP needs that copy; parallel heads do
        not use the input embedding, so they leave the field unset.
        """
        return self.num_layers if self.mode == "sequential" and self.enabled else None

    def depth_weights(self) -> Tuple[float, ...]:
        """Unnormalised w_1..w_D."""
        depths = range(1, self.num_layers + 1)
        if self.depth_weighting == "uniform":
            return tuple(1.0 for _ in depths)
        if self.depth_weighting == "harmonic":
            return tuple(1.0 / k for k in depths)
        return tuple(self.geometric_gamma ** (k - 1) for k in depths)

    def loss_scale_at(self, step: int) -> float:
        """lambda at training step ``step``."""
        scale = self.loss_scaling_factor
        for start, value in self.loss_scaling_schedule:
            if step >= start:
                scale = value
        return scale

    def check_model(self, max_sequence_length: int, position_embedding_type: str) -> None:
        """Fail early on model settings MTP cannot work with."""
        if self.enabled and self.num_layers >= max_sequence_length:
            raise ValueError(
                f"MTP num_layers (D={self.num_layers}) must be smaller than the sequence length "
                f"({max_sequence_length}): depth D predicts token t+D+1"
            )
        if self.enabled and position_embedding_type not in ROLLABLE_POSITION_EMBEDDINGS:
            raise ValueError(
                f"MTP cannot roll position ids of position_embedding_type={position_embedding_type!r}; "
                f"supported: {', '.join(ROLLABLE_POSITION_EMBEDDINGS)}"
            )


def _check_scale(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
