"""Small real-text shard directories for tests (byte-level tokens, no tokenizer training).

Writes exactly the format of ``sgtm prep`` (token + label IndexedDatasets, truth and score
arrays, manifest last) so the training, checkpoint and evaluation tests exercise the real
reader without paying for a full prep run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

ENGLISH = [
    "The river carried the melting snow down from the mountains every spring.",
    "Bread rises because yeast turns sugar into gas and a little alcohol.",
    "The library opens early on weekdays and closes late on Fridays.",
    "A train left the station at noon and reached the coast by evening.",
    "Children learn to read by hearing stories long before they can spell.",
    "The old bridge was rebuilt in stone after the flood destroyed it.",
    "Farmers in the valley grow wheat, barley and a few kinds of apples.",
    "The museum keeps maps that sailors drew more than three centuries ago.",
    "Heavy clouds gathered over the hills, and soon it began to rain.",
    "She wrote letters to her brother every week while he was abroad.",
    "The city council voted to plant trees along the main avenue.",
    "Most birds in the park build their nests high in the old oaks.",
]
SPANISH = [
    "El río llevaba la nieve derretida desde las montañas cada primavera.",
    "El pan sube porque la levadura convierte el azúcar en gas.",
    "La biblioteca abre temprano entre semana y cierra tarde los viernes.",
    "Un tren salió de la estación al mediodía y llegó a la costa de noche.",
    "Los niños aprenden a leer escuchando cuentos antes de saber escribir.",
    "El puente viejo fue reconstruido en piedra después de la inundación.",
    "Los campesinos del valle cultivan trigo, cebada y algunas manzanas.",
    "El museo guarda mapas que dibujaron marineros hace tres siglos.",
    "Nubes pesadas cubrieron las colinas y pronto empezó a llover.",
    "Ella escribía cartas a su hermano cada semana mientras él viajaba.",
    "El ayuntamiento decidió plantar árboles a lo largo de la avenida.",
    "Casi todos los pájaros del parque anidan en los robles viejos.",
]
EOD, GOOD, BAD = 256, 257, 258
VOCAB = 260  # 256 byte values, end-of-document, the two control tokens, one spare


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [EOD]


def _write_indexed(prefix: Path, docs: list[np.ndarray], dtype) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix.with_suffix(".bin")), dtype=dtype)
    for doc in docs:
        builder.add_document(torch.from_numpy(np.asarray(doc, dtype=dtype)), [len(doc)])
    builder.finalize(str(prefix.with_suffix(".idx")))


def write_split(directory: Path, split: str, texts: list[str], labels: list[int],
                truth: list[int]) -> int:
    docs = [np.array(encode(t), dtype=np.uint16) for t in texts]
    _write_indexed(directory / f"{split}_tokens", docs, np.uint16)
    _write_indexed(directory / f"{split}_labels",
                   [np.full(len(d), lab, dtype=np.uint8) for d, lab in zip(docs, labels)],
                   np.uint8)
    np.save(directory / f"{split}_truth.npy", np.asarray(truth, dtype=np.uint8))
    np.save(directory / f"{split}_scores.npy", np.asarray(truth, dtype=np.float32) == 1)
    return int(sum(len(d) for d in docs))


def write_test_shards(directory: str | Path, repeats: int = 4, retain_share: float = 0.25,
                      undiscovered: int = 1) -> Path:
    """English = retain truth, Spanish = forget truth, repeated ``repeats`` times.

    Applied train labels: Spanish documents are forget (2) except ``undiscovered`` per repeat
    (0); a ``retain_share`` of English documents go through the retain path (1)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texts, labels, truth = [], [], []
    for r in range(repeats):
        for i, text in enumerate(ENGLISH):
            texts.append(text)
            labels.append(1 if rng.random() < retain_share else 0)
            truth.append(0)
        for i, text in enumerate(SPANISH):
            texts.append(text)
            labels.append(0 if i < undiscovered else 2)
            truth.append(1)
    order = rng.permutation(len(texts))
    train_tokens = write_split(directory, "train", [texts[i] for i in order],
                               [labels[i] for i in order], [truth[i] for i in order])
    write_split(directory, "test_retain", ENGLISH, [0] * len(ENGLISH), [0] * len(ENGLISH))
    write_split(directory, "test_forget", SPANISH, [0] * len(SPANISH), [1] * len(SPANISH))
    manifest = {
        "format_version": 1,
        "tokenizer": {"path": None, "sha256": hashlib.sha256(b"bytes+eod").hexdigest(),
                      "vocab_size": VOCAB, "eod_id": EOD, "good_id": GOOD, "bad_id": BAD},
        "token_dtype": "uint16",
        "splits": {"train": {"num_docs": len(texts), "num_tokens": train_tokens}},
        "note": "byte-level test shards (megatron_sgtm.data.testing)",
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return directory
