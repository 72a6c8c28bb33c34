"""Configuration of the organism's tiny Llama-architecture chat model.

The defaults give a model of about 0.5M parameters (2 MB in fp32) that learns the organism world on a CPU in
about a minute. The real-model code paths (``self_attn.k_proj``/``v_proj`` hooks, KV caches, RoPE) are the same
as for Llama-3.1, so every intervention that runs on the organism also runs on a full-size Llama.
"""

from __future__ import annotations

from transformers import LlamaConfig

from piggy_lightning.organism.tokenizer import IM_END_ID, MODEL_MAX_LENGTH, PAD_ID


def organism_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = MODEL_MAX_LENGTH,
    tie_word_embeddings: bool = True,
    pad_token_id: int = PAD_ID,
    eos_token_id: int = IM_END_ID,
) -> LlamaConfig:
    """Return the :class:`~transformers.LlamaConfig` of the organism model.

    Args:
        vocab_size: Size of the tokenizer vocabulary (``len(tokenizer)``).
        hidden_size: Residual-stream width.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Query heads; the head size is ``hidden_size // num_attention_heads``.
        num_key_value_heads: Key/value heads (grouped-query attention as in Llama-3).
        intermediate_size: Width of the SwiGLU MLP.
        max_position_embeddings: Longest supported sequence.
        tie_word_embeddings: Share the input embedding and the output head.
        pad_token_id: Id of the pad token.
        eos_token_id: Id of the end-of-turn token (``<|im_end|>``), which ends generation.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )


def save_base_config(out_dir: str | None = None) -> None:
    """Write ``config.json`` of the untrained organism beside its tokenizer, for ``init: random`` pretraining."""
    from piggy_lightning.organism.tokenizer import BASE_DIR, load_tokenizer

    out = out_dir or str(BASE_DIR)
    organism_config(len(load_tokenizer())).save_pretrained(out)


if __name__ == "__main__":
    save_base_config()
