"""The demo `ragtune up --demo` runs: ingest a wiki100 sample, ask with citations, fine-tune a tiny
LoRA adapter from Jeopardy clues with visible progress, and ask the same question through it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from clients.cli.client import GatewayClient
from clients.cli.operations import ask, ingest, upload_dataset, watch_job
from clients.samples import jeopardy, wiki100_articles
from ragtune.v1 import gateway_pb2, retriever_pb2, trainer_pb2

DEMO_COLLECTION = "wiki"
DEMO_ARTICLES = 6  # the first six by title: Africa, Agriculture, Anatomy, Ancient history, Animal, Architecture
# Answered by one sentence of the "Animal" article, so the answer can be checked against its citation.
DEMO_QUESTION = "Where does the word animal come from?"
DEMO_ADAPTER = "jeopardy-style"


def jeopardy_style_dataset(path: Path, examples: int = 64) -> Path:
    """Chat examples that teach the model to answer in Jeopardy form ("What is ...?")."""
    with path.open("w", encoding="utf-8") as out:
        for clue in jeopardy("1k")[:examples]:
            messages = [
                {"role": "user", "content": f"{clue['Category'].title()}: {clue['Question']}"},
                {"role": "assistant", "content": f"What is {clue['Answer']}?"},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def _banner(text: str) -> None:
    print(f"\n=== {text} ===")


def run_demo(gateway: str, api_key: str, max_steps: int = 24) -> None:
    client = GatewayClient(gateway, api_key)
    try:
        _banner(f"1. ingest {DEMO_ARTICLES} wiki100 articles into '{DEMO_COLLECTION}'")
        docs = [retriever_pb2.Document(id=title, text=text) for title, text in wiki100_articles(DEMO_ARTICLES)]
        totals = ingest(client, DEMO_COLLECTION, docs)
        print(f"{totals['upserted']} documents, {totals['chunks']} chunks ({totals['unchanged']} unchanged)")

        _banner(f"2. ask: {DEMO_QUESTION}")
        ask(client, DEMO_QUESTION, collection=DEMO_COLLECTION)

        _banner(f"3. fine-tune a LoRA adapter '{DEMO_ADAPTER}' on Jeopardy clues ({max_steps} steps)")
        with tempfile.TemporaryDirectory() as tmp:
            dataset = jeopardy_style_dataset(Path(tmp) / "jeopardy-style.jsonl")
            upload_dataset(client, dataset, "jeopardy-style")
        spec = trainer_pb2.JobSpec(adapter_name=DEMO_ADAPTER, dataset="jeopardy-style",
                                   method=trainer_pb2.TRAINING_METHOD_LORA)
        spec.hyperparameters.max_steps = max_steps
        spec.hyperparameters.epochs = 2
        spec.hyperparameters.batch_size = 4
        spec.hyperparameters.max_seq_len = 128
        spec.hyperparameters.learning_rate = 1e-3
        job = client.call("CreateJob", gateway_pb2.GatewayServiceCreateJobRequest(
            request=trainer_pb2.CreateJobRequest(spec=spec))).response.job
        job = watch_job(client, job.id)
        print(f"job {trainer_pb2.JobState.Name(job.state)}; adapter {job.adapter_path}")
        if job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"the fine-tune job did not succeed: {job.error}")

        _banner(f"4. ask again through the adapter '{DEMO_ADAPTER}'")
        ask(client, DEMO_QUESTION, collection=DEMO_COLLECTION, adapter=DEMO_ADAPTER)
    finally:
        client.close()
