r"""Music Transformer (Huang et al., 2018): a decoder-only transformer with relative attention.

The dattri MAESTRO benchmark uses the PyTorch reproduction by Damon Gwinn (vendored in dattri as
``dattri/benchmark/models/MusicTransformer``) with the paper's defaults: 6 layers, 8 heads,
``d_model=512``, feed-forward width 1024, maximum sequence length 2048. This module rebuilds
that network as a ``transformers`` model with the same layer structure:

* token embedding plus sinusoidal absolute position encoding, then dropout;
* ``num_hidden_layers`` post-norm blocks (``x = LN(x + Drop(Attn(x)));
  x = LN(x + Drop(FFN(x)))``, ReLU feed-forward), causal relative self-attention;
* a final ``LayerNorm`` and an untied linear ``lm_head`` (with bias).

Vocabulary: the 388 MIDI performance events (128 note-on, 128 note-off, 100 time-shift,
32 velocity) plus the two special tokens of the reference implementation, end of sequence
(``388``) and padding (``389``), so ``vocab_size=390``. Both are needed to reproduce its data:
a piece shorter than the window is padded with ``389`` and its last event gets ``388`` as the
next-event target (generation also stops on ``388``).

Loss convention: ``labels`` are shifted inside ``forward`` as in ``transformers`` causal LMs
(position ``t`` predicts ``labels[:, t+1]``; set padding to ``-100``). The reference code
instead trains on pre-shifted ``(x, tgt)`` pairs with ``ignore_index=389``; for such pairs use
``F.cross_entropy(model(x).logits.flatten(0, 1), tgt.flatten(), ignore_index=TOKEN_PAD)``.

Relative attention follows Section 3.4.1 of Huang et al. (the memory-efficient "skewing"
formulation): each layer learns one table :math:`E^r \in \mathbb{R}^{L_{max} \times d_h}` of
embeddings for the relative distances :math:`-(L_{max}-1), \dots, 0`, shared by the heads as in
the reference implementation (``relative_embeddings_per_head=True`` learns one per head, as
the paper describes; it adds ``(H-1) L_{max} d_h`` parameters per layer). For a length-:math:`L`
input, :math:`S^{rel} = \mathrm{skew}(Q {E^r_{L}}^\top)` where :math:`E^r_L` holds the last
:math:`L` rows (distances :math:`-(L-1)..0`); ``skew`` pads one zero column on the left,
reshapes ``[L, L+1] -> [L+1, L]`` and drops the first row, giving
:math:`S^{rel}_{ij} = q_i \cdot E^r_L[L-1+j-i]` for :math:`j \le i` in :math:`O(L d_h)` memory
per head instead of the :math:`O(L^2 d_h)` of Shaw et al. The logits are
:math:`(QK^\top + S^{rel})/\sqrt{d_h}` with causal (and optional padding) masking.

Parameter count with the defaults (vocabulary 390, ``L_max=2048``): **13,803,910**, 3.8% above
the 13.3M of the dattri paper's Table 3. Of these, 786,432 are the six relative-embedding tables
(``2048 x 64`` each); the same network without relative attention has 13,017,478 (2.1% below
13.3M), so Table 3's figure lies between the two.

Everything in ``forward`` is functional (no in-place updates, no Python branching on tensor
values), so ``torch.func.functional_call``, ``grad`` and ``vmap`` apply directly.

Importing this module registers ``"hf_attrib_music_transformer"`` with ``AutoConfig``,
``AutoModel`` (:class:`MusicTransformerModel`) and ``AutoModelForCausalLM``
(:class:`MusicTransformerForCausalLM`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from hf_attrib.benchmark.models._common import register_auto

__all__ = [
    "NUM_MIDI_EVENTS",
    "TOKEN_END",
    "TOKEN_PAD",
    "MusicTransformerConfig",
    "MusicTransformerForCausalLM",
    "MusicTransformerModel",
    "RelativeSelfAttention",
    "causal_lm_loss",
    "relative_logits_naive",
    "skew",
]

#: MIDI performance events: 128 note-on, 128 note-off, 100 time-shift and 32 velocity events.
NUM_MIDI_EVENTS = 388
#: End-of-sequence token of the reference implementation.
TOKEN_END = NUM_MIDI_EVENTS
#: Padding token of the reference implementation.
TOKEN_PAD = NUM_MIDI_EVENTS + 1


class MusicTransformerConfig(PretrainedConfig):
    """Configuration of the Music Transformer.

    Args:
        vocab_size: number of tokens (388 MIDI events + end + pad).
        hidden_size: model width ``d_model``.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: attention heads per block.
        intermediate_size: width of the feed-forward layer.
        max_position_embeddings: longest sequence the model accepts; also the number of
            relative distances each layer learns an embedding for.
        dropout: dropout rate (embeddings, attention weights, residual branches, FFN).
        layer_norm_eps: epsilon of the layer norms.
        initializer_range: standard deviation of the normal initialisation.
        relative_embeddings_per_head: learn one relative-embedding table per head instead of one
            shared by all heads of a layer.
        pad_token_id: padding token.
        eos_token_id: end-of-sequence token.
        bos_token_id: beginning-of-sequence token (the reference vocabulary has none).
        **kwargs: passed to ``PretrainedConfig``.
    """

    model_type = "hf_attrib_music_transformer"

    def __init__(
        self,
        vocab_size: int = NUM_MIDI_EVENTS + 2,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        intermediate_size: int = 1024,
        max_position_embeddings: int = 2048,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        relative_embeddings_per_head: bool = False,
        pad_token_id: int | None = TOKEN_PAD,
        eos_token_id: int | None = TOKEN_END,
        bos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by "
                             f"num_attention_heads ({num_attention_heads}).")
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.intermediate_size = int(intermediate_size)
        self.max_position_embeddings = int(max_position_embeddings)
        self.dropout = float(dropout)
        self.layer_norm_eps = float(layer_norm_eps)
        self.initializer_range = float(initializer_range)
        self.relative_embeddings_per_head = bool(relative_embeddings_per_head)
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


# --------------------------------------------------------------------------------------------
# Relative attention
# --------------------------------------------------------------------------------------------
def skew(rel: Tensor) -> Tensor:
    """The "skewing" of Huang et al. (2018): absolute-by-relative to absolute-by-absolute.

    Args:
        rel: ``[..., L, L]`` with ``rel[..., i, m] = q_i . E[m]``, where ``E[m]`` embeds the
            relative distance ``m - (L - 1)`` (``m = L-1``: distance 0).

    Returns:
        ``[..., L, L]`` with ``out[..., i, j] = rel[..., i, L-1+j-i]`` for ``j <= i``; entries
        above the diagonal are left-over values that the causal mask removes.
    """
    *lead, length, _ = rel.shape
    padded = F.pad(rel, (1, 0))
    return padded.reshape(*lead, length + 1, length)[..., 1:, :]


def relative_logits_naive(q: Tensor, rel_embeddings: Tensor) -> Tensor:
    """Reference relative logits by explicit gathering, ``O(L^2 d)`` memory (Shaw et al.).

    Args:
        q: ``[..., L, d]`` queries.
        rel_embeddings: ``[L, d]`` embeddings of distances ``-(L-1)..0`` (or ``[..., L, d]``
            broadcastable against ``q``).

    Returns:
        ``[..., L, L]`` with ``out[..., i, j] = q_i . E[L-1+j-i]`` for ``j <= i`` and 0 above
        the diagonal.
    """
    length = q.shape[-2]
    i = torch.arange(length, device=q.device)
    index = (length - 1 + i[None, :] - i[:, None]).clamp(max=length - 1)  # [L, L]
    gathered = rel_embeddings[..., index, :]  # [..., L, L, d]
    out = (q.unsqueeze(-2) * gathered).sum(-1)
    return out * (i[None, :] <= i[:, None])


def _sinusoidal_positions(length: int, dim: int, device: torch.device,
                          dtype: torch.dtype) -> Tensor:
    """``[length, dim]`` sinusoidal encodings (sin on even, cos on odd channels)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = position * inv_freq  # [L, dim/2]
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(length, -1)[:, :dim]
    return pe.to(dtype)


class RelativeSelfAttention(nn.Module):
    """Causal multi-head self-attention with skewed relative position logits.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear`` with bias) and
    ``rel_embeddings`` (``[1 or H, max_position_embeddings, head_dim]``; row ``m`` embeds the
    relative distance ``m - (max_position_embeddings - 1)``).

    Args:
        config: the model configuration.
    """

    def __init__(self, config: MusicTransformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.max_positions = config.max_position_embeddings
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        tables = self.num_heads if config.relative_embeddings_per_head else 1
        self.rel_embeddings = nn.Parameter(torch.empty(tables, self.max_positions, self.head_dim))
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend causally over ``hidden_states``.

        Args:
            hidden_states: ``[B, L, d]``.
            attention_mask: optional ``[B, L]`` (1: real token, 0: padding); padded keys are
                not attended to.
            output_attentions: also return the attention weights.

        Returns:
            ``([B, L, d] output, [B, H, L, L] weights or None)``.
        """
        bsz, length, d = hidden_states.shape

        def heads(x: Tensor) -> Tensor:
            return x.reshape(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(hidden_states))
        k = heads(self.k_proj(hidden_states))
        v = heads(self.v_proj(hidden_states))
        rel = self.rel_embeddings[:, self.max_positions - length:, :]  # [1|H, L, hd]
        content = q @ k.transpose(-1, -2)
        position = skew(q @ rel.transpose(-1, -2))
        scores = (content + position) / math.sqrt(self.head_dim)
        allowed = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].to(torch.bool)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = self.attn_dropout(scores.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(bsz, length, d)
        return self.o_proj(out), (weights if output_attentions else None)


class MusicTransformerLayer(nn.Module):
    """Post-norm transformer block (as ``nn.TransformerEncoderLayer``) with relative attention.

    Args:
        config: the model configuration.
    """

    def __init__(self, config: MusicTransformerConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = RelativeSelfAttention(config)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.ffn_dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.intermediate_size, d)
        self.out_dropout = nn.Dropout(config.dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        """One block: attention and feed-forward, each with residual and layer norm."""
        attn, weights = self.self_attn(hidden_states, attention_mask, output_attentions)
        h = self.attn_norm(hidden_states + self.attn_dropout(attn))
        ffn = self.fc2(self.ffn_dropout(F.relu(self.fc1(h))))
        return self.ffn_norm(h + self.out_dropout(ffn)), weights


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class MusicTransformerPreTrainedModel(PreTrainedModel):
    """Shared ``transformers`` plumbing: config class and weight initialisation.

    ``sampled_vocab_size``: the tokens sampling may produce (the 388 events; never the end and
    padding tokens), read by :func:`hf_attrib.benchmark.sampling.generate_samples`.
    """

    config_class = MusicTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    sampled_vocab_size: ClassVar[int] = NUM_MIDI_EVENTS
    _no_split_modules: ClassVar[list[str]] = ["MusicTransformerLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, ``initializer_range``) weights and relative embeddings, zero biases."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RelativeSelfAttention):
            nn.init.normal_(module.rel_embeddings, mean=0.0, std=std)


class MusicTransformerModel(MusicTransformerPreTrainedModel):
    """The Music Transformer body: embeddings, relative-attention blocks, final layer norm.

    Args:
        config: the model configuration.
    """

    def __init__(self, config: MusicTransformerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            MusicTransformerLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> BaseModelOutput:
        """Contextual representations of a batch of event sequences.

        Args:
            input_ids: ``[B, L]`` token ids, ``L <= max_position_embeddings``.
            attention_mask: optional ``[B, L]`` (1: real token, 0: padding).
            output_hidden_states: also return the input of every block and the final output.
            output_attentions: also return every block's attention weights.
            **kwargs: ignored (accepted for ``Trainer``/``generate`` compatibility).

        Returns:
            ``BaseModelOutput`` with ``last_hidden_state [B, L, d]``.

        Raises:
            ValueError: if the sequence is longer than ``max_position_embeddings``.
        """
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings}).")
        h = self.embed_tokens(input_ids)
        h = h + _sinusoidal_positions(length, h.shape[-1], h.device, h.dtype)
        h = self.embed_dropout(h)
        hidden_states: list[Tensor] = []
        attentions: list[Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(h)
            h, weights = layer(h, attention_mask, output_attentions)
            if output_attentions:
                attentions.append(weights)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        return BaseModelOutput(
            last_hidden_state=h,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[:, t+1]``.

    Args:
        logits: ``[B, L, V]``.
        labels: ``[B, L]`` token ids (usually ``input_ids``); ``ignore_index`` entries are
            skipped.
        ignore_index: label value excluded from the mean.

    Returns:
        The mean over all non-ignored target positions of the batch.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
    )


class MusicTransformerForCausalLM(MusicTransformerPreTrainedModel):
    """Music Transformer with the next-event prediction head (``lm_head``, untied, with bias).

    13,803,910 parameters with the default config (Table 3 of the dattri paper: 13.3M).

    Args:
        config: the model configuration.
    """

    def __init__(self, config: MusicTransformerConfig) -> None:
        super().__init__(config)
        self.model = MusicTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        """The output projection."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace the output projection."""
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """Next-event logits and, with ``labels``, the shifted cross-entropy loss.

        Args:
            input_ids: ``[B, L]`` token ids.
            attention_mask: optional ``[B, L]`` (1: real token, 0: padding).
            labels: optional ``[B, L]`` targets, normally ``input_ids`` with padding set to
                ``-100``; shifted inside (position ``t`` predicts ``labels[:, t+1]``), as in
                ``transformers`` causal LMs.
            output_hidden_states: also return every block's hidden states.
            output_attentions: also return every block's attention weights.
            **kwargs: ignored (accepted for ``Trainer``/``generate`` compatibility).

        Returns:
            ``CausalLMOutput`` with ``logits [B, L, vocab_size]`` and ``loss``.
        """
        out = self.model(input_ids, attention_mask=attention_mask,
                         output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions)
        logits = self.lm_head(out.last_hidden_state)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                              attentions=out.attentions)


register_auto(
    MusicTransformerConfig,
    (AutoModel, MusicTransformerModel),
    (AutoModelForCausalLM, MusicTransformerForCausalLM),
)
