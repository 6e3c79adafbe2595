"""What the CLI, the demo and the examples do through the gateway: read documents, ingest them, ask, upload a
dataset and follow a job. Plain functions over a GatewayClient, so the commands and the demo share them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import grpc

from clients.cli.client import GatewayClient
from ragtune.values import to_value
from ragtune.v1 import gateway_pb2, retriever_pb2, trainer_pb2

_TEXT_SUFFIXES = {".txt", ".md", ".rst"}
_BATCH_DOCS = 16
_UPLOAD_CHUNK = 1 << 20


def iter_documents(paths: list[str]) -> Iterator[retriever_pb2.Document]:
    """Documents from text files (id = file stem), folders of them, and JSONL files of {id, text, metadata}."""
    for raw in paths:
        path = Path(raw)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".jsonl":
                for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        item = json.loads(line)
                        doc = retriever_pb2.Document(id=str(item["id"]), text=item["text"])
                        for key, value in (item.get("metadata") or {}).items():
                            doc.metadata[key].CopyFrom(to_value(value))
                        yield doc
            elif file.suffix in _TEXT_SUFFIXES:
                yield retriever_pb2.Document(id=file.stem, text=file.read_text(encoding="utf-8"))


def ensure_collection(client: GatewayClient, name: str) -> None:
    try:
        client.call("GetCollection", gateway_pb2.GatewayServiceGetCollectionRequest(
            request=retriever_pb2.GetCollectionRequest(name=name)))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        client.call("CreateCollection", gateway_pb2.GatewayServiceCreateCollectionRequest(
            request=retriever_pb2.CreateCollectionRequest(collection=retriever_pb2.Collection(name=name))))


def ingest(client: GatewayClient, collection: str, docs: list[retriever_pb2.Document], quiet: bool = False) -> dict:
    """Upserts documents in batches with a progress bar; returns the totals."""
    from tqdm import tqdm

    ensure_collection(client, collection)
    totals = {"upserted": 0, "unchanged": 0, "chunks": 0}
    with tqdm(total=len(docs), unit="doc", desc=f"ingest -> {collection}", disable=quiet) as bar:
        for start in range(0, len(docs), _BATCH_DOCS):
            batch = docs[start:start + _BATCH_DOCS]
            reply = client.call("UpsertDocuments", gateway_pb2.GatewayServiceUpsertDocumentsRequest(
                request=retriever_pb2.UpsertDocumentsRequest(collection=collection, documents=batch))).response
            totals["upserted"] += reply.upserted
            totals["unchanged"] += reply.unchanged
            totals["chunks"] += reply.chunks
            bar.update(len(batch))
            bar.set_postfix(chunks=totals["chunks"])
    return totals


def ask(client: GatewayClient, question: str, *, collection: str = "", adapter: str = "", top_k: int = 0,
        no_retrieval: bool = False, max_tokens: int = 0, out=sys.stdout) -> gateway_pb2.AskDone:
    """Streams an answer to `out`, then prints its sources; returns the final message."""
    q = gateway_pb2.AskQuestion(question=question, collection=collection, adapter=adapter, top_k=top_k,
                                no_retrieval=no_retrieval)
    if max_tokens:
        q.sampling.max_tokens = max_tokens
    done = gateway_pb2.AskDone()
    for event in client.stream("AskStream", gateway_pb2.AskStreamRequest(question=q)):
        kind = event.WhichOneof("event")
        if kind == "delta":
            out.write(event.delta)
            out.flush()
        elif kind == "done":
            done = event.done
    out.write("\n")
    for c in done.citations:
        mark = " (inferred)" if c.inferred else ""
        out.write(f"  [{c.number}] {c.document_id} chunk {c.chunk_index} score {c.score:.3f}{mark}\n")
    t = done.timing
    out.write(f"  ({done.usage.completion_tokens} tokens; first token {t.time_to_first_token_ms:.0f} ms, "
              f"total {t.total_ms:.0f} ms)\n")
    return done


def upload_dataset(client: GatewayClient, path: Path, name: str) -> trainer_pb2.UploadDatasetResponse:
    data = path.read_bytes()
    requests = [
        gateway_pb2.GatewayServiceUploadDatasetRequest(request=trainer_pb2.UploadDatasetRequest(
            name=name if i == 0 else "", content=data[i:i + _UPLOAD_CHUNK]))
        for i in range(0, max(len(data), 1), _UPLOAD_CHUNK)
    ]
    return client.stream_in("UploadDataset", requests).response


def watch_job(client: GatewayClient, job_id: str, quiet: bool = False) -> trainer_pb2.Job:
    """Follows a job's events with a progress bar until it ends; returns the final job."""
    from tqdm import tqdm

    bar = None
    stream = client.stream("WatchJob", gateway_pb2.GatewayServiceWatchJobRequest(
        request=trainer_pb2.WatchJobRequest(id=job_id)))
    for item in stream:
        event = item.response.event
        kind = event.WhichOneof("event")
        if kind == "progress":
            p = event.progress
            if bar is None:
                bar = tqdm(total=p.total_steps, unit="step", desc=f"train {job_id[:8]}", disable=quiet)
            bar.n = p.step
            bar.set_postfix(loss=f"{p.train_loss:.3f}", tok_s=f"{p.tokens_per_second:.0f}")
            bar.refresh()
        elif kind == "state_changed" and not quiet:
            (bar.write if bar else print)(f"job {job_id[:8]}: {trainer_pb2.JobState.Name(event.state_changed)}")
        elif kind == "epoch_end" and not quiet and bar:
            e = event.epoch_end
            val = f", validation loss {e.validation_loss:.3f}" if e.HasField("validation_loss") else ""
            bar.write(f"epoch {e.epoch}: train loss {e.train_loss:.3f}{val}")
    if bar:
        bar.close()
    return client.call("GetJob", gateway_pb2.GatewayServiceGetJobRequest(
        request=trainer_pb2.GetJobRequest(id=job_id))).response.job
