"""Parameter counts and training compute (C = 6 N D, SGTM.md section 7)."""
from __future__ import annotations


def param_count(size, vocab: int, seq_length: int) -> dict[str, int]:
    """Parameters of the GPT a ``SizeSpec`` builds (tied embeddings, learned positions, biases).

    ``non_embedding`` is the Kaplan-style N used for compute: at the tiny sizes a CPU study
    runs, embeddings are most of the parameters but little of the per-token work.
    """
    d, f, layers = size.hidden_size, size.ffn_hidden_size, size.num_layers
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    embedding = vocab * d + seq_length * d
    non_embedding = layers * per_layer + 2 * d
    return {"total": embedding + non_embedding, "non_embedding": non_embedding,
            "embedding": embedding}


def train_flops(non_embedding_params: int, tokens: int) -> float:
    return 6.0 * float(non_embedding_params) * float(tokens)
