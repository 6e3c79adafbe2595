"""Embeds text with the packaged all-MiniLM-L6-v2: queries through sentence-transformers, ingest from token ids.

Ingest reuses the token ids the chunker already produced (one tokenizer pass per document) and runs the
transformer directly with sentence-transformers' own pipeline for this model (mean pooling over the
attention mask, then L2 normalisation), in length-sorted batches so little compute goes to padding.

The transformer runs in bfloat16 where the CPU computes it natively (`precision="auto"`): measured here
(AMD EPYC with AVX512_BF16), a search query's embedding took 4.7 ms instead of 8.5 and ingest embedded 82
chunks/s instead of 33 (200-token chunks, two cores), with vectors at cosine >= 0.9999 to float32's. Pooling
and normalisation stay in float32. Without native support bfloat16 is emulated and slower, so auto keeps
float32 there.

Search queries go through ONNX Runtime instead where the model cache holds the model's ONNX export
(`python -m ragtune.models`, `query_encoder`): one short query took 4.8 ms there against 8.9 in torch at
bfloat16 (one core each; a 22-token Jeopardy question 9.0 against 14.2 in the service at 1M chunks), at
float32 (cosine 0.9999999 to torch's float32 vector). Its int8 quantization (per channel, 3.9 ms) was
dropped: it changed 12.5% of a question's exact top 10 at 1M chunks, and so was weight-only 8-bit
(MatMulNBits, blocks of 32: 5.3 ms against 5.5, cosine 0.9996). Ingest stays on torch, which embeds
200-token batches twice as fast as ONNX Runtime at bfloat16. A query may use two cores
(`query_threads`; its pool threads never spin): 4.2-4.5 ms instead of 5.4-5.8 alone (3.3 if they spun), and at 1M chunks in the service vector search p95 fell
from 22.0-23.1 to 20.3-21.0 ms.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence, get_args

import numpy as np

from services.retriever.domain import MAX_CHUNK_TOKENS, EmbeddingPrecision


PRECISIONS = get_args(EmbeddingPrecision)
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises bfloat16 dot products (x86 AVX512_BF16 or AMX); False where it cannot tell."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return bool(_NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_precision(precision: str) -> str:
    """float32 or bfloat16: auto picks bfloat16 only where the CPU computes it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if cpu_has_native_bfloat16() else "float32"
    return precision


class Embedder:
    """Loads the model once. `embed` (queries) and `embed_token_ids` (ingest) may run at the same time from
    different threads: inference needs no lock, and a query must never queue behind an ingest batch."""

    def __init__(
        self, model_path: Path, batch_size: int = 64, precision: str = "auto", query_encoder: Path | None = None,
        query_threads: int = 1,
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        self._model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)
        # Chunks may be up to MAX_CHUNK_TOKENS long; embed them whole rather than silently truncating.
        self._model.max_seq_length = MAX_CHUNK_TOKENS
        self._model.eval()
        self._transformer = self._model[0].auto_model
        self.precision = resolve_precision(precision)
        if self.precision == "bfloat16":
            self._transformer.to(torch.bfloat16)
        tokenizer = self._model.tokenizer
        self._cls, self._sep, self._pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self._batch_size = batch_size
        self._bulk_lock = threading.Lock()  # one ingest batch at a time: two would only split the cores
        self.dimension = int(self._model.get_embedding_dimension())
        self._onnx = _onnx_session(query_encoder, query_threads) if query_encoder else None
        self.query_runtime = "onnxruntime" if self._onnx else "torch"
        self.query_threads = query_threads if self._onnx else 1  # torch queries: single_threaded_inference

    @property
    def tokenizer(self):
        return self._model.tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length vectors of short texts (search queries): tokenizes them itself.

        The same pipeline as `SentenceTransformer.encode` (at float32, identical vectors to 1e-7), called directly: encode's
        own bookkeeping cost a search query 2 ms of its 11 here."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        torch = self._torch
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self._batch_size):
                batch = texts[start : start + self._batch_size]
                encoded = self._model.tokenizer(
                    batch, padding=True, truncation=True, max_length=self._model.max_seq_length, return_tensors="pt"
                )
                out[start : start + len(batch)] = self._pool(
                    self._transformer(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]),
                    encoded["attention_mask"],
                )
        return out

    def _pool(self, output, mask) -> np.ndarray:
        return mean_pool(output.last_hidden_state.float().numpy(), mask.numpy())

    def embed_query(self, text: str) -> np.ndarray:
        """The unit-length vector of one search query: through ONNX Runtime where the export was loaded."""
        if self._onnx is None:
            return self.embed([text])[0]
        encoded = self._model.tokenizer(
            [text], truncation=True, max_length=self._model.max_seq_length, return_tensors="np"
        )
        ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
        (hidden,) = self._onnx.run(None, {"input_ids": ids, "attention_mask": mask})
        return mean_pool(hidden, mask)[0]

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens the model reads of each text (with its special tokens, after truncation to its window)."""
        encoded = self._model.tokenizer(
            texts, truncation=True, max_length=self._model.max_seq_length, add_special_tokens=True
        )["input_ids"]
        return [len(ids) for ids in encoded]

    def embed_token_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit-length vectors of already tokenized chunks (ids without special tokens), in input order."""
        out = np.zeros((len(sequences), self.dimension), dtype=np.float32)
        if not sequences:
            return out
        torch = self._torch
        limit = MAX_CHUNK_TOKENS - 2  # room for [CLS] and [SEP], as the tokenizer would truncate
        # Longest first: the batch shapes shrink as we go and padding stays small.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        with self._bulk_lock, torch.inference_mode():
            for start in range(0, len(order), self._batch_size):
                rows = order[start : start + self._batch_size]
                width = min(len(sequences[rows[0]]), limit) + 2
                ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    seq = [self._cls, *sequences[i][:limit], self._sep]
                    ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[r, : len(seq)] = 1
                out[rows] = self._pool(self._transformer(input_ids=ids, attention_mask=mask), mask)
        return out


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the real tokens, then unit length: this model's sentence-transformers pooling (float32)."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden.astype(np.float32) * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _onnx_session(path: Path, threads: int = 1):
    """An ONNX Runtime session whose calls each use up to `threads` cores (the calling thread and threads - 1
    pool threads shared by concurrent calls).

    The pool's threads do not spin while they wait for work: spinning kept a second core busy between a
    query's operators, which on a 2-core machine is the core the rest of the service (gRPC, the store, the
    other side of a hybrid search) needs. A parallel section does not wait on pool threads that have not
    started its work: the calling thread runs what they leave, so a busy core slows a query down to one core's
    speed and no further (unlike OpenMP's barriers, see single_threaded_inference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def single_threaded_inference() -> None:
    """For the calling thread only (OpenMP settings are per thread): run each forward pass on one core.

    A query is a tiny forward pass; splitting it across OpenMP threads only adds barrier waits, and those
    explode when the cores are busy: measured on the loaded 2-core machine, query embedding p50 68 ms,
    p95 670 ms with two threads against 17 ms and 23 ms with one. Two such threads serve two queries at once."""
    import torch

    torch.set_num_threads(1)


def lower_thread_priority(increment: int = 10, idle: bool = False) -> None:
    """Makes the calling thread (and the compute threads it starts later, which inherit it) yield the CPU to
    the rest of the process: ingest batches run at a lower priority than search queries.

    With idle=True the thread also moves to Linux's SCHED_IDLE class, which runs only on a core no other
    thread wants (nice 19 still takes a share of a busy core): measured during a 10k-document ingest at 1M
    rows, search p95 fell from 54 to 45 ms (vector) and 38 to 29 ms (keyword), ingest speed within noise.
    Any thread may lower itself into it, root or not."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        if idle:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: ingest then simply competes at the same priority
