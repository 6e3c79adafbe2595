"""Applies a promotion gate's verdict: moves the alias (audited, as the gate) when the candidate
won, and ends the job SUCCEEDED with the verdict either way. Safe to repeat: a resumed
evaluation that rules again moves nothing twice."""

from __future__ import annotations

from ragtune.controlplane import jobs as job_states
from ragtune.controlplane.aliases import AliasStore, Target
from ragtune.controlplane.jobs import JobStore
from ragtune.errors import NotFound
from gateway.evaluation.gate import Verdict


class Promotion:
    def __init__(self, aliases: AliasStore, jobs: JobStore):
        self.aliases, self.jobs = aliases, jobs

    def apply(self, tenant: str, gate_run, verdict: Verdict) -> None:
        if verdict.promoted:
            target = [Target(gate_run.candidate_version, 100)]
            try:
                current = self.aliases.get(tenant, gate_run.adapter, verdict.alias).targets
            except NotFound:
                current = ()
            if list(current) != target:
                self.aliases.set(tenant, gate_run.adapter, verdict.alias, target, actor=f"gate:{gate_run.job_id}",
                                 reason=verdict.reason, action="promote")
        job = self.jobs.get(gate_run.job_id)
        if job.state != job_states.EVALUATING:
            return  # ruled already
        self.jobs.record(gate_run.job_id, "message", {"text": verdict.reason})
        self.jobs.set_state(gate_run.job_id, job_states.SUCCEEDED, only_from=(job_states.EVALUATING,),
                            metrics={**(job.metrics or {}), "gate_verdict": verdict.as_dict()})
