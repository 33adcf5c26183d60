"""Parameter counts and training compute (C = 6 N D, SGTM.md section 7)."""
from __future__ import annotations


def param_count(size, vocab: int, seq_length: int) -> dict[str, int]:
    """Parameters of the GPT a ``SizeSpec`` builds, counted by ``sgtm plan``'s exact
    arithmetic on the size's model config (query groups, gelu/swiglu, positions, norms, tied
    or separate output layer).

    ``non_embedding`` is the Kaplan-style N used for compute: at the tiny sizes a CPU study
    runs, embeddings are most of the parameters but little of the per-token work.
    """
    from ..plan import embedding_params, head_params, layer_params

    model = size.model_config(vocab, seq_length)
    final_norm = head_params(model, own_output_weight=False)
    output_layer = head_params(model, own_output_weight=not model.tie_embeddings) - final_norm
    non_embedding = model.num_layers * layer_params(model) + final_norm
    embedding = embedding_params(model) + output_layer
    return {"total": embedding + non_embedding, "non_embedding": non_embedding,
            "embedding": embedding}


def train_flops(non_embedding_params: int, tokens: int) -> float:
    return 6.0 * float(non_embedding_params) * float(tokens)
