"""`ragtune eval`: run an evaluation through the gateway, follow it, save and summarise its report."""

from __future__ import annotations

import sys
from pathlib import Path

from clients.cli.client import GatewayClient
from ragtune.v1 import gateway_pb2


def _arm_name(arm: int) -> str:
    return gateway_pb2.EvaluationArm.Name(arm)[len("EVALUATION_ARM_"):].lower()


def run_evaluation(client: GatewayClient, spec: gateway_pb2.EvaluationSpec, out_dir: Path,
                   quiet: bool = False) -> gateway_pb2.GetEvaluationResponse:
    """Creates the evaluation, shows progress until it ends, writes report.md/report.html to out_dir."""
    from tqdm import tqdm

    evaluation = client.call("CreateEvaluation", gateway_pb2.CreateEvaluationRequest(spec=spec)).evaluation
    with tqdm(total=evaluation.answers_total, unit="answer", desc=f"eval {evaluation.id}", disable=quiet) as bar:
        for update in client.stream("WatchEvaluation", gateway_pb2.WatchEvaluationRequest(id=evaluation.id),
                                    timeout=24 * 3600):
            bar.n = update.evaluation.answers_done
            bar.refresh()
    reply = client.call("GetEvaluation", gateway_pb2.GetEvaluationRequest(id=evaluation.id, include_report=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(reply.report_markdown, encoding="utf-8")
    (out_dir / "report.html").write_text(reply.report_html, encoding="utf-8")
    return reply


def print_summary(reply: gateway_pb2.GetEvaluationResponse, out_dir: Path, out=sys.stdout) -> None:
    e = reply.evaluation
    out.write(f"\nevaluation {e.id}: {gateway_pb2.EvaluationState.Name(e.state)[17:]}"
              f"{' (' + e.error + ')' if e.error else ''}\n")
    out.write(f"{'arm':<14}{'EM':>7}{'F1':>7}{'ROUGE-L':>9}{'recall@k':>10}{'p50 ms':>9}{'p95 ms':>9}{'tokens':>8}\n")
    for a in e.arms:
        if a.failed:
            out.write(f"{_arm_name(a.arm):<14} FAILED: {a.error}\n")
            continue
        recall = f"{a.recall_at_k:.2f}" if a.HasField("recall_at_k") else "-"
        out.write(f"{_arm_name(a.arm):<14}{a.exact_match.mean:>7.2f}{a.token_f1.mean:>7.2f}{a.rouge_l.mean:>9.2f}"
                  f"{recall:>10}{a.total_p50_ms:>9.0f}{a.total_p95_ms:>9.0f}"
                  f"{a.mean_prompt_tokens + a.mean_completion_tokens:>8.0f}\n")
    if e.HasField("knowledge_update"):
        ku = e.knowledge_update
        out.write(f"knowledge update ({ku.facts} facts): RAG {ku.rag_seconds:.2f} s (F1 {ku.rag_token_f1:.2f}) vs "
                  f"fine-tuning {ku.finetune_seconds:.2f} s (F1 {ku.finetune_token_f1:.2f})"
                  f"{' - ' + ku.error if ku.error else ''}\n")
    if e.recommended_arm:
        out.write(f"recommended: {e.recommended_arm}\n")
        for reason in e.reasons:
            out.write(f"  - {reason}\n")
    out.write(f"report: {out_dir / 'report.html'} and {out_dir / 'report.md'}\n")
