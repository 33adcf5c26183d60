"""Parameter counts and training compute (C = 6 N D, SGTM.md section 7)."""
from __future__ import annotations


def param_count(size, vocab: int, seq_length: int) -> dict[str, int]:
    """Parameters of the GPT a ``SizeSpec`` builds (linear biases, no output bias), for its
    architecture keys: query groups, gelu/swiglu, learned/rope positions, LayerNorm/RMSNorm,
    tied or separate output embeddings.

    ``non_embedding`` is the Kaplan-style N used for compute: at the tiny sizes a CPU study
    runs, embeddings are most of the parameters but little of the per-token work.
    """
    d, f, layers = size.hidden_size, size.ffn_hidden_size, size.num_layers
    heads = size.num_attention_heads
    groups = getattr(size, "num_query_groups", None) or heads
    head_dim = d // heads
    qkv_out = (heads + 2 * groups) * head_dim
    fc1_out = f * (2 if getattr(size, "activation", "gelu") == "swiglu" else 1)
    norm = d * (1 if getattr(size, "normalization", "LayerNorm") == "RMSNorm" else 2)
    attention = (d * qkv_out + qkv_out) + (heads * head_dim * d + d)
    mlp = (d * fc1_out + fc1_out) + (f * d + d)
    per_layer = attention + mlp + 2 * norm
    embedding = vocab * d
    if getattr(size, "position_embedding", "learned") == "learned":
        embedding += seq_length * d
    if not getattr(size, "tie_embeddings", True):
        embedding += vocab * d  # the separate output layer
    non_embedding = layers * per_layer + norm
    return {"total": embedding + non_embedding, "non_embedding": non_embedding,
            "embedding": embedding}


def train_flops(non_embedding_params: int, tokens: int) -> float:
    return 6.0 * float(non_embedding_params) * float(tokens)
