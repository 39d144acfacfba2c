"""NanoGPT for character-level Shakespeare, as a ``transformers`` GPT-2.

The dattri Shakespeare benchmark trains Karpathy's nanoGPT with its ``train_shakespeare_char``
setting: 6 layers, 6 heads, ``n_embd=384``, block size 256, dropout 0.2, a character
vocabulary (65 symbols for Tiny Shakespeare), tied input/output embeddings. nanoGPT's ``GPT``
is GPT-2 without biases (``bias=False``) and with exact GELU; ``GPT2LMHeadModel`` always has
biases, so it is the same network plus 25,728 bias parameters. With ``vocab_size=65``:

* ``GPT2LMHeadModel(nanogpt_config(65))``: **10,770,816** parameters (``lm_head`` tied to
  ``wte``, counted once), 0.7% above the 10.7M of Table 3;
* nanoGPT itself: 10,745,088 (it prints 10.65M, excluding the position embeddings).

``nanogpt_config`` selects eager attention: its plain matmuls support ``torch.func`` transforms
(``vmap`` per-example gradients, double backward) where the fused SDPA kernel does not.
GPT-2 is already registered with the ``Auto`` classes, so ``AutoModelForCausalLM`` loads saved
checkpoints without further registration.
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, GPT2LMHeadModel

__all__ = ["NanoGPTForCausalLM", "nanogpt_config"]

#: The nanoGPT model class: ``transformers.GPT2LMHeadModel``.
NanoGPTForCausalLM = GPT2LMHeadModel


def nanogpt_config(
    vocab_size: int = 65,
    block_size: int = 256,
    n_layer: int = 6,
    n_head: int = 6,
    n_embd: int = 384,
    dropout: float = 0.2,
    **kwargs: Any,
) -> GPT2Config:
    """A ``GPT2Config`` for nanoGPT's ``train_shakespeare_char`` model.

    Args:
        vocab_size: size of the character vocabulary (65 for Tiny Shakespeare).
        block_size: context length (``n_positions``).
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        dropout: dropout on embeddings, attention weights and residual branches.
        **kwargs: further ``GPT2Config`` fields, overriding the defaults set here.

    Returns:
        The config; build the model with ``NanoGPTForCausalLM(config)``.
    """
    options: dict[str, Any] = {
        "vocab_size": vocab_size,
        "n_positions": block_size,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "n_inner": 4 * n_embd,
        "activation_function": "gelu",  # nanoGPT uses exact nn.GELU
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        # A character vocabulary has no special tokens (GPT-2's 50256 would be out of range).
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "attn_implementation": "eager",
    }
    options.update(kwargs)
    return GPT2Config(**options)
