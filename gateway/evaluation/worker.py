"""`EvaluationWorker`: claims queued evaluations (or ones whose replica died) from the control plane,
holds each under a lease it renews, and runs it, saving every answered question as it finishes; a
replacement resumes from those saved results without asking them again.

Stops differ by cause: a client's cancel ends the evaluation CANCELLED (with a partial report)
within a heartbeat, and no answer is saved once it is asked for; a shutdown hands it back at once
(lease released) for another replica; a lost lease or an unreachable database leaves it alone (the
lease runs out and someone claims it again). A run that raises is tried again a little later; after
RAGTUNE_GATEWAY_EVALUATION_MAX_ATTEMPTS attempts (crashed replicas included) it ends FAILED with the
last error. A promotion gate's evaluation first checks that its gate_run is that job's own gate
(gateway/evaluation/promotion.py) and ends FAILED, changing nothing, when it is not."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

from google.protobuf.message import DecodeError

from ragtune.controlplane import evaluations as states
from ragtune.controlplane import leased_work
from ragtune.controlplane.database import DatabaseUnavailable
from ragtune.controlplane.evaluations import CancelRequested, EvaluationRecord, EvaluationStore, LeaseLost
from ragtune.controlplane.leased_work import CANCEL, SHUTDOWN, Hold
from ragtune.errors import InvalidArgument
from ragtune.gate_metrics import gate_metric_name
from ragtune.v1 import gateway_pb2
from gateway.downstream import Downstream
from gateway.evaluation import convert, gate, knowledge_update
from gateway.evaluation.promotion import GateNotReady, GateRefused, Promotion
from gateway.evaluation.recommend import recommend
from gateway.evaluation.report import write_report
from gateway.evaluation.results import ArmResult, EvalItem, EvalRun
from gateway.evaluation.scoring import ask_and_score, describe
from gateway.evaluation.spec import arm_plan, constraints_of, validate_spec
from gateway.evaluation.summary import summarize_arm
from gateway.rag import AskPipeline

log = logging.getLogger(__name__)

# How long one attempt waits for a gate's job to be recorded EVALUATING. The trainer does so right
# after queueing the gate; if it died in between, another trainer takes the job over once its lease
# (30 s by default) runs out. Past this the attempt fails and is tried again later.
GATE_READY_WAIT_S = 300.0


class EvaluationWorker:
    def __init__(self, store: EvaluationStore, pipeline: AskPipeline, downstream: Downstream, artifact_root: Path,
                 promotion: Promotion, *, slots: int, lease_s: float, poll_interval_s: float,
                 max_attempts: int = 3, worker_id: str | None = None):
        self.store, self.pipeline, self.down, self.artifacts = store, pipeline, downstream, artifact_root
        self.promotion = promotion
        self.slots, self.lease_s, self.poll_s = slots, lease_s, poll_interval_s
        self.max_attempts = max_attempts
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._runs: dict[str, tuple[asyncio.Task, list[str]]] = {}  # id -> (task, [stop reason])

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._claim_loop(), name=f"evaluation-worker-{i}") for i in range(self.slots)]

    def wake(self) -> None:
        """A new evaluation was queued on this replica: look now, not at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        for loop in self._loops:
            loop.cancel()
        for task, reason in list(self._runs.values()):
            reason.append(SHUTDOWN)
            task.cancel()
        await asyncio.gather(*self._loops, *(t for t, _ in self._runs.values()), return_exceptions=True)

    async def _claim_loop(self) -> None:
        while True:
            record = await asyncio.to_thread(leased_work.claim, self.store, self.worker_id, self.lease_s)
            if record is None:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                continue
            try:
                await self._supervise(record)
            except Exception:  # noqa: BLE001 - one evaluation's fault must not stop this slot for good
                log.exception("evaluation %s: unexpected fault while running it", record.id)

    async def _supervise(self, record: EvaluationRecord) -> None:
        if record.cancel_requested:  # cancelled while no replica ran it (its last one died)
            await self._conclude(record, states.CANCELLED, "")
            return
        if record.attempts > self.max_attempts:  # the last attempts' replicas died or lost the lease
            last = record.error or "its replica stopped without finishing (the lease ran out)"
            await self._conclude(record, states.FAILED, f"gave up after {self.max_attempts} attempts; the last: {last}")
            return
        reason: list[str] = []
        task = asyncio.create_task(self._run(record, reason), name=f"evaluation-{record.id}")
        self._runs[record.id] = (task, reason)

        def stop(why: str) -> None:
            reason.append(why)
            task.cancel()

        # Renewing often also makes a client's cancel take effect within seconds.
        hold = Hold(self.store, record.id, self.worker_id, self.lease_s)
        heartbeat = asyncio.create_task(leased_work.renew_until_stopped(hold, min(self.lease_s / 3, 2.0), task, stop))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # this loop was cancelled (shutdown): let the run wind down
                reason.append(SHUTDOWN)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise
        except (LeaseLost, DatabaseUnavailable):
            log.warning("evaluation %s stopped here: lease lost or database unavailable", record.id)
        except Exception as exc:  # noqa: BLE001 - this evaluation's attempt failed; the worker keeps serving
            await self._attempt_failed(record, exc)
        finally:
            heartbeat.cancel()
            self._runs.pop(record.id, None)

    async def _attempt_failed(self, record: EvaluationRecord, exc: Exception) -> None:
        error = describe(exc)
        if record.attempts >= self.max_attempts:
            log.error("evaluation %s failed on attempt %d of %d: %s; giving up", record.id, record.attempts,
                      self.max_attempts, error, exc_info=exc)
            await self._conclude(record, states.FAILED, f"failed {record.attempts} times; the last error: {error}")
            return
        retry_after_s = min(self.lease_s, 2.0 ** (record.attempts - 1))
        log.warning("evaluation %s failed on attempt %d of %d: %s; trying again in %.0f s", record.id,
                    record.attempts, self.max_attempts, error, retry_after_s, exc_info=exc)
        try:
            await asyncio.to_thread(self.store.attempt_failed, record.id, self.worker_id, error, retry_after_s)
        except DatabaseUnavailable:
            pass  # the lease runs out instead; the attempt is counted all the same

    async def _conclude(self, record: EvaluationRecord, state: str, error: str, *, gate_job: bool = True) -> None:
        """Ends an evaluation that will not run (again): a gate's job gets the held-back verdict (if
        its gate_run is that job's own and gate_job), then the record its final state."""
        snapshot = convert.evaluation_message(record, self.artifacts)
        try:
            spec = gateway_pb2.EvaluationSpec.FromString(record.spec)
        except DecodeError:
            spec = None
        if gate_job and spec is not None and spec.HasField("gate_run"):
            try:
                await asyncio.to_thread(self.promotion.apply, record.tenant, record.id, spec,
                                        gate.failed(spec.gate_run, error or state, record.id))
            except GateRefused:
                pass  # not that job's gate: its job is left as it is
            except Exception:  # noqa: BLE001 - the evaluation ends regardless; the job's state is logged
                log.exception("evaluation %s: could not record the held-back verdict on job %s", record.id,
                              spec.gate_run.job_id)
        if state == states.FAILED:
            log.warning("evaluation %s ends FAILED: %s", record.id, error)
        try:
            await asyncio.to_thread(self.store.finish, record.id, state, convert.snapshot_dict(snapshot), error,
                                    self.worker_id)
        except DatabaseUnavailable:
            log.warning("evaluation %s: database unavailable while ending it %s; the next claim decides again",
                        record.id, state)

    # -- one evaluation ----------------------------------------------------------------------------

    async def _run(self, record: EvaluationRecord, reason: list[str]) -> None:
        try:
            spec = gateway_pb2.EvaluationSpec.FromString(record.spec)
            items, arm_names = validate_spec(spec)
        except (DecodeError, InvalidArgument) as exc:  # it would fail the same way on every attempt
            await self._conclude(record, states.FAILED, f"its spec cannot be run: {describe(exc)}")
            return
        if spec.HasField("gate_run"):
            try:
                await self._gate_ready(record, spec)
            except GateRefused as refused:  # not a single question is asked for a forged gate
                await self._conclude(record, states.FAILED, refused.message, gate_job=False)
                return
        snapshot = convert.evaluation_message(record, self.artifacts)
        run = EvalRun(
            id=record.id, collection=spec.collection, adapter=spec.adapter, top_k=spec.top_k or 4,
            arms=[ArmResult(name=a) for a in arm_names], constraints=constraints_of(spec),
            created_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.create_time)),
        )
        folder = self.artifacts / record.report_path
        final, error = states.SUCCEEDED, ""
        try:
            saved = await asyncio.to_thread(self.store.results, record.id)
            if saved:
                log.info("evaluation %s resumed with %d answers already saved", record.id, len(saved))
            for arm in run.arms:
                await self._run_arm(record, spec, run, arm, items, saved, snapshot)
            if spec.HasField("knowledge_update"):
                run.knowledge_update = await self._knowledge_update(record, spec, snapshot, run)
            if spec.HasField("gate_run"):
                verdict = self._verdict(record, spec, run)
                snapshot.recommended_arm = "candidate" if verdict.promoted else "incumbent"
                snapshot.reasons[:] = [verdict.reason]
            else:
                run.recommendation = recommend(run.arms, run.knowledge_update, run.constraints)
        except asyncio.CancelledError:
            if CANCEL not in reason:
                await self._hand_back(record.id, reason)
                raise
            asyncio.current_task().uncancel()  # cancelled on purpose: go on to write the partial report
            final = states.CANCELLED
        except CancelRequested:  # seen when saving an answer, before the heartbeat saw it
            final = states.CANCELLED
        except (LeaseLost, DatabaseUnavailable):
            log.warning("evaluation %s stopped here: lease lost or database unavailable", record.id)
            return
        except Exception as exc:  # noqa: BLE001 - the evaluation fails, the gateway keeps serving
            log.exception("evaluation %s failed", record.id)
            final, error = states.FAILED, describe(exc)
        # The final state is recorded only after the report is written: watchers read it then.
        for arm in run.arms:
            if arm.questions and not arm.summary:
                arm.summary = summarize_arm(arm.questions)
        convert.fill_snapshot(snapshot, run)
        await asyncio.to_thread(write_report, run, folder)
        if spec.HasField("gate_run"):
            verdict = self._verdict(record, spec, run) if final == states.SUCCEEDED else \
                gate.failed(spec.gate_run, error or final, record.id)
            try:
                await asyncio.to_thread(self.promotion.apply, record.tenant, record.id, spec, verdict)
            except GateRefused as refused:  # the job moved on or changed since the check: nothing moved
                final, error = states.FAILED, refused.message
                snapshot.recommended_arm = ""
                snapshot.reasons[:] = [refused.message]
        await asyncio.to_thread(self.store.finish, record.id, final, convert.snapshot_dict(snapshot), error,
                                self.worker_id)

    async def _gate_ready(self, record: EvaluationRecord, spec: gateway_pb2.EvaluationSpec) -> None:
        """Returns once the gate_run is its job's own gate and the job waits on it; GateRefused if it
        is not; GateNotReady (this attempt fails) if the job is still not EVALUATING after the wait."""
        deadline = time.monotonic() + GATE_READY_WAIT_S
        said = False
        while True:
            try:
                await asyncio.to_thread(self.promotion.check, record.tenant, record.id, spec)
                return
            except GateNotReady as waiting:
                if time.monotonic() >= deadline:
                    raise
                if not said:  # once, so a watcher sees why nothing moves
                    await asyncio.to_thread(self.store.update_snapshot, record.id, self.worker_id, record.snapshot,
                                            event=("waiting", {"reason": waiting.message}))
                    said = True
            await asyncio.sleep(self.poll_s)

    @staticmethod
    def _verdict(record, spec, run: EvalRun) -> gate.Verdict:
        arms = {a.name: a for a in run.arms}
        g = spec.gate_run
        return gate.decide(arms["candidate"], arms["incumbent"], metric=gate_metric_name(g.gate.metric),
                           margin=g.gate.margin, alias=g.gate.alias, candidate_version=g.candidate_version,
                           incumbent_version=g.incumbent_version, evaluation_id=record.id)

    async def _hand_back(self, evaluation_id: str, reason: list[str]) -> None:
        if SHUTDOWN in reason:  # a clean stop: its attempt is given back (EvaluationStore.release)
            await asyncio.to_thread(leased_work.hand_back, self.store, evaluation_id, self.worker_id)

    async def _run_arm(self, record, spec, run: EvalRun, arm: ArmResult, items: list[EvalItem],
                       saved: dict, snapshot: gateway_pb2.Evaluation) -> None:
        for index, item in enumerate(items):
            kept = saved.get((arm.name, index))
            if kept is not None:
                arm.questions.append(convert.result_of(kept))
                continue
            result = await ask_and_score(self.pipeline, record.tenant, item, spec, *arm_plan(arm.name, spec))
            arm.questions.append(result)
            arm.summary = summarize_arm(arm.questions)
            snapshot.answers_done = sum(len(a.questions) for a in run.arms)
            convert.fill_snapshot(snapshot, run)
            try:
                await asyncio.to_thread(self.store.save_result, record.id, self.worker_id, arm.name, index,
                                        convert.result_dict(result), convert.snapshot_dict(snapshot))
            except CancelRequested:
                arm.questions.pop()  # not saved: the partial report shows what the record holds
                arm.summary = summarize_arm(arm.questions)
                snapshot.answers_done -= 1
                raise
        errors = [q.error for q in arm.questions if q.error]
        if arm.questions and len(errors) == len(arm.questions):
            arm.failed, arm.error = True, errors[0]
        arm.summary = summarize_arm(arm.questions)
        snapshot.answers_done = sum(len(a.questions) for a in run.arms)

    async def _knowledge_update(self, record, spec, snapshot, run: EvalRun):
        if record.knowledge_update is not None:
            return convert.knowledge_update_of(record.knowledge_update)

        async def answer_arm(items, arm_name, collection, adapter) -> ArmResult:
            arm = ArmResult(name=arm_name)
            for item in items:
                arm.questions.append(await ask_and_score(self.pipeline, record.tenant, item, spec, bool(collection),
                                                         collection, adapter))
            return arm

        result = await knowledge_update.measure(self.down, answer_arm, record.tenant, record.id,
                                                spec.knowledge_update)
        run.knowledge_update = result
        convert.fill_snapshot(snapshot, run)
        await asyncio.to_thread(self.store.update_snapshot, record.id, self.worker_id, convert.snapshot_dict(snapshot),
                                knowledge_update=convert.knowledge_update_dict(result),
                                event=("knowledge_update", {"error": result.error}))
        await knowledge_update.clean_up(self.down, record.tenant, record.id)
        return result
