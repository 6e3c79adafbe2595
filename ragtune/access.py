"""Who may call what: every gRPC method and every HTTP route of the suite, with its scope (public) or the
service identities that may call it (internal), in one table that both of the gateway's fronts and every
internal service consult. A method or route missing here is refused, and a test fails.

Public methods are the gateway's: an API key authenticates the caller (gateway/auth.py) and must carry the
method's scope (`admin` implies every scope). Internal methods belong to the retriever, generator and trainer:
no API key reaches them; they accept only the internal identity (RAGTUNE_INTERNAL_TOKEN, or with mutual TLS a
client certificate whose SAN names one of the method's callers). A field that only a service may set (the
trainer's `EvaluationSpec.gate_run`) is refused at the public front: see `SERVICE_ONLY_FIELDS`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Scope(str, enum.Enum):
    READ = "read"
    INGEST = "ingest"
    TRAIN = "train"
    ADMIN = "admin"  # implies every other scope


class Identity(str, enum.Enum):
    """The services that call other services. With mutual TLS, the first DNS label of a SAN of the caller's
    certificate (`gateway`, `gateway.ragtune.svc`) names it (k8s/components/cert-manager)."""

    GATEWAY = "gateway"
    TRAINER = "trainer"
    RETRIEVER = "retriever"
    GENERATOR = "generator"


@dataclass(frozen=True)
class Rule:
    """One method's or route's access: `scope` for a public one; `callers` for an internal one. `generates`
    marks calls that run the generator (quotas on generated tokens and fair admission apply); `streams` marks
    calls that hold a stream open (the concurrent-streams quota applies)."""

    scope: Scope | None = None
    callers: frozenset[Identity] = frozenset()
    generates: bool = False
    streams: bool = False

    @property
    def internal(self) -> bool:
        return self.scope is None

    def __post_init__(self) -> None:
        if (self.scope is None) == (not self.callers):
            raise ValueError("a rule is either public (a scope) or internal (callers), not both or neither")


def public(scope: Scope, *, generates: bool = False, streams: bool = False) -> Rule:
    return Rule(scope=scope, generates=generates, streams=streams)


def internal(*callers: Identity) -> Rule:
    return Rule(callers=frozenset(callers))


R, I, T, A = Scope.READ, Scope.INGEST, Scope.TRAIN, Scope.ADMIN
_GW = "/ragtune.v1.GatewayService/"
_RT = "/ragtune.v1.RetrieverService/"
_GN = "/ragtune.v1.GeneratorService/"
_TR = "/ragtune.v1.TrainerService/"

# The gateway calls every internal service; the trainer may call the retriever and the generator (datasets
# built from retrieval, adapters loaded after training); no internal service calls the gateway's internals.
_FROM_GATEWAY = internal(Identity.GATEWAY)
_FROM_GATEWAY_OR_TRAINER = internal(Identity.GATEWAY, Identity.TRAINER)

GRPC_METHODS: dict[str, Rule] = {
    # ---- gateway: answers
    _GW + "Ask": public(R, generates=True),
    _GW + "AskStream": public(R, generates=True, streams=True),
    _GW + "Chat": public(R, generates=True),
    _GW + "ChatStream": public(R, generates=True, streams=True),
    _GW + "Embed": public(R),
    # ---- gateway: the retriever's collections
    _GW + "CreateCollection": public(I),
    _GW + "GetCollection": public(R),
    _GW + "ListCollections": public(R),
    _GW + "DeleteCollection": public(I),
    _GW + "UpsertDocuments": public(I),
    _GW + "Ingest": public(I),
    _GW + "DeleteDocuments": public(I),
    _GW + "Search": public(R),
    _GW + "GetCollectionStats": public(R),
    # ---- gateway: the trainer's jobs, datasets, adapters and aliases
    _GW + "CreateJob": public(T),
    _GW + "GetJob": public(R),
    _GW + "ListJobs": public(R),
    _GW + "CancelJob": public(T),  # the scope that created it
    _GW + "WatchJob": public(R, streams=True),
    _GW + "ValidateDataset": public(T),
    _GW + "UploadDataset": public(T),
    _GW + "ListAdapters": public(R),
    _GW + "GetAdapter": public(R),
    _GW + "DeleteAdapter": public(T),
    _GW + "SetAdapterAlias": public(T),
    _GW + "GetAdapterAlias": public(R),
    _GW + "RollbackAdapterAlias": public(T),
    # ---- gateway: the generator's adapters
    _GW + "LoadAdapter": public(T),
    _GW + "UnloadAdapter": public(T),
    _GW + "ListLoadedAdapters": public(R),
    # ---- gateway: evaluations (a knowledge-update evaluation also needs train: checked on its spec)
    _GW + "CreateEvaluation": public(R, generates=True),
    _GW + "GetEvaluation": public(R),
    _GW + "ListEvaluations": public(R),
    _GW + "WatchEvaluation": public(R, streams=True),
    _GW + "CancelEvaluation": public(R),  # plus train for one that needed it (the scope that created it)
    # ---- gateway: API keys and quotas of the caller's tenant
    _GW + "CreateApiKey": public(A),
    _GW + "ListApiKeys": public(A),
    _GW + "RevokeApiKey": public(A),
    _GW + "SetQuota": public(A),
    _GW + "GetQuota": public(A),
    _GW + "ListQuotas": public(A),
    # ---- retriever (internal)
    **{_RT + m: _FROM_GATEWAY_OR_TRAINER for m in (
        "CreateCollection", "GetCollection", "ListCollections", "DeleteCollection", "UpsertDocuments", "Ingest",
        "DeleteDocuments", "Search", "GetCollectionStats", "Embed")},
    # ---- generator (internal)
    **{_GN + m: _FROM_GATEWAY_OR_TRAINER for m in (
        "Generate", "GenerateStream", "LoadAdapter", "UnloadAdapter", "ListAdapters", "GetModelInfo")},
    # ---- trainer (internal)
    **{_TR + m: _FROM_GATEWAY for m in (
        "CreateJob", "GetJob", "ListJobs", "CancelJob", "WatchJob", "ValidateDataset", "UploadDataset",
        "ListAdapters", "GetAdapter", "DeleteAdapter", "SetAdapterAlias", "GetAdapterAlias", "RollbackAdapterAlias")},
}

# The OpenAI-compatible HTTP front (gateway/http): (method, path template) -> rule.
HTTP_ROUTES: dict[tuple[str, str], Rule] = {
    ("GET", "/v1/models"): public(R),
    ("GET", "/v1/models/{model:path}"): public(R),
    ("POST", "/v1/chat/completions"): public(R, generates=True, streams=True),
    ("POST", "/v1/completions"): public(R, generates=True, streams=True),
    ("POST", "/v1/embeddings"): public(R),
    ("POST", "/v1/files"): public(T),
    ("POST", "/v1/fine_tuning/jobs"): public(T),
    ("GET", "/v1/fine_tuning/jobs"): public(R),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): public(R),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): public(T),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): public(R),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): public(R),
}

# Fields of public messages that only a service may set; the public fronts refuse a request that sets one.
SERVICE_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    _GW + "CreateEvaluation": ("spec.gate_run",),
}

INTERNAL_SERVICES = frozenset({"ragtune.v1.RetrieverService", "ragtune.v1.GeneratorService",
                               "ragtune.v1.TrainerService"})


def service_of(method: str) -> str:
    """`/ragtune.v1.GatewayService/Ask` -> `ragtune.v1.GatewayService`."""
    return method.strip("/").split("/", 1)[0]


def is_internal_service(service_names) -> bool:
    """Whether a server hosting these services is internal (every one of them is)."""
    names = set(service_names)
    return bool(names) and names <= INTERNAL_SERVICES


def rule_for(method: str) -> Rule | None:
    return GRPC_METHODS.get(method)


def callers_of(service_names) -> frozenset[Identity]:
    """Every identity that may call some method of these services (what a certificate check admits)."""
    prefixes = tuple(f"/{name}/" for name in service_names)
    return frozenset(c for m, r in GRPC_METHODS.items() if m.startswith(prefixes) for c in r.callers)


def identity_of_san(san: str) -> Identity | None:
    """The identity a certificate's DNS SAN names: its first label (`gateway.ragtune.svc` -> gateway)."""
    label = san.strip().lower().split(".", 1)[0]
    try:
        return Identity(label)
    except ValueError:
        return None
