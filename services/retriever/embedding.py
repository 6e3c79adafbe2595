"""Embeds text with the packaged all-MiniLM-L6-v2 through sentence-transformers: batched, unit-length vectors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from services.retriever.domain import MAX_CHUNK_TOKENS


class Embedder:
    """Loads the model once; `embed` is thread-safe (one forward pass at a time: the 2 cores are the limit anyway)."""

    def __init__(self, model_path: Path, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)
        # Chunks may be up to MAX_CHUNK_TOKENS long; embed them whole rather than silently truncating.
        self._model.max_seq_length = MAX_CHUNK_TOKENS
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self.dimension = int(self._model.get_embedding_dimension())

    @property
    def tokenizer(self):
        return self._model.tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                texts,
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return vectors.astype(np.float32, copy=False)
