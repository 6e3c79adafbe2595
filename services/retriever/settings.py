"""Retriever settings (environment variables prefixed RAGTUNE_RETRIEVER_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings
from services.retriever.domain import EmbeddingPrecision


class RetrieverSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_RETRIEVER_", extra="ignore", frozen=True)

    port: int = Field(50052, ge=0, le=65535)
    backend: Literal["lancedb", "weaviate"] = Field(
        "lancedb", description="Vector store: the embedded on-disk LanceDB (default) or a Weaviate server."
    )
    weaviate_url: str | None = Field(
        None,
        validation_alias="WEAVIATE_URL",
        description="Weaviate HTTP endpoint (e.g. http://weaviate:8080) when backend=weaviate.",
    )
    weaviate_grpc_port: int = Field(50051, ge=1, le=65535, description="Weaviate's gRPC port.")
    weaviate_api_key: SecretStr | None = Field(
        None,
        validation_alias="WEAVIATE_API_KEY",
        description="API key for a Weaviate that requires authentication (the manifests' Weaviate does).",
    )
    weaviate_vector_index: Literal["dynamic", "hnsw"] = Field(
        "dynamic",
        description="Vector index of new Weaviate collections: dynamic (flat per tenant, HNSW from ann_min_chunks "
        "on; needs the server's ASYNC_INDEXING=true, else falls back to hnsw) or hnsw.",
    )
    data_dir: Path | None = Field(None, description="LanceDB folder; default <RAGTUNE_HOME>/retriever.")
    max_document_bytes: int = Field(1_000_000, ge=1, description="Largest document text accepted, in UTF-8 bytes.")
    max_batch_documents: int = Field(
        256, ge=1, description="Most documents in one UpsertDocuments or Ingest message; also the most per Ingest commit batch."
    )
    ingest_batch_bytes: int = Field(
        262_144,
        ge=1,
        description="An Ingest stream cuts a commit batch (whole messages) once it holds this much text; the next "
        "batch is embedded while the last is written.",
    )
    ingest_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower the CPU priority of ingest embedding is than that of search queries "
        "(0: the same), so searches stay fast while an ingest runs.",
    )
    background_cpu: Literal["idle", "nice"] = Field(
        "idle",
        description="CPU class of ingest embedding and of the embedded store's index jobs: idle puts them in Linux's "
        "SCHED_IDLE class (they run on cores no search wants; during a 10k-document ingest at 1M chunks search p95 "
        "fell by 9 ms), nice only lowers their priority by ingest_nice / index_nice.",
    )
    max_top_k: int = Field(100, ge=1, le=1000, description="Largest top_k a search may ask for.")
    max_embed_texts: int = Field(256, ge=1, le=4096, description="Most texts one Embed call may send.")
    max_filter_values: int = Field(256, ge=1, description="Most values in one in_list filter condition.")
    embedding_batch_size: int = Field(64, ge=1, description="Chunks embedded per forward pass.")
    embedding_precision: EmbeddingPrecision = Field(
        "auto",
        description="Number format the embedding model computes in: auto picks bfloat16 where the CPU has native "
        "bfloat16 instructions (AVX512_BF16 or AMX; measured: queries 1.8x, ingest 2.5x faster, vectors at "
        "cosine >= 0.9999 to float32's), else float32.",
    )
    query_encoder: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="What embeds search queries: onnx runs the model's ONNX export (prepared in RAGTUNE_MODEL_CACHE "
        "by python -m ragtune.models; measured 9.0 ms a 22-token question against 14.2 in torch at bfloat16) in ONNX Runtime, "
        "torch the model itself; auto is onnx where the export is prepared, else torch. onnx without it fails at "
        "start.",
    )
    query_encoder_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Cores one search query's embedding may use in ONNX Runtime (its pool threads never spin; "
        "torch queries always use one). At 1M chunks vector search p95 was 20.3-21.0 ms with 2, 22.0-23.1 with 1.",
    )
    hybrid_candidates: int = Field(
        100, ge=1, description="Hits each of the vector and keyword searches contributes before hybrid fusion."
    )
    ann_min_chunks: int = Field(
        10_000,
        ge=256,
        description="A collection gets an approximate (IVF_HNSW_SQ) vector index once it holds this many chunks; "
        "below it, search is exact.",
    )
    ann_reindex_fraction: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Fold new chunks into the vector index once they exceed this fraction of the collection (and "
        "1,000; the full-text index folds past 1,000); until then they are searched exactly. The vector index is "
        "rebuilt when the collection doubles (or halves).",
    )
    index_quiet_s: float = Field(
        30.0,
        ge=0,
        description="Once a collection with a vector index has had no write for this many seconds, the rows still "
        "unindexed (an ingest that ended below the fold thresholds) are folded into its indexes and small fragments "
        "compacted, so searches at rest use the indexes alone; 0 turns this off.",
    )
    index_nice: int = Field(
        10, ge=0, le=19, description="CPU priority drop (nice) of the background index process of the embedded store."
    )
    ann_ef: int = Field(
        250,
        ge=10,
        le=2000,
        description="Search list of the embedded store's HNSW graphs (the vector index's recall against speed): at "
        "1M chunks, ef 150 / 250 / 400 gave recall@10 0.952 / 0.978 / 0.988 at 6.0 / 7.5 / 10.1 ms in process. "
        "At least twice the hits asked for (hybrid: hybrid_candidates) is always searched.",
    )
    ann_rows_per_partition: int = Field(
        500_000, ge=100, description="Rows per IVF partition the vector index is trained for (rebuilt at 2x drift)."
    )

    @property
    def store_dir(self) -> Path:
        return self.data_dir or self.home / "retriever"
