"""Parameter counts and training compute (C = 6 N D, SGTM.md section 7)."""
from __future__ import annotations


def param_count(size, vocab: int, seq_length: int, model=None) -> dict[str, int]:
    """Parameters of the GPT a ``SizeSpec`` builds (or of ``model``, a run's ModelConfig, e.g.
    an MoE entry's), counted by ``sgtm plan``'s exact arithmetic (query groups, gelu/swiglu,
    positions, norms, tied or separate output layer, experts).

    ``non_embedding`` is the Kaplan-style N used for compute: at the tiny sizes a CPU study
    runs, embeddings are most of the parameters but little of the per-token work.
    ``active_non_embedding`` counts what one token uses (top_k of an MoE block's experts):
    the N of an MoE model's compute.
    """
    from ..plan import active_block_params, block_params, embedding_params, head_params

    model = model or size.model_config(vocab, seq_length)
    final_norm = head_params(model, own_output_weight=False)
    output_layer = head_params(model, own_output_weight=not model.tie_embeddings) - final_norm
    non_embedding = sum(block_params(model, i) for i in range(model.num_layers)) + final_norm
    embedding = embedding_params(model) + output_layer
    return {"total": embedding + non_embedding, "non_embedding": non_embedding,
            "embedding": embedding, "active_non_embedding": active_block_params(model) + final_norm}


def train_flops(non_embedding_params: int, tokens: int) -> float:
    return 6.0 * float(non_embedding_params) * float(tokens)
