"""Retriever parts that need no server: chunking, score fusion, filter translation for both backends."""

from __future__ import annotations

import math
import uuid

import pytest

from ragtune.models import embedding_model_path
from services.retriever.backends.lancedb.sql import where_clause
from services.retriever.backends.weaviate_store import (
    chunk_properties,
    chunk_uuid,
    property_name,
    weaviate_collection_name,
    weaviate_filter,
)
from services.retriever.chunking import Chunker
from services.retriever.domain import (
    AllOf,
    AnyOf,
    Between,
    Chunk,
    CollectionSpec,
    Equals,
    FieldType,
    Hit,
    InList,
)
from services.retriever.ranking import relative_score_fusion

SPEC = CollectionSpec(
    "docs", 200, 40,
    {"year": FieldType.INT, "lang": FieldType.STRING, "rating": FieldType.DOUBLE, "public": FieldType.BOOL},
    create_time=__import__("datetime").datetime(2026, 1, 1),
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedding_model_path())


@pytest.fixture(scope="module")
def chunker(tokenizer):
    return Chunker(tokenizer)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- chunking ------------------------------------------------------------------------------------
def test_chunks_respect_size_and_overlap_and_cover_the_text(chunker, tokenizer):
    text = "\n\n".join(
        " ".join(f"Paragraph {p} sentence {s} mentions item{p}x{s} for the record." for s in range(6)) for p in range(8)
    )
    chunks = chunker.split(text, 60, 12)
    assert len(chunks) > 5
    for c in chunks:
        assert n_tokens(tokenizer, c.text) <= 60
        assert c.text == c.text.strip() and c.text in text
    for previous, current in zip(chunks, chunks[1:]):
        overlap = previous.end_token - current.start_token
        assert 0 < overlap <= 12
    # Every word of the text is in some chunk.
    covered = set(" ".join(c.text for c in chunks).split())
    assert set(text.split()) <= covered


def test_chunks_prefer_paragraph_then_sentence_boundaries(chunker, tokenizer):
    first = "Alpha one two three four five six seven."
    second = "Beta one two."
    text = f"{first}\n\n{second} Gamma one two three."
    assert [c.text for c in chunker.split(text, 60, 0)] == [text]
    # The window reaches past the sentence that follows the paragraph break, yet the break wins.
    size = n_tokens(tokenizer, first) + n_tokens(tokenizer, second) + 2
    chunks = chunker.split(text, size, 0)
    assert chunks[0].text == first
    assert chunks[1].text.startswith("Beta")
    # Within one paragraph the break falls after a full stop.
    chunks = chunker.split(f"{first} {first} {first}", 22, 0)
    assert len(chunks) == 2
    assert all(c.text.endswith(".") for c in chunks)


def test_a_sentence_longer_than_a_chunk_is_split_at_words(chunker, tokenizer):
    text = " ".join(["word"] * 50)
    chunks = chunker.split(text, 16, 4)
    assert all(n_tokens(tokenizer, c.text) <= 16 for c in chunks)
    assert all(set(c.text.split()) == {"word"} for c in chunks)
    assert chunks[-1].end_token == 50


def test_chunking_rejects_overlap_not_below_size(chunker):
    with pytest.raises(ValueError):
        chunker.split("text", 10, 10)


# ---- fusion --------------------------------------------------------------------------------------
def _hit(cid: str, score: float) -> Hit:
    return Hit(cid, cid, 0, cid, {}, score)


def test_relative_score_fusion_matches_weaviate_formula():
    vector = [_hit("a", 0.9), _hit("b", 0.7), _hit("c", 0.5)]
    keyword = [_hit("c", 12.0), _hit("d", 6.0), _hit("a", 2.0)]
    fused = {h.chunk_id: h.score for h in relative_score_fusion(vector, keyword, 0.25, 10)}
    # a: vector 1.0, keyword 0.0; b: 0.5, absent; c: 0.0, 1.0; d: absent, 0.4
    assert fused == pytest.approx({"a": 0.25, "b": 0.125, "c": 0.75, "d": 0.3})
    assert [h.chunk_id for h in relative_score_fusion(vector, keyword, 0.25, 2)] == ["c", "d"]
    assert [h.chunk_id for h in relative_score_fusion(vector, [], 1.0, 3)] == ["a", "b", "c"]
    assert [h.chunk_id for h in relative_score_fusion([_hit("x", 3.0)], [], 0.5, 3)] == ["x"]


# ---- LanceDB filter translation ------------------------------------------------------------------
def test_lancedb_where_clause():
    tree = AllOf((
        Equals("lang", "it's"),
        AnyOf((Between("year", gte=2000, lt=2010), InList("rating", (1.5, 2.0)))),
        Equals("public", True),
    ))
    assert where_clause(tree) == (
        "(`m_lang` = 'it''s' AND ((`m_year` >= 2000 AND `m_year` < 2010) OR `m_rating` IN (1.5, 2.0)) "
        "AND `m_public` = true)"
    )
    with pytest.raises(ValueError):
        where_clause(Equals("rating", math.inf))


# ---- Weaviate client-side code -------------------------------------------------------------------
def test_weaviate_collection_names_are_valid_and_injective():
    names = ["docs", "Docs", "a_d", "a-d", "a__d", "a-_d", "x-y_z"]
    mapped = [weaviate_collection_name(n) for n in names]
    assert len(set(mapped)) == len(names)
    assert all(m[0].isupper() and m.replace("_", "").isalnum() for m in mapped)


def _describe(f):
    """A weaviate-client filter as nested tuples, to compare whole trees."""
    from weaviate.collections.classes.filters import _FilterAnd, _FilterOr

    if isinstance(f, _FilterAnd):
        return ("and", tuple(_describe(c) for c in f.filters))
    if isinstance(f, _FilterOr):
        return ("or", tuple(_describe(c) for c in f.filters))
    return (f.target, f.operator.value, f.value)


def test_weaviate_filter_translation():
    tree = AllOf((
        Equals("lang", "en' OR '1'='1"),
        AnyOf((Between("year", gt=2000, lte=2010), InList("lang", ("de", "fr")))),
        Between("rating", gte=4.0),
    ))
    assert _describe(weaviate_filter(tree, SPEC)) == (
        "and",
        (
            ("m_lang_string", "Equal", "en' OR '1'='1"),
            ("or", (
                ("and", (("m_year_int", "GreaterThan", 2000), ("m_year_int", "LessThanEqual", 2010))),
                ("or", (("m_lang_string", "Equal", "de"), ("m_lang_string", "Equal", "fr"))),
            )),
            ("m_rating_double", "GreaterThanEqual", 4.0),
        ),
    )


def test_weaviate_objects_carry_typed_properties_and_stable_ids():
    chunk = Chunk("doc-1", 2, "text", [0.1] * 3, {"year": 2001, "public": False}, "hash-a")
    assert chunk_properties(chunk, SPEC) == {
        "chunk_id": "doc-1#2", "document_id": "doc-1", "chunk_index": 2, "text": "text",
        "content_hash": "hash-a", "m_year_int": 2001, "m_public_bool": False,
    }
    assert chunk_uuid(chunk) == chunk_uuid(Chunk("doc-1", 2, "other", [0.0] * 3, {}, "hash-a"))
    assert chunk_uuid(chunk) != chunk_uuid(Chunk("doc-1", 2, "text", [0.1] * 3, {}, "hash-b"))
    assert isinstance(chunk_uuid(chunk), uuid.UUID)
    assert property_name("year", FieldType.INT) != property_name("year", FieldType.STRING)


# ---- LanceDB index maintenance policy ------------------------------------------------------------
def test_index_policy_builds_folds_and_rebuilds_on_drift():
    from services.retriever.backends.lancedb.index import Action, IndexPolicy, IndexState

    policy = IndexPolicy(min_rows=10_000, rows_per_partition=50_000, fold_fraction=0.05, fold_min_rows=1_000)
    plan = lambda **kw: policy.plan(IndexState(**kw))[0]  # noqa: E731
    # Small: exact search; only the full-text index is folded, once more than a tenth of the rows (at least 100,
    # at most 1,000) are missing from it.
    assert plan(rows=5_000, vector_partitions=None, fts_unindexed=500) is Action.NONE
    assert plan(rows=5_000, vector_partitions=None, fts_unindexed=501) is Action.OPTIMIZE
    assert plan(rows=600, vector_partitions=None, fts_unindexed=600) is Action.OPTIMIZE
    assert plan(rows=600, vector_partitions=None, fts_unindexed=100) is Action.NONE
    assert plan(rows=90, vector_partitions=None, fts_unindexed=90) is Action.NONE
    assert plan(rows=9_000, vector_partitions=None, fts_unindexed=1_000) is Action.OPTIMIZE
    assert plan(rows=50_000, vector_partitions=1, fts_unindexed=1_000) is Action.NONE  # capped at 1,000
    assert plan(rows=10_000, vector_partitions=None, fts_unindexed=0) is Action.BUILD
    # Indexed: unindexed vector rows are folded in once they pass 5% (and 1,000); full-text ones past 1,000.
    assert plan(rows=60_000, vector_partitions=1, vector_unindexed=2_900, fts_unindexed=900) is Action.NONE
    assert plan(rows=60_000, vector_partitions=1, vector_unindexed=3_100) is Action.OPTIMIZE
    assert plan(rows=1_000_000, vector_partitions=20, vector_unindexed=1_500, fts_unindexed=1_500) is Action.OPTIMIZE
    # Partitions drift: twice the rows they were trained for (or half) means a rebuild.
    assert plan(rows=99_999, vector_partitions=1) is Action.NONE
    assert plan(rows=100_000, vector_partitions=1) is Action.BUILD
    assert plan(rows=1_000_000, vector_partitions=16) is Action.NONE
    assert plan(rows=1_600_000, vector_partitions=16) is Action.BUILD
    assert plan(rows=400_000, vector_partitions=16) is Action.BUILD  # shrunk by deletes
    assert policy.partitions_for(1_000_000) == 20 and policy.partitions_for(5_000) == 1
    # Quiet (no write for quiet_s): whatever is left unindexed is folded, where there is a vector index.
    quiet = lambda **kw: policy.plan(IndexState(**kw), quiet=True)[0]  # noqa: E731
    assert quiet(rows=60_000, vector_partitions=1, vector_unindexed=40, fts_unindexed=40) is Action.OPTIMIZE
    assert quiet(rows=60_000, vector_partitions=1, fts_unindexed=3) is Action.OPTIMIZE
    assert quiet(rows=60_000, vector_partitions=1) is Action.NONE
    assert quiet(rows=5_000, vector_partitions=None, fts_unindexed=40) is Action.NONE  # small: exact is cheap


def test_weaviate_vector_index_is_dynamic_with_the_embedded_threshold():
    from services.retriever.backends.weaviate_store import vector_index_config

    dynamic = vector_index_config("dynamic", 10_000)
    assert dynamic.threshold == 10_000
    assert dynamic.flat.distance.value == dynamic.hnsw.distance.value == "cosine"
    assert dynamic.hnsw.ef == -1 and dynamic.hnsw.dynamicEfMin == 100  # dynamic ef: recall scales with top_k
    hnsw = vector_index_config("hnsw", 10_000)
    assert type(hnsw).__name__ == "_VectorIndexConfigHNSWCreate"


def test_query_embedding_matches_sentence_transformers_and_the_ingest_path():
    """Queries are embedded without SentenceTransformer.encode and chunks from token ids: both must give the
    model's own vectors, or searches would drift from what was ingested. Texts of different lengths share a
    padded batch."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from services.retriever.embedding import Embedder

    texts = ["a small cat", "The Treaty of Westphalia ended the Thirty Years' War in 1648.", "kitten " * 40]
    embedder = Embedder(embedding_model_path(), batch_size=2, precision="float32")
    reference = SentenceTransformer(str(embedding_model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    ours = embedder.embed(texts)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() < 1e-5
    ids = [embedder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert np.abs(embedder.embed_token_ids(ids) - reference).max() < 1e-5
    assert embedder.embed([]).shape == (0, 384)

    # bfloat16 (forced, so the check runs on any CPU): unit-length float32 vectors pointing where float32's do.
    half = Embedder(embedding_model_path(), batch_size=2, precision="bfloat16")
    assert half.precision == "bfloat16"
    for vectors in (half.embed(texts), half.embed_token_ids(ids)):
        assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert (vectors * reference).sum(axis=1).min() > 0.999


def test_the_onnx_query_encoder_gives_the_models_own_vectors():
    """Search queries run through ONNX Runtime (the export scripts/setup.sh prepared): the vectors must be the
    model's, or searches would drift from what torch ingested; without the export, queries go through torch."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from ragtune.models import query_encoder_path
    from services.retriever.embedding import Embedder

    texts = ["a small cat", "The Treaty of Westphalia ended the Thirty Years' War in 1648.", "kitten " * 40]
    reference = SentenceTransformer(str(embedding_model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    path = query_encoder_path()
    assert path is not None and path.is_file(), "run scripts/setup.sh: the model cache has no query encoder"
    onnx = Embedder(embedding_model_path(), precision="float32", query_encoder=path)
    assert onnx.query_runtime == "onnxruntime"
    ours = np.stack([onnx.embed_query(t) for t in texts])
    assert ours.dtype == np.float32 and np.abs(ours - reference).max() < 1e-5
    # Split across two cores (RAGTUNE_RETRIEVER_QUERY_ENCODER_THREADS), a query gets the same vector.
    split = Embedder(embedding_model_path(), precision="float32", query_encoder=path, query_threads=2)
    assert np.abs(np.stack([split.embed_query(t) for t in texts]) - reference).max() < 1e-5
    assert (onnx.query_threads, split.query_threads) == (1, 2)
    plain = Embedder(embedding_model_path(), precision="float32", query_threads=2)
    assert plain.query_runtime == "torch" and plain.query_threads == 1  # torch queries keep one core
    assert np.abs(plain.embed_query(texts[1]) - reference[1]).max() < 1e-5
    # Past the model's own 256-token window (chunks may hold 512) both read the same tokens, cut alike.
    long = "kitten sat on the warm mat " * 120
    assert np.abs(onnx.embed_query(long) - plain.embed_query(long)).max() < 1e-5


def test_the_query_encoder_is_exported_once_readable_by_all_and_only_for_the_installed_model(tmp_path, monkeypatch):
    import json
    import stat

    from ragtune import models
    from services.retriever.server import query_encoder
    from services.retriever.settings import RetrieverSettings

    monkeypatch.setenv("RAGTUNE_MODEL_CACHE", str(tmp_path))
    assert models.query_encoder_path(tmp_path) is None
    assert query_encoder(RetrieverSettings(query_encoder="auto")) is None  # auto: torch then
    with pytest.raises(RuntimeError, match="RAGTUNE_RETRIEVER_QUERY_ENCODER=onnx .* python -m ragtune.models"):
        query_encoder(RetrieverSettings(query_encoder="onnx"))

    path = models.prepare_query_encoder(tmp_path)
    assert path == models.query_encoder_path(tmp_path) and path.stat().st_size > 80_000_000
    # The images prepare models as root and serve them as another user.
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755 and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [models.QUERY_ENCODER_DIR]  # no staging folder left
    written = path.stat().st_mtime_ns
    assert models.prepare_query_encoder(tmp_path) == path and path.stat().st_mtime_ns == written  # once
    assert query_encoder(RetrieverSettings(query_encoder="onnx")) == path
    assert query_encoder(RetrieverSettings(query_encoder="torch")) is None

    # An export of another version of the model package is not used (and the next prepare replaces it).
    marker = path.parent / "ragtune-prepared.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "source_version": "0.0.1"}))
    assert models.query_encoder_path(tmp_path) is None
    assert query_encoder(RetrieverSettings(query_encoder="auto")) is None


def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(tmp_path):
    import pytest

    from services.retriever.embedding import cpu_has_native_bfloat16, resolve_precision

    def cpuinfo(flags: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
        return path

    assert cpu_has_native_bfloat16(cpuinfo("fpu sse avx2 avx512f avx512_bf16 avx512_vnni"))
    assert cpu_has_native_bfloat16(cpuinfo("fpu avx2 amx_bf16 amx_tile"))
    assert not cpu_has_native_bfloat16(cpuinfo("fpu sse avx2 avx512f avx512_vnni"))
    assert not cpu_has_native_bfloat16(tmp_path / "missing")
    assert resolve_precision("float32") == "float32" and resolve_precision("bfloat16") == "bfloat16"
    assert resolve_precision("auto") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int4")


def test_a_bad_embedding_precision_is_refused_naming_the_variable(monkeypatch):
    import pytest
    from pydantic import ValidationError

    from ragtune.settings import settings_errors
    from services.retriever.settings import RetrieverSettings

    monkeypatch.setenv("RAGTUNE_RETRIEVER_EMBEDDING_PRECISION", "int8")
    with pytest.raises(ValidationError) as caught:
        RetrieverSettings()
    assert settings_errors(RetrieverSettings, caught.value) == [
        "RAGTUNE_RETRIEVER_EMBEDDING_PRECISION='int8': Input should be 'auto', 'float32' or 'bfloat16'"]
    monkeypatch.setenv("RAGTUNE_RETRIEVER_EMBEDDING_PRECISION", "bfloat16")
    assert RetrieverSettings().embedding_precision == "bfloat16"


@pytest.mark.parametrize(
    "field, default, bad, message",
    [
        ("query_encoder", "auto", "tensorrt", "Input should be 'auto', 'onnx' or 'torch'"),
        ("ann_ef", 250, "5", "Input should be greater than or equal to 10"),
        ("query_encoder_threads", 2, "0", "Input should be greater than or equal to 1"),
        ("background_cpu", "idle", "batch", "Input should be 'idle' or 'nice'"),
        ("index_quiet_s", 30.0, "-1", "Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_retriever_setting_is_refused_naming_the_variable(monkeypatch, field, default, bad, message):
    from pydantic import ValidationError

    from ragtune.settings import settings_errors
    from services.retriever.settings import RetrieverSettings

    assert getattr(RetrieverSettings(), field) == default
    variable = f"RAGTUNE_RETRIEVER_{field.upper()}"
    monkeypatch.setenv(variable, bad)
    with pytest.raises(ValidationError) as caught:
        RetrieverSettings()
    assert settings_errors(RetrieverSettings, caught.value) == [f"{variable}={bad!r}: {message}"]


def test_ingest_threads_move_to_the_idle_cpu_class_and_their_threads_inherit_it():
    """SCHED_IDLE for the ingest thread and the compute threads it starts (torch's OpenMP pool), not for others."""
    import os
    import threading

    from services.retriever.embedding import lower_thread_priority

    seen = {}

    def policy() -> int:
        return os.sched_getscheduler(threading.get_native_id())

    def ingest_thread() -> None:
        lower_thread_priority(3, idle=True)
        seen["ingest"] = policy()
        started = threading.Thread(target=lambda: seen.__setitem__("started", policy()))
        started.start()
        started.join()

    def plain_nice() -> None:
        lower_thread_priority(3)
        seen["nice only"] = policy()

    for target in (ingest_thread, plain_nice):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen == {"ingest": os.SCHED_IDLE, "started": os.SCHED_IDLE, "nice only": os.SCHED_OTHER}
    assert policy() == os.SCHED_OTHER  # the caller's own thread is untouched
