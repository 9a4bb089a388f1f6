"""Tiny Hugging Face ``transformers`` models built from configs (random initialisation, no
download): what a user brings from that library, at widths a dense float64 Fisher can check.

``transformers`` is optional (the ``zoo`` extra, ``pip install 'natgrad[zoo]'``); it is imported
when a builder is called, which raises :class:`natgrad._optional.MissingExtraError` naming the
extra when it is missing. Dropout is off in every config (the Fisher operators need a
deterministic forward); attention is the library's default (``F.scaled_dot_product_attention``)
unless ``attn_implementation`` says otherwise (e.g. ``"eager"``).

Inputs are token ids ``(B, T)`` (``T ≤ length``); the causal LMs return ``logits (B, T, vocab)``,
the classifier ``logits (B, num_labels)``, inside a ``ModelOutput``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._optional import require

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _transformers(feature: str) -> Any:
    return require("transformers", feature)


def _finish(model: nn.Module, attn_implementation: str | None) -> nn.Module:
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def gpt2_tiny(vocab: int = 16, length: int = 8, dim: int = 8, layers: int = 2, heads: int = 2,
              attn_implementation: str | None = None) -> nn.Module:
    """``GPT2LMHeadModel`` with tied input and output embeddings (``lm_head.weight`` is
    ``transformer.wte.weight``); its projections are transformers' ``Conv1D``."""
    tf = _transformers("the GPT-2 zoo model")
    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=dim, n_layer=layers,
                        n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    return _finish(tf.GPT2LMHeadModel(cfg), attn_implementation)


def bert_tiny(vocab: int = 16, length: int = 8, dim: int = 8, layers: int = 1, heads: int = 2,
              num_labels: int = 3, attn_implementation: str | None = None) -> nn.Module:
    """``BertForSequenceClassification`` (word, position and token-type embeddings, post-norm
    encoder layers, a tanh pooler and a linear classifier)."""
    tf = _transformers("the BERT zoo model")
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * dim,
                        max_position_embeddings=length, type_vocab_size=2,
                        num_labels=num_labels, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return _finish(tf.BertForSequenceClassification(cfg), attn_implementation)


def llama_tiny(vocab: int = 16, length: int = 8, dim: int = 8, layers: int = 1, heads: int = 2,
               kv_heads: int = 1, attn_implementation: str | None = None) -> nn.Module:
    """``LlamaForCausalLM``: RMSNorm (scale only, computed in float32 whatever the model's
    dtype), rotary positions, grouped-query attention (``kv_heads`` key/value heads), a SwiGLU
    MLP and an untied output head."""
    tf = _transformers("the Llama zoo model")
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=length,
                         tie_word_embeddings=False, attention_dropout=0.0)
    return _finish(tf.LlamaForCausalLM(cfg), attn_implementation)
