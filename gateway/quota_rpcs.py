"""The quota admin RPCs (SetQuota, GetQuota, ListQuotas; scope admin, checked by the access table): an admin
key manages the quotas of its own tenant and that tenant's keys only, and only below what the operator allows
(the gateway's RAGTUNE_GATEWAY_QUOTA_* limits). Also the quota checks of the calls that
add stored data (UploadDataset), ahead of the forwarded call."""

from __future__ import annotations

import asyncio

from gateway.authorization import current_principal
from gateway.quotas import QuotaAdmission
from ragtune.controlplane.quotas import QuotaLimits, QuotaRecord, QuotaStore
from ragtune.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from ragtune.v1 import gateway_pb2 as g, gateway_pb2_grpc

_INTEGER_LIMITS = ("generated_tokens_per_min", "concurrent_streams", "queued_jobs", "running_evaluations",
                   "stored_bytes")


def limits_of(message: g.QuotaLimits) -> QuotaLimits:
    values = {name: getattr(message, name) for name in QuotaLimits.names() if message.HasField(name)}
    return QuotaLimits(**values).validated("limits")


def limits_message(limits: QuotaLimits) -> g.QuotaLimits:
    values = {}
    for name, value in limits.as_dict().items():
        if value is not None:
            values[name] = int(value) if name in _INTEGER_LIMITS else float(value)
    return g.QuotaLimits(**values)


def _key_id(key_id: str) -> str:
    if len(key_id) > 64:
        raise InvalidArgument("key_id", "must be an API key id (from ListApiKeys), at most 64 characters")
    return key_id


class QuotaRpcs(gateway_pb2_grpc.GatewayServiceServicer):
    """A base of GatewayServicer; `attach_quotas` gives it the admission and the store once they exist."""

    _quota_admission: QuotaAdmission
    _quota_store: QuotaStore

    def attach_quotas(self, admission: QuotaAdmission, store: QuotaStore) -> None:
        self._quota_admission, self._quota_store = admission, store

    def _quota_message(self, record: QuotaRecord) -> g.Quota:
        admission = self._quota_admission
        under = admission.tenant_limits(record.tenant) if record.key_id else admission.defaults
        return g.Quota(tenant=record.tenant, key_id=record.key_id, limits=limits_message(record.limits),
                       effective=limits_message(record.limits.over(under)), update_time=record.update_time,
                       updated_by=record.updated_by)

    async def SetQuota(self, request, context):
        principal = current_principal()
        limits = limits_of(request.limits)
        key_id = _key_id(request.key_id)
        # A tenant's admin divides what the operator allows; it cannot grant itself more. The ceiling of a tenant
        # row is the gateway's configured limits (RAGTUNE_GATEWAY_QUOTA_*), of a key row the tenant's own.
        admission = self._quota_admission
        ceiling = admission.tenant_limits(principal.tenant) if key_id else admission.defaults
        above = [FieldViolation(f"limits.{name}", f"{value} is above the {'tenant' if key_id else 'operator'}'s"
                                f" limit {getattr(ceiling, name)}")
                 for name, value in limits.as_dict().items()
                 if value is not None and getattr(ceiling, name) is not None and value > getattr(ceiling, name)]
        if above:
            raise PermissionDenied("; ".join(v.field + ": " + v.description for v in above), violations=above)
        record = await asyncio.to_thread(self._quota_store.set, principal.tenant, key_id, limits,
                                         actor=principal.key_id)
        self._quota_admission.remember(record)
        return g.SetQuotaResponse(quota=self._quota_message(record))

    async def GetQuota(self, request, context):
        principal = current_principal()
        key_id = _key_id(request.key_id)
        if key_id:
            await asyncio.to_thread(self._owned_key, principal.tenant, key_id)
        record = await asyncio.to_thread(self._quota_store.get, principal.tenant, key_id)
        return g.GetQuotaResponse(quota=self._quota_message(record))

    async def ListQuotas(self, request, context):
        principal = current_principal()
        records = await asyncio.to_thread(self._quota_store.list, principal.tenant)
        if not records or records[0].key_id:
            records.insert(0, QuotaRecord(principal.tenant, "", QuotaLimits(), 0.0, ""))
        return g.ListQuotasResponse(quotas=[self._quota_message(r) for r in records])

    def _owned_key(self, tenant: str, key_id: str) -> None:
        """NOT_FOUND unless the key is the tenant's (another tenant's key id is not there for it)."""
        if key_id not in {k.id for k in self._api_keys.list(tenant, include_revoked=True)}:
            raise NotFound(f"key_id: no API key {key_id!r}")

    async def UploadDataset(self, request_iterator, context):
        # Refused once the tenant's stored datasets reach its stored_bytes quota; one upload may pass it by at
        # most the trainer's upload limit (the size is known only as the stream arrives).
        await self._quota_admission.check_records(current_principal(), "stored_bytes")
        return await super().UploadDataset(request_iterator, context)
