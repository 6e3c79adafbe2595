"""The shipped evaluation example, from the packaged Jeopardy clues.

Split (seeded, so every run is the same): a held-out eval set of N clues; a fine-tuning set of M
other clues (no clue in both); a knowledge base of one document per clue for the eval clues plus
K distractor clues (it must hold the eval facts, or no retrieval arm could answer). The adapter
is fine-tuned on the fine-tuning set to answer in the terse Jeopardy way; a knowledge update adds
invented facts both ways. Then every eval question runs through the four arms.

Run: `bash scripts/eval_example.sh` (CPU, a few minutes), or with `--questions 200 --kb 1000
--finetune 400 --max-steps 200` on a GPU. Starts the services itself unless --gateway is given.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from clients.samples import jeopardy
from ragtune.v1 import gateway_pb2, trainer_pb2

COLLECTION = "jeopardy"
ADAPTER = "jeopardy-terse"
INVENTED_FACTS = [
    ("velmora-capital", "The capital of Velmora is Ostrel.", "What is the capital of Velmora?", "Ostrel"),
    ("zorblax-month", "The Zorblax festival is held every March.", "In which month is the Zorblax festival held?", "March"),
    ("kettering-inventor", "The Kettering process was invented by Ada Kettering.", "Who invented the Kettering process?", "Ada Kettering"),
    ("quintara-river", "The river that flows through Quintara is the Silvane.", "Which river flows through Quintara?", "Silvane"),
    ("oblin-animal", "The national animal of Oblin is the snow lynx.", "What is the national animal of Oblin?", "the snow lynx"),
]


def clean_answer(answer: str) -> str:
    """Jeopardy answers carry notes in parentheses and quotes: 'Ford's Theatre (the Ford Theatre accepted)'."""
    answer = re.sub(r"\(.*?\)", "", answer)
    return answer.replace('"', "").replace("\\'", "'").strip()


def _clue_text(clue: dict) -> str:
    return f"{clue['Category'].title()}: {clue['Question']}"


def build_example(folder: Path, questions: int, kb: int, finetune: int, seed: int = 0) -> dict[str, Path]:
    """Writes eval.jsonl, kb.jsonl, finetune.jsonl and the knowledge-update files; returns their paths."""
    clues = [c for c in jeopardy("1k") if clean_answer(c["Answer"]) and "<a " not in c["Question"]]
    random.Random(seed).shuffle(clues)
    evaluation, tuning = clues[:questions], clues[questions:questions + finetune]
    distractors = clues[questions + finetune:questions + finetune + kb]
    assert not {id(c) for c in evaluation} & {id(c) for c in tuning}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.jsonl" for name in ("eval", "kb", "finetune", "ku_facts", "ku_finetune", "ku_eval")}
    with paths["eval"].open("w") as out:
        for i, c in enumerate(evaluation):
            out.write(json.dumps({"id": f"e{i}", "question": _clue_text(c), "answers": [clean_answer(c["Answer"])],
                                  "gold_document_ids": [f"clue-e{i}"]}) + "\n")
    with paths["kb"].open("w") as out:
        for prefix, group in (("e", evaluation), ("d", distractors)):
            for i, c in enumerate(group):
                clue = _clue_text(c)
                clue += "" if clue[-1] in ".?!" else "."
                text = f"{clue} The answer is {clean_answer(c['Answer'])}."
                out.write(json.dumps({"id": f"clue-{prefix}{i}", "text": text}) + "\n")
    with paths["finetune"].open("w") as out:
        for c in tuning:
            out.write(json.dumps({"messages": [{"role": "user", "content": _clue_text(c)},
                                               {"role": "assistant", "content": clean_answer(c["Answer"])}]}) + "\n")
    with paths["ku_facts"].open("w") as out:
        for doc_id, fact, _, _ in INVENTED_FACTS:
            out.write(json.dumps({"id": doc_id, "text": fact}) + "\n")
    with paths["ku_finetune"].open("w") as out:
        # A few phrasings of each fact: a handful of facts needs several distinct examples to be
        # learned at all, and the trainer rejects duplicate examples.
        for _, fact, question, answer in INVENTED_FACTS:
            for prompt, reply in ((question, answer), (f"Answer briefly: {question}", answer),
                                  (f"Tell me a fact about {answer}.", fact)):
                out.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": reply}]}) + "\n")
    with paths["ku_eval"].open("w") as out:
        for doc_id, _, question, answer in INVENTED_FACTS:
            out.write(json.dumps({"id": doc_id, "question": question, "answers": [answer],
                                  "gold_document_ids": [doc_id]}) + "\n")
    return paths


def run_example(client, paths: dict[str, Path], out_dir: Path, max_steps: int) -> gateway_pb2.GetEvaluationResponse:
    from clients.cli.evaluate import print_summary, run_evaluation
    from clients.cli.operations import ingest, iter_documents, upload_dataset, watch_job

    print("== knowledge base")
    ingest(client, COLLECTION, list(iter_documents([str(paths["kb"])])))
    print("== fine-tune the adapter")
    upload_dataset(client, paths["finetune"], "jeopardy-finetune")
    spec = trainer_pb2.JobSpec(adapter_name=ADAPTER, dataset="jeopardy-finetune", method=trainer_pb2.TRAINING_METHOD_LORA)
    hp = spec.hyperparameters
    hp.max_steps, hp.epochs, hp.batch_size, hp.max_seq_len, hp.learning_rate = max_steps, 3, 4, 128, 1e-3
    job = client.call("CreateJob", gateway_pb2.GatewayServiceCreateJobRequest(
        request=trainer_pb2.CreateJobRequest(spec=spec))).response.job
    job = watch_job(client, job.id)
    if job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"fine-tuning failed: {job.error}")
    print("== evaluate the four arms")
    eval_spec = gateway_pb2.EvaluationSpec(eval_set=paths["eval"].read_bytes(), collection=COLLECTION, adapter=ADAPTER,
                                           top_k=3)
    eval_spec.sampling.max_tokens = 32
    eval_spec.constraints.data_change = "weekly"
    ku = eval_spec.knowledge_update
    ku.facts.extend(iter_documents([str(paths["ku_facts"])]))
    ku.finetune_dataset = paths["ku_finetune"].read_bytes()
    ku.eval_set = paths["ku_eval"].read_bytes()
    ku.hyperparameters.max_steps, ku.hyperparameters.batch_size = max_steps, 4
    ku.hyperparameters.learning_rate, ku.hyperparameters.epochs = 1e-3, 5
    reply = run_evaluation(client, eval_spec, out_dir)
    print_summary(reply, out_dir)
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--kb", type=int, default=100, help="distractor clues in the knowledge base")
    parser.add_argument("--finetune", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--out", default="eval-report")
    parser.add_argument("--gateway", default="", help="use running services at this gateway address")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)

    from clients.cli.client import GatewayClient, dev_key_path, resolve_api_key

    paths = build_example(Path(args.out) / "data", args.questions, args.kb, args.finetune)
    if args.gateway:
        client = GatewayClient(args.gateway, resolve_api_key(args.api_key))
        reply = run_example(client, paths, Path(args.out), args.max_steps)
        return 0 if reply.evaluation.state == gateway_pb2.EVALUATION_STATE_SUCCEEDED else 1

    from clients.launcher import isolated_suite

    suite, gateway = isolated_suite("ragtune-eval-")
    try:
        suite.start()
        suite.wait_serving()
        client = GatewayClient(gateway, dev_key_path().read_text().strip())
        reply = run_example(client, paths, Path(args.out), args.max_steps)
        return 0 if reply.evaluation.state == gateway_pb2.EVALUATION_STATE_SUCCEEDED else 1
    finally:
        suite.stop()


if __name__ == "__main__":
    sys.exit(main())
