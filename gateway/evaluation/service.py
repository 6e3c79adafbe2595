"""The evaluation RPCs' logic, the same on every gateway replica: create validates and queues a
record; get, list, watch and cancel read and mark records in the control plane. Watchers see a
change at most RAGTUNE_GATEWAY_POLL_INTERVAL_S after it is saved, whichever replica saved it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from ragtune.controlplane import evaluations as states
from ragtune.controlplane.evaluations import EvaluationStore, report_path
from ragtune.registry import parse_adapter_ref
from ragtune.v1 import gateway_pb2, retriever_pb2, trainer_pb2
from gateway.downstream import CallBudget, Downstream
from gateway.evaluation import convert
from gateway.evaluation.spec import validate_spec
from gateway.evaluation.worker import EvaluationWorker

REPORTS = ("report.md", "report.html", "results.json")
_CANCEL_WAIT_S = 10.0


class EvaluationService:
    def __init__(self, store: EvaluationStore, downstream: Downstream, artifact_root: Path,
                 worker: EvaluationWorker | None, poll_interval_s: float):
        self.store, self.down, self.artifacts = store, downstream, artifact_root
        self.worker, self.poll_s = worker, poll_interval_s

    def _message(self, record) -> gateway_pb2.Evaluation:
        return convert.evaluation_message(record, self.artifacts)

    async def create(self, tenant: str, spec: gateway_pb2.EvaluationSpec, budget: CallBudget) -> gateway_pb2.Evaluation:
        items, arms = validate_spec(spec)
        await self._check_targets(spec, arms, budget)
        snapshot = gateway_pb2.Evaluation(questions=len(items), answers_total=len(items) * len(arms))
        record = await asyncio.to_thread(self.store.create, tenant, spec.SerializeToString(),
                                         convert.snapshot_dict(snapshot), report_path)
        if self.worker is not None:
            self.worker.wake()
        return self._message(record)

    async def check_collection(self, collection: str, budget: CallBudget) -> None:
        await self.down.retriever.get_collection(retriever_pb2.GetCollectionRequest(name=collection), budget)

    async def _check_targets(self, spec, arms: list[str], budget: CallBudget) -> None:
        """NOT_FOUND now, not minutes into the run, for an unknown collection or adapter."""
        if any(a.startswith("rag") for a in arms):
            await self.check_collection(spec.collection, budget)
        if any("finetuned" in a for a in arms):
            name, version = parse_adapter_ref(spec.adapter, "spec.adapter")
            await self.down.trainer.get_adapter(trainer_pb2.GetAdapterRequest(name=name, version=version or 0), budget)

    async def get(self, tenant: str, evaluation_id: str, include_report: bool) -> gateway_pb2.GetEvaluationResponse:
        record = await asyncio.to_thread(self.store.get, evaluation_id, tenant)
        reply = gateway_pb2.GetEvaluationResponse(evaluation=self._message(record))
        if include_report and record.report_path:
            folder = self.artifacts / record.report_path
            texts = await asyncio.to_thread(_read_reports, folder)
            reply.report_markdown, reply.report_html, reply.results_json = texts
        return reply

    async def spec(self, tenant: str, evaluation_id: str) -> gateway_pb2.EvaluationSpec:
        """What the evaluation was created with (NOT_FOUND for another tenant's)."""
        record = await asyncio.to_thread(self.store.get, evaluation_id, tenant)
        return gateway_pb2.EvaluationSpec.FromString(record.spec)

    async def list(self, tenant: str) -> list[gateway_pb2.Evaluation]:
        return [self._message(r) for r in await asyncio.to_thread(self.store.list, tenant)]

    async def watch(self, tenant: str, evaluation_id: str) -> AsyncIterator[gateway_pb2.Evaluation]:
        seen = -1
        while True:
            record = await asyncio.to_thread(self.store.get, evaluation_id, tenant)
            if record.revision != seen:
                seen = record.revision
                yield self._message(record)
            if record.finished:
                return
            await asyncio.sleep(self.poll_s)

    async def cancel(self, tenant: str, evaluation_id: str) -> gateway_pb2.Evaluation:
        record = await asyncio.to_thread(self.store.get, evaluation_id, tenant)
        if record.finished:
            return self._message(record)
        if record.state == states.QUEUED:
            await asyncio.to_thread(self.store.finish, evaluation_id, states.CANCELLED, record.snapshot, "",
                                    None, (states.QUEUED,))
        await asyncio.to_thread(self.store.request_cancel, evaluation_id)
        # The replica running it stops at its next heartbeat; wait briefly so the reply usually says so.
        deadline = asyncio.get_running_loop().time() + _CANCEL_WAIT_S
        while not record.finished and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(min(self.poll_s, 0.5))
            record = await asyncio.to_thread(self.store.get, evaluation_id, tenant)
        return self._message(record)


def _read_reports(folder: Path) -> tuple[str, str, str]:
    texts = []
    for name in REPORTS:
        path = folder / name
        texts.append(path.read_text(encoding="utf-8") if path.exists() else "")
    return tuple(texts)
