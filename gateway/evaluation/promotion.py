"""Applies a promotion gate's verdict: moves the alias (audited, as the gate) when the candidate
won, and ends the job SUCCEEDED with the verdict either way. Safe to repeat: a resumed
evaluation that rules again moves nothing twice.

Only the trainer writes a `gate_run` (the public API refuses it), but an alias decides what serves
production, so the gate is checked again here against the job it names: the job must belong to the
evaluation's tenant, wait in EVALUATING on this very evaluation, have produced exactly the
candidate version of that adapter, and have asked for this gate (alias, metric, margin, eval set).
Anything else is refused with the reason, and nothing is moved or ended. The trainer queues the
gate's evaluation just before it records the job EVALUATING: a gate whose job is still in the
trainer's hands is not refused but asked to wait (GateNotReady)."""

from __future__ import annotations

import logging
import math

from ragtune.controlplane import jobs as job_states
from ragtune.controlplane.aliases import AliasStore, Target
from ragtune.controlplane.evaluations import gate_evaluation_id
from ragtune.controlplane.jobs import JobRecord, JobStore
from ragtune.errors import FailedPrecondition, NotFound
from ragtune.gate_metrics import gate_metric_name
from gateway.evaluation.gate import Verdict

log = logging.getLogger(__name__)


class GateRefused(FailedPrecondition):
    """The gate_run does not match the job it names: the evaluation may not move any alias."""


class GateNotReady(FailedPrecondition):
    """The job this gate was opened for has not been recorded EVALUATING yet: ask again shortly."""


class Promotion:
    def __init__(self, aliases: AliasStore, jobs: JobStore):
        self.aliases, self.jobs = aliases, jobs

    def check(self, tenant: str, evaluation_id: str, spec) -> JobRecord:
        """The job the gate decides for, if the evaluation (its id and EvaluationSpec) is that job's
        gate; GateRefused naming the mismatch otherwise, GateNotReady while the trainer still holds
        the job it opened this very gate for."""
        job = self._job(tenant, evaluation_id, spec.gate_run.job_id)
        if job.state in job_states.UNFINISHED_STATES and evaluation_id == gate_evaluation_id(job.id):
            self._match(job, tenant, evaluation_id, spec, produced=False)
            raise GateNotReady(f"job {job.id} is {job.state}: its trainer has not recorded it EVALUATING yet")
        if job.state != job_states.EVALUATING and not self._ruled_by(job, evaluation_id):
            raise self._refuse(evaluation_id, f"job {job.id} is {job.state}, not waiting on a promotion gate")
        self._match(job, tenant, evaluation_id, spec)
        return job

    @staticmethod
    def _ruled_by(job: JobRecord, evaluation_id: str) -> bool:
        """Whether this evaluation already ended the job (it was resumed after doing so)."""
        verdict = (job.metrics or {}).get("gate_verdict") or {}
        return job.state == job_states.SUCCEEDED and verdict.get("evaluation_id") == evaluation_id

    def apply(self, tenant: str, evaluation_id: str, spec, verdict: Verdict) -> None:
        """Moves the alias if the verdict promotes, then ends the job with the verdict; GateRefused
        (nothing changed) unless `check` passes, or this evaluation already ruled on the job."""
        gate_run = spec.gate_run
        job = self._job(tenant, evaluation_id, gate_run.job_id)
        if job.state != job_states.EVALUATING:
            if self._ruled_by(job, evaluation_id):
                return  # this evaluation ruled already (it was resumed after ending the job)
            raise self._refuse(evaluation_id, f"job {job.id} is {job.state}, not waiting on a promotion gate")
        self._match(job, tenant, evaluation_id, spec)
        if verdict.promoted:
            target = [Target(gate_run.candidate_version, 100)]
            try:
                current = self.aliases.get(tenant, gate_run.adapter, verdict.alias).targets
            except NotFound:
                current = ()
            if list(current) != target:
                self.aliases.set(tenant, gate_run.adapter, verdict.alias, target, actor=f"gate:{gate_run.job_id}",
                                 reason=verdict.reason, action="promote")
        self.jobs.record(job.id, "message", {"text": verdict.reason})
        self.jobs.set_state(job.id, job_states.SUCCEEDED, only_from=(job_states.EVALUATING,),
                            metrics={**(job.metrics or {}), "gate_verdict": verdict.as_dict()})

    def _job(self, tenant: str, evaluation_id: str, job_id: str) -> JobRecord:
        try:
            job = self.jobs.get(job_id) if job_id else None
        except NotFound:
            job = None
        if job is None or job.tenant != tenant:
            # The same words for a job that is missing and one of another tenant: no way to probe ids.
            raise self._refuse(evaluation_id, f"gate_run.job_id: tenant {tenant!r} has no job {job_id!r}")
        return job

    def _match(self, job: JobRecord, tenant: str, evaluation_id: str, spec, produced: bool = True) -> None:
        """GateRefused unless the gate_run is the job's own; `produced`: the version too (known once the
        job is EVALUATING)."""
        gate_run = spec.gate_run
        if evaluation_id != gate_evaluation_id(job.id):
            raise self._refuse(evaluation_id, f"job {job.id} waits on evaluation {gate_evaluation_id(job.id)},"
                                              f" not {evaluation_id}")
        adapter = job.spec.get("adapter_name")
        if gate_run.adapter != adapter:
            raise self._refuse(evaluation_id, f"gate_run.adapter: job {job.id} trained {adapter!r},"
                                              f" not {gate_run.adapter!r}")
        candidate = f"{tenant}/{adapter}/{gate_run.candidate_version}"
        if produced and job.adapter_path != candidate:
            raise self._refuse(evaluation_id, f"gate_run.candidate_version: job {job.id} produced"
                                              f" {job.adapter_path or 'no version'}, not {candidate}")
        gate = job.spec.get("gate") or {}
        asked = {"alias": gate.get("alias"), "metric": gate.get("metric"), "collection": gate.get("collection", ""),
                 "eval_set": gate.get("eval_set")}
        given = {"alias": gate_run.gate.alias, "metric": gate_metric_name(gate_run.gate.metric),
                 "collection": gate_run.gate.collection, "eval_set": spec.eval_set.decode("utf-8", "replace")}
        wrong = [name for name in asked if asked[name] != given[name]]
        if not gate or not math.isclose(float(gate.get("margin", 0.0)), gate_run.gate.margin, abs_tol=1e-6):
            wrong.append("margin")
        if wrong:
            fields = ", ".join(f"gate_run.gate.{name}" for name in sorted(wrong))
            raise self._refuse(evaluation_id, f"{fields}: not what job {job.id} asked its gate for")

    @staticmethod
    def _refuse(evaluation_id: str, reason: str) -> GateRefused:
        log.warning("promotion gate of evaluation %s refused: %s", evaluation_id, reason)
        return GateRefused(f"promotion refused: {reason}; no alias moved")
