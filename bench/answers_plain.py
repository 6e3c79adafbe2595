"""The plain RAG pipeline the answer benchmark measures ragtune against: fixed 150-word chunks, exact
vector search with the same embedder, the top 3 chunks in a plain prompt, in the benchmark's process."""

from __future__ import annotations

import numpy as np

CHUNK_WORDS = 150
TOP_K = 3


def plain_messages(question: str, chunks: list[str]) -> list[dict[str, str]]:
    context = "\n\n".join(chunks)
    return [{"role": "user", "content": f"Answer the question using the context.\n\nContext:\n{context}\n\n"
                                        f"Question: {question}\nAnswer:"}]


class PlainIndex:
    """Chunks in memory with their unit vectors; search is one matrix product (exact)."""

    def __init__(self):
        from sentence_transformers import SentenceTransformer

        from ragtune.models import embedding_model_path

        self._model = SentenceTransformer(str(embedding_model_path()), device="cpu", local_files_only=True)
        self._docs: list[str] = []
        self._texts: list[str] = []
        self._vectors = np.zeros((0, self._model.get_embedding_dimension()), dtype=np.float32)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=False).astype(np.float32)

    def upsert(self, documents: dict[str, str]) -> int:
        """Adds documents, replacing every chunk of a document id seen before; returns the chunks added."""
        keep = [i for i, d in enumerate(self._docs) if d not in documents]
        docs = [self._docs[i] for i in keep]
        texts = [self._texts[i] for i in keep]
        new_docs, new_texts = [], []
        for doc_id, text in documents.items():
            words = text.split()
            for start in range(0, len(words), CHUNK_WORDS):
                new_docs.append(doc_id)
                new_texts.append(" ".join(words[start:start + CHUNK_WORDS]))
        self._vectors = np.concatenate([self._vectors[keep], self._embed(new_texts)])
        self._docs, self._texts = docs + new_docs, texts + new_texts
        return len(new_texts)

    def search(self, question: str, k: int = TOP_K) -> list[tuple[str, str]]:
        """(document id, chunk text) of the k nearest chunks, nearest first."""
        scores = self._vectors @ self._embed([question])[0]
        best = np.argsort(-scores)[:k]
        return [(self._docs[i], self._texts[i]) for i in best]
