"""Retriever conformance suite: the same cases against every backend, through the real gRPC server.

The embedded LanceDB backend always runs; Weaviate runs when WEAVIATE_URL points at a live server.
"""

from __future__ import annotations

import os

import grpc
import pytest

from services.retriever.server import RetrieverService
from services.retriever.settings import RetrieverSettings
from tests.grpc_support import InProcessServer
from tests.retriever_support import (
    FIELDS,
    Client,
    R,
    all_of,
    any_of,
    cond,
    doc,
    expect_error,
    plain,
    unique_name,
    wiki_articles,
)

pytestmark = pytest.mark.timeout(300)

MAX_DOCUMENT_BYTES = 20_000
MAX_BATCH = 8

SMALL_DOCS = [
    doc("orchestra", "The xylophonist rehearsed with the orchestra every Tuesday evening before the concert.",
        year=2001, lang="en", rating=4.5, public=True),
    doc("cooking", "Simmer the tomatoes with garlic and basil for twenty minutes to make a rich pasta sauce.",
        year=2010, lang="en", rating=3.0, public=False),
    doc("space", "The rocket lifted off from the launch pad and carried the satellite into orbit around Earth.",
        year=2015, lang="de", rating=4.9, public=True),
    doc("garden", "Roses need full sun, well-drained soil and regular pruning to bloom every summer.",
        year=2020, lang="fr", rating=2.5),
]


def settings_for(backend: str, data_dir) -> RetrieverSettings:
    return RetrieverSettings(
        port=0,
        backend=backend,
        data_dir=data_dir,
        max_document_bytes=MAX_DOCUMENT_BYTES,
        max_batch_documents=MAX_BATCH,
        grace_period_s=1,
    )


@pytest.fixture(scope="module", params=["lancedb", "weaviate"])
def server(request, tmp_path_factory):
    if request.param == "weaviate" and not os.environ.get("WEAVIATE_URL"):
        pytest.skip("WEAVIATE_URL not set: no live Weaviate server to run the conformance suite against")
    with InProcessServer(RetrieverService, settings_for(request.param, tmp_path_factory.mktemp("store")), "retriever") as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture()
def tenant(channel) -> Client:
    return Client(channel, unique_name("t"))


@pytest.fixture()
def small(tenant) -> str:
    """A collection holding the four small documents."""
    name = unique_name()
    tenant.create(name)
    assert tenant.upsert(name, *SMALL_DOCS).upserted == 4
    return name


def ids(hits) -> list[str]:
    return [h.document_id for h in hits]


# ---- collections ---------------------------------------------------------------------------------
def test_collection_lifecycle(tenant):
    first, second = "beta-" + unique_name(), "alpha_" + unique_name()
    created = tenant.create(first)
    assert (created.chunking.chunk_tokens, created.chunking.overlap_tokens) == (200, 40)
    assert [(f.name, f.type) for f in created.metadata_fields] == [(f.name, f.type) for f in FIELDS]
    assert created.create_time.seconds > 0
    tenant.create(second, fields=[], chunk_tokens=64, overlap_tokens=8)
    got = tenant.GetCollection(R.GetCollectionRequest(name=second)).collection
    assert (got.name, got.chunking.chunk_tokens, got.chunking.overlap_tokens) == (second, 64, 8)
    listed = tenant.ListCollections(R.ListCollectionsRequest()).collections
    assert [c.name for c in listed] == sorted([first, second])
    expect_error(lambda: tenant.create(first), grpc.StatusCode.ALREADY_EXISTS)

    tenant.DeleteCollection(R.DeleteCollectionRequest(name=first))
    expect_error(lambda: tenant.GetCollection(R.GetCollectionRequest(name=first)), grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: tenant.stats(first), grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: tenant.DeleteCollection(R.DeleteCollectionRequest(name=first)), grpc.StatusCode.NOT_FOUND)
    assert [c.name for c in tenant.ListCollections(R.ListCollectionsRequest()).collections] == [second]
    # The name is free again, and the new collection starts empty.
    tenant.create(first)
    assert tenant.stats(first) == (0, 0)


# ---- upserts -------------------------------------------------------------------------------------
def test_reupsert_replaces_chunks_and_skips_unchanged(tenant):
    name = unique_name()
    tenant.create(name, chunk_tokens=24, overlap_tokens=4)
    long_text = " ".join(f"Sentence number {i} talks about the lighthouse keeper." for i in range(12))
    reply = tenant.upsert(name, doc("a", long_text, year=1), doc("b", "A short note about penguins."))
    assert (reply.upserted, reply.unchanged) == (2, 0)
    assert reply.chunks > 3
    assert tenant.stats(name) == (2, reply.chunks)

    again = tenant.upsert(name, doc("a", long_text, year=1), doc("b", "A short note about penguins."))
    assert (again.upserted, again.unchanged, again.chunks) == (0, 2, 0)
    assert tenant.stats(name) == (2, reply.chunks)

    # Shorter text: its chunks replace all the old ones, no leftovers.
    shorter = tenant.upsert(name, doc("a", "Now only the walrus remains.", year=1))
    assert (shorter.upserted, shorter.chunks) == (1, 1)
    assert tenant.stats(name) == (2, 2)
    assert "lighthouse" not in " ".join(h.text for h in tenant.search(name, "lighthouse keeper", top_k=10))

    # A metadata change alone is a change.
    meta = tenant.upsert(name, doc("a", "Now only the walrus remains.", year=2))
    assert (meta.upserted, meta.unchanged) == (1, 0)
    hit = tenant.search(name, "walrus", mode=R.SEARCH_MODE_KEYWORD)[0]
    assert (hit.document_id, plain(hit.metadata)) == ("a", {"year": 2})
    assert tenant.stats(name) == (2, 2)


def test_invalid_batch_writes_nothing_and_service_keeps_serving(tenant, small):
    before = tenant.stats(small)
    batch = [doc("new-1", "A fine new document."), doc("new-2", "Another one.", colour="red")]
    expect_error(lambda: tenant.upsert(small, *batch), grpc.StatusCode.INVALID_ARGUMENT, "documents[1].metadata[colour]")
    assert tenant.stats(small) == before
    assert "new-1" not in ids(tenant.search(small, "fine new document", mode=R.SEARCH_MODE_KEYWORD))
    assert tenant.upsert(small, batch[0]).upserted == 1
    assert tenant.stats(small) == (before[0] + 1, before[1] + 1)


def test_delete_documents(tenant, small):
    reply = tenant.DeleteDocuments(R.DeleteDocumentsRequest(collection=small, document_ids=["space", "nope"]))
    assert reply.deleted == 1
    assert list(reply.not_found_ids) == ["nope"]
    assert tenant.stats(small) == (3, 3)
    assert "space" not in ids(tenant.search(small, "rocket satellite orbit", top_k=10))


def test_ingest_stream_commits_wiki_articles_in_batches(tenant):
    name = unique_name()
    tenant.create(name, fields=[R.MetadataField(name="title", type=R.METADATA_TYPE_STRING)], chunk_tokens=128)
    articles = wiki_articles(["Climate", "Food", "Country"], max_chars=2500)
    extra = [doc(f"note-{i}", f"Short note number {i} about nothing much.") for i in range(MAX_BATCH + 2)]
    messages = [R.IngestRequest(collection=name, documents=[doc(t, text, title=t)]) for t, text in articles.items()]
    # Later messages may leave the collection out; together they exceed one commit batch.
    messages += [R.IngestRequest(documents=extra[:5]), R.IngestRequest(documents=extra[5:])]
    reply = tenant.Ingest(iter(messages))
    assert (reply.upserted, reply.unchanged) == (len(articles) + len(extra), 0)
    assert (reply.committed, reply.committed_messages) == (len(articles) + len(extra), len(messages))
    docs, chunks = tenant.stats(name)
    assert (docs, chunks) == (len(articles) + len(extra), reply.chunks)
    assert chunks > len(articles) + len(extra)  # the articles span several chunks

    hits = tenant.search(name, "What are staple foods that people eat?", mode=R.SEARCH_MODE_VECTOR, top_k=3)
    assert hits[0].document_id == "Food"
    assert plain(hits[0].metadata) == {"title": "Food"}

    again = tenant.Ingest(iter(messages))
    assert (again.upserted, again.unchanged, again.chunks) == (0, len(articles) + len(extra), 0)
    assert tenant.stats(name) == (docs, chunks)


def test_ingest_stream_rejects_a_change_of_collection(tenant, small):
    other = unique_name()
    tenant.create(other)
    messages = [R.IngestRequest(collection=small, documents=[doc("x", "first")]),
                R.IngestRequest(collection=other, documents=[doc("y", "second")])]
    expect_error(lambda: tenant.Ingest(iter(messages)), grpc.StatusCode.INVALID_ARGUMENT, "messages[1].collection")
    assert tenant.stats(other) == (0, 0)
    assert "x" in ids(tenant.search(small, "first", mode=R.SEARCH_MODE_KEYWORD))  # the valid message before it landed
    expect_error(lambda: tenant.Ingest(iter([])), grpc.StatusCode.INVALID_ARGUMENT, "messages")
    expect_error(
        lambda: tenant.Ingest(iter([R.IngestRequest(collection=unique_name(), documents=[doc("x", "t")])])),
        grpc.StatusCode.NOT_FOUND,
    )
    expect_error(
        lambda: tenant.Ingest(iter([R.IngestRequest(collection="bad name!", documents=[doc("x", "t")])])),
        grpc.StatusCode.INVALID_ARGUMENT, "messages[0].collection",
    )


def _committed(error: grpc.RpcError) -> R.IngestResponse:
    """The IngestResponse packed into a rejected stream's error details."""
    from grpc_status import rpc_status

    for detail in rpc_status.from_call(error).details:
        if detail.Is(R.IngestResponse.DESCRIPTOR):
            reply = R.IngestResponse()
            detail.Unpack(reply)
            return reply
    raise AssertionError("no IngestResponse in the error details")


def test_ingest_stream_with_a_bad_message_keeps_what_was_valid_and_a_retry_skips_it(tenant):
    name = unique_name()
    tenant.create(name, fields=[], chunk_tokens=16, overlap_tokens=2)
    text = "The ferry crosses the bay every hour. " * 6
    per_doc = tenant.upsert(name, doc("probe", text)).chunks
    # Three valid messages (more than one commit batch, the last one still buffered), then a bad one.
    good = [[doc(f"m{m}-{i}", f"{text} Message {m} document {i}.") for i in range(5)] for m in range(3)]
    messages = [R.IngestRequest(collection=name, documents=good[0])]
    messages += [R.IngestRequest(documents=d) for d in good[1:]]
    bad = R.IngestRequest(documents=[doc("later", "fine"), doc("", "no id")])
    error = expect_error(lambda: tenant.Ingest(iter(messages + [bad])), grpc.StatusCode.INVALID_ARGUMENT,
                         "messages[3].documents[1].id")
    committed = _committed(error)
    assert (committed.committed_messages, committed.committed, committed.upserted) == (3, 15, 15)
    assert tenant.stats(name)[0] == 16  # the probe and every valid document; nothing of the bad message
    assert "later" not in ids(tenant.search(name, "fine", mode=R.SEARCH_MODE_KEYWORD))

    # The client fixes the message and re-sends the whole stream: what landed is skipped.
    fixed = messages + [R.IngestRequest(documents=[doc("later", "fine")])]
    reply = tenant.Ingest(iter(fixed))
    assert (reply.upserted, reply.unchanged, reply.committed, reply.committed_messages) == (1, 15, 16, 4)
    assert tenant.stats(name) == (17, 16 * per_doc + 1)


def test_ingest_stream_later_version_of_a_document_wins(tenant):
    name = unique_name()
    tenant.create(name, fields=[])
    messages = [R.IngestRequest(collection=name, documents=[doc("a", "The first version mentions walruses.")])]
    messages += [R.IngestRequest(documents=[doc(f"n{i}", f"Filler note {i}.")]) for i in range(MAX_BATCH + 1)]
    messages += [R.IngestRequest(documents=[doc("a", "The second version mentions pelicans.")])]
    reply = tenant.Ingest(iter(messages))
    assert reply.committed_messages == len(messages)
    assert tenant.stats(name)[0] == MAX_BATCH + 2
    assert ids(tenant.search(name, "pelicans", mode=R.SEARCH_MODE_KEYWORD)) == ["a"]
    assert tenant.search(name, "walruses", mode=R.SEARCH_MODE_KEYWORD) == []


def test_searches_are_served_while_an_ingest_stream_runs(tenant, channel):
    """Conformance: an open Ingest stream neither blocks searches nor hides its committed batches."""
    import threading
    import time

    name = unique_name()
    tenant.create(name, fields=[])
    tenant.upsert(name, doc("anchor", "The lighthouse keeper polished the great brass lens."))
    stream_open = threading.Event()
    release = threading.Event()

    def messages():
        yield R.IngestRequest(collection=name, documents=[doc(f"early-{i}", f"Early note {i} about zebras.")
                                                          for i in range(MAX_BATCH)])
        stream_open.set()
        release.wait(60)  # the client holds the stream open while the test searches
        yield R.IngestRequest(documents=[doc("late", "A late note about giraffes.")])

    result: dict = {}

    def ingest():
        result["reply"] = tenant.Ingest(messages())
        result["done"] = time.monotonic()

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        assert stream_open.wait(60)
        served = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = ids(tenant.search(name, "zebras", mode=R.SEARCH_MODE_KEYWORD, top_k=20))
            assert ids(tenant.search(name, "who tends the lamp?", mode=R.SEARCH_MODE_VECTOR, top_k=1)) == ["anchor"]
            served.append(time.monotonic())
            if len(found) == MAX_BATCH and len(served) >= 3:
                break  # the first message's batch is searchable while the stream is still open
            time.sleep(0.05)
        assert len(found) == MAX_BATCH
    finally:
        release.set()
        worker.join(120)
    assert served[-1] < result["done"]  # every search was answered while the stream was still open
    assert result["reply"].committed == MAX_BATCH + 1
    assert ids(tenant.search(name, "giraffes", mode=R.SEARCH_MODE_KEYWORD)) == ["late"]


def test_keyword_search_takes_punctuation_literally(tenant, small):
    for query in ['C++ (language) AND "quoted', "pasta* OR sauce~2", "title:xylophonist", "\\ ' ; --"]:
        tenant.search(small, query, mode=R.SEARCH_MODE_KEYWORD)
        tenant.search(small, query)
    assert "orchestra" in ids(tenant.search(small, "xylophonist?!", mode=R.SEARCH_MODE_KEYWORD))


# ---- search --------------------------------------------------------------------------------------
def test_keyword_search_finds_the_rare_word(tenant, small):
    hits = tenant.search(small, "xylophonist", mode=R.SEARCH_MODE_KEYWORD)
    assert ids(hits) == ["orchestra"]
    hit = hits[0]
    assert (hit.chunk_id, hit.chunk_index) == ("orchestra#0", 0)
    assert "xylophonist" in hit.text
    assert plain(hit.metadata) == {"year": 2001, "lang": "en", "rating": 4.5, "public": True}
    assert hit.score > 0


def test_vector_search_finds_a_paraphrase(tenant, small):
    hits = tenant.search(small, "a spaceship blasting off toward the stars", mode=R.SEARCH_MODE_VECTOR, top_k=4)
    assert ids(hits)[0] == "space"
    assert len(hits) == 4
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # No word in common, so keyword search cannot find it.
    assert "space" not in ids(tenant.search(small, "spaceship blasting stars", mode=R.SEARCH_MODE_KEYWORD))


def test_hybrid_alpha_follows_weaviate(tenant, small):
    query = "flowers blossoming in warm sunshine on tuesday"
    vector = ids(tenant.search(small, query, mode=R.SEARCH_MODE_VECTOR, top_k=4))
    keyword = ids(tenant.search(small, query, mode=R.SEARCH_MODE_KEYWORD, top_k=4))
    assert vector[0] == "garden" and keyword[0] == "orchestra"
    assert ids(tenant.search(small, query, alpha=1.0, top_k=4))[0] == "garden"
    assert ids(tenant.search(small, query, alpha=0.0, top_k=4))[0] == "orchestra"
    blended = tenant.search(small, query, top_k=4)  # default: hybrid, alpha 0.5
    assert {"garden", "orchestra"} <= set(ids(blended))
    assert all(0.0 <= h.score <= 1.0 + 1e-6 for h in blended)


FILTER_CASES = [
    ("equals-string", cond("lang", equals="en"), {"orchestra", "cooking"}),
    ("equals-bool", cond("public", equals=True), {"orchestra", "space"}),
    ("equals-double-given-int", cond("rating", equals=3), {"cooking"}),
    ("range-int", cond("year", gte=2010, lt=2020), {"cooking", "space"}),
    ("range-int-fractional-bound", cond("year", gt=2014.5), {"space", "garden"}),
    ("range-double", cond("rating", gt=4.0), {"orchestra", "space"}),
    ("in-list", cond("lang", in_list=["de", "fr"]), {"space", "garden"}),
    ("all", all_of(cond("lang", equals="en"), cond("public", equals=True)), {"orchestra"}),
    ("any", any_of(cond("year", lte=2001), cond("rating", lt=3.0)), {"orchestra", "garden"}),
    ("nested", all_of(any_of(cond("lang", equals="de"), cond("lang", equals="fr")), cond("year", gte=2016)), {"garden"}),
    ("quote-injection", cond("lang", equals="en' OR '1'='1"), set()),
    ("backslash-injection", cond("lang", equals="en\\' OR 1=1 --"), set()),
]


@pytest.mark.parametrize("mode", [R.SEARCH_MODE_VECTOR, R.SEARCH_MODE_HYBRID], ids=["vector", "hybrid"])
def test_filters(tenant, small, mode):
    for case, filter_, expected in FILTER_CASES:
        hits = tenant.search(small, "an everyday event", mode=mode, top_k=10, filter=filter_)
        assert set(ids(hits)) == expected, case


def test_keyword_search_with_filter(tenant, small):
    query = "the orchestra and the pasta sauce"
    assert set(ids(tenant.search(small, query, mode=R.SEARCH_MODE_KEYWORD))) == {"orchestra", "cooking"}
    only = tenant.search(small, query, mode=R.SEARCH_MODE_KEYWORD, filter=cond("public", equals=False))
    assert ids(only) == ["cooking"]


def test_top_k_limits_hits(tenant, small):
    assert len(tenant.search(small, "anything at all", mode=R.SEARCH_MODE_VECTOR, top_k=2)) == 2
    assert len(tenant.search(small, "anything at all", mode=R.SEARCH_MODE_VECTOR)) == 4  # default 10


# ---- tenancy -------------------------------------------------------------------------------------
def test_tenants_are_isolated(channel, tenant, small):
    other = Client(channel, unique_name("t"))
    assert list(other.ListCollections(R.ListCollectionsRequest()).collections) == []
    for call in (
        lambda: other.GetCollection(R.GetCollectionRequest(name=small)),
        lambda: other.search(small, "xylophonist"),
        lambda: other.stats(small),
        lambda: other.upsert(small, doc("intruder", "text")),
        lambda: other.DeleteDocuments(R.DeleteDocumentsRequest(collection=small, document_ids=["orchestra"])),
        lambda: other.DeleteCollection(R.DeleteCollectionRequest(name=small)),
    ):
        expect_error(call, grpc.StatusCode.NOT_FOUND)
    # The same name in another tenant is a different, empty collection.
    other.create(small)
    assert other.stats(small) == (0, 0)
    assert other.search(small, "xylophonist", mode=R.SEARCH_MODE_KEYWORD) == []
    other.upsert(small, doc("orchestra", "Tenant B's own orchestra document."))
    other.DeleteDocuments(R.DeleteDocumentsRequest(collection=small, document_ids=["orchestra"]))
    other.DeleteCollection(R.DeleteCollectionRequest(name=small))
    assert tenant.stats(small) == (4, 4)
    assert ids(tenant.search(small, "xylophonist", mode=R.SEARCH_MODE_KEYWORD)) == ["orchestra"]


@pytest.mark.parametrize(
    "rpc,request_",
    [
        ("ListCollections", R.ListCollectionsRequest()),
        ("GetCollection", R.GetCollectionRequest(name="docs")),
        ("CreateCollection", R.CreateCollectionRequest(collection=R.Collection(name="docs"))),
        ("Search", R.SearchRequest(collection="docs", query="q")),
        ("GetCollectionStats", R.GetCollectionStatsRequest(collection="docs")),
        ("DeleteDocuments", R.DeleteDocumentsRequest(collection="docs", document_ids=["a"])),
    ],
)
def test_call_without_tenant_is_unauthenticated(channel, rpc, request_):
    anonymous = Client(channel, None)
    expect_error(lambda: getattr(anonymous, rpc)(request_), grpc.StatusCode.UNAUTHENTICATED)


def test_ingest_without_tenant_is_unauthenticated(channel):
    anonymous = Client(channel, None)
    expect_error(
        lambda: anonymous.Ingest(iter([R.IngestRequest(collection="docs", documents=[doc("a", "b")])])),
        grpc.StatusCode.UNAUTHENTICATED,
    )


def test_embed_gives_the_embedders_unit_vectors_in_order(tenant, small):
    reply = tenant.Embed(R.EmbedRequest(texts=["a small cat", "a young kitten", "a diesel truck"]))
    assert reply.model == "all-MiniLM-L6-v2"
    vectors = [list(e.vector) for e in reply.embeddings]
    assert [len(v) for v in vectors] == [384, 384, 384]
    for v in vectors:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-3

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2
    # [CLS] a small cat [SEP]: five tokens, counted per text and in total
    assert [e.tokens for e in reply.embeddings][0] == 5
    assert reply.total_tokens == sum(e.tokens for e in reply.embeddings)
    # A text longer than the model's window is truncated, not refused.
    long = tenant.Embed(R.EmbedRequest(texts=["word " * 2000]))
    assert long.embeddings[0].tokens == 512


# ---- bad input -----------------------------------------------------------------------------------
def _search(name, **kw):
    return R.SearchRequest(collection=name, **{"query": "q", **kw})


def _big_doc():
    return doc("big", "x " * (MAX_DOCUMENT_BYTES // 2 + 1))


BAD_INPUT = [
    # (case, rpc, request builder taking the collection name, code, field)
    ("empty-query", "Search", lambda c: _search(c, query="  "), "INVALID_ARGUMENT", "query"),
    ("top-k-negative", "Search", lambda c: _search(c, top_k=-1), "INVALID_ARGUMENT", "top_k"),
    ("top-k-too-big", "Search", lambda c: _search(c, top_k=101), "INVALID_ARGUMENT", "top_k"),
    ("alpha-above-1", "Search", lambda c: _search(c, alpha=1.5), "INVALID_ARGUMENT", "alpha"),
    ("alpha-below-0", "Search", lambda c: _search(c, alpha=-0.1), "INVALID_ARGUMENT", "alpha"),
    ("alpha-nan", "Search", lambda c: _search(c, alpha=float("nan")), "INVALID_ARGUMENT", "alpha"),
    ("unknown-collection", "Search", lambda c: _search("no-such-collection"), "NOT_FOUND", None),
    ("filter-undeclared-field", "Search", lambda c: _search(c, filter=cond("colour", equals="red")),
     "INVALID_ARGUMENT", "filter.condition.field"),
    ("filter-wrong-type", "Search", lambda c: _search(c, filter=cond("year", equals="2001")),
     "INVALID_ARGUMENT", "filter.condition.equals"),
    ("filter-range-on-string", "Search", lambda c: _search(c, filter=cond("lang", gt=1.0)),
     "INVALID_ARGUMENT", "filter.condition.range"),
    ("filter-empty-range", "Search", lambda c: _search(c, filter=cond("year")), "INVALID_ARGUMENT",
     "filter.condition.range"),
    ("filter-nested-wrong-type", "Search",
     lambda c: _search(c, filter=all_of(cond("lang", equals="en"), any_of(cond("public", in_list=[True, 1])))),
     "INVALID_ARGUMENT", "filter.all.filters[1].any.filters[0].condition.in_list.values[1]"),
    ("filter-empty-group", "Search", lambda c: _search(c, filter=R.Filter(all=R.FilterGroup())),
     "INVALID_ARGUMENT", "filter.all.filters"),
    ("oversized-document", "UpsertDocuments",
     lambda c: R.UpsertDocumentsRequest(collection=c, documents=[_big_doc()]), "INVALID_ARGUMENT", "documents[0].text"),
    ("oversized-batch", "UpsertDocuments",
     lambda c: R.UpsertDocumentsRequest(collection=c, documents=[doc(f"d{i}", "t") for i in range(MAX_BATCH + 1)]),
     "INVALID_ARGUMENT", "documents"),
    ("empty-batch", "UpsertDocuments", lambda c: R.UpsertDocumentsRequest(collection=c), "INVALID_ARGUMENT",
     "documents"),
    ("empty-document-id", "UpsertDocuments",
     lambda c: R.UpsertDocumentsRequest(collection=c, documents=[doc("", "text")]), "INVALID_ARGUMENT",
     "documents[0].id"),
    ("empty-document-text", "UpsertDocuments",
     lambda c: R.UpsertDocumentsRequest(collection=c, documents=[doc("ok", "text"), doc("blank", " \n ")]),
     "INVALID_ARGUMENT", "documents[1].text"),
    ("duplicate-document-id", "UpsertDocuments",
     lambda c: R.UpsertDocumentsRequest(collection=c, documents=[doc("same", "a"), doc("same", "b")]),
     "INVALID_ARGUMENT", "documents[1].id"),
    ("metadata-wrong-type", "UpsertDocuments",
     lambda c: R.UpsertDocumentsRequest(collection=c, documents=[doc("m", "text", year="nineteen")]),
     "INVALID_ARGUMENT", "documents[0].metadata[year]"),
    ("upsert-unknown-collection", "UpsertDocuments",
     lambda c: R.UpsertDocumentsRequest(collection="no-such-collection", documents=[doc("a", "b")]), "NOT_FOUND", None),
    ("bad-collection-name", "CreateCollection",
     lambda c: R.CreateCollectionRequest(collection=R.Collection(name="1 bad/name")), "INVALID_ARGUMENT",
     "collection.name"),
    ("bad-collection-name-on-get", "GetCollection", lambda c: R.GetCollectionRequest(name="../etc"),
     "INVALID_ARGUMENT", "name"),
    ("overlap-not-below-chunk", "CreateCollection",
     lambda c: R.CreateCollectionRequest(collection=R.Collection(
         name="ok", chunking=R.ChunkingConfig(chunk_tokens=50, overlap_tokens=50))),
     "INVALID_ARGUMENT", "collection.chunking.overlap_tokens"),
    ("chunk-too-large", "CreateCollection",
     lambda c: R.CreateCollectionRequest(collection=R.Collection(name="ok", chunking=R.ChunkingConfig(chunk_tokens=513))),
     "INVALID_ARGUMENT", "collection.chunking.chunk_tokens"),
    ("field-type-unset", "CreateCollection",
     lambda c: R.CreateCollectionRequest(collection=R.Collection(name="ok", metadata_fields=[R.MetadataField(name="f")])),
     "INVALID_ARGUMENT", "collection.metadata_fields[0].type"),
    ("field-name-bad", "CreateCollection",
     lambda c: R.CreateCollectionRequest(collection=R.Collection(
         name="ok", metadata_fields=[R.MetadataField(name="a-b", type=R.METADATA_TYPE_INT)])),
     "INVALID_ARGUMENT", "collection.metadata_fields[0].name"),
    ("delete-no-ids", "DeleteDocuments", lambda c: R.DeleteDocumentsRequest(collection=c), "INVALID_ARGUMENT",
     "document_ids"),
    ("stats-unknown-collection", "GetCollectionStats",
     lambda c: R.GetCollectionStatsRequest(collection="no-such-collection"), "NOT_FOUND", None),
    ("embed-no-texts", "Embed", lambda c: R.EmbedRequest(), "INVALID_ARGUMENT", "texts"),
    ("embed-empty-text", "Embed", lambda c: R.EmbedRequest(texts=["fine", " "]), "INVALID_ARGUMENT", "texts[1]"),
    ("embed-too-many", "Embed", lambda c: R.EmbedRequest(texts=["t"] * 257), "INVALID_ARGUMENT", "texts"),
    ("embed-oversized-text", "Embed", lambda c: R.EmbedRequest(texts=["x " * (MAX_DOCUMENT_BYTES // 2 + 1)]),
     "INVALID_ARGUMENT", "texts[0]"),
]


@pytest.mark.parametrize("case,rpc,build,code,field", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(tenant, small, case, rpc, build, code, field):
    before = tenant.stats(small)
    expect_error(lambda: getattr(tenant, rpc)(build(small)), getattr(grpc.StatusCode, code), field)
    assert tenant.stats(small) == before  # nothing half-written
    assert ids(tenant.search(small, "xylophonist", mode=R.SEARCH_MODE_KEYWORD)) == ["orchestra"]  # still serving
