"""Gateway settings (environment variables prefixed RAGTUNE_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GATEWAY_", extra="ignore", frozen=True)

    port: int = Field(50051, ge=0, le=65535)
    retriever_address: str = Field("127.0.0.1:50052", description="host:port of the retriever.")
    generator_address: str = Field("127.0.0.1:50053", description="host:port of the generator.")
    trainer_address: str = Field("127.0.0.1:50054", description="host:port of the trainer.")
    api_keys_file: Path | None = Field(
        None, description="JSON file of hashed API keys: {\"keys\": [{\"sha256\", \"tenant\", \"scopes\"}]}."
    )
    api_keys: SecretStr | None = Field(None, description="The same JSON as api_keys_file, inline (e.g. from a Secret).")
    default_timeout_s: float = Field(120.0, gt=0, description="Deadline for downstream calls when the client sets none.")
    retry_attempts: int = Field(3, ge=1, le=10, description="Attempts for idempotent reads on UNAVAILABLE.")
    retry_backoff_s: float = Field(0.1, ge=0, description="First backoff between attempts; doubles each time.")
    default_top_k: int = Field(4, ge=1, le=20, description="Chunks retrieved for Ask when top_k is 0.")
    max_top_k: int = Field(20, ge=1, le=100, description="Largest top_k Ask accepts.")
    default_max_tokens: int = Field(
        64, ge=1, description="Answer length when sampling.max_tokens is unset. Answers from context are asked for in"
        " one sentence and stop at a line break (answer_stop), so this is a ceiling, not the usual length;"
        " a request for more tokens than this gets a longer text instead, without those stops."
    )
    answer_candidate_factor: int = Field(
        2, ge=1, le=10, description="Ask retrieves this many chunks per passage it keeps, to rerank and drop"
        " near-duplicates among them."
    )
    answer_mode: Literal[
        "SEARCH_MODE_UNSPECIFIED", "SEARCH_MODE_VECTOR", "SEARCH_MODE_KEYWORD", "SEARCH_MODE_HYBRID"
    ] = Field(
        "SEARCH_MODE_UNSPECIFIED", description="Search mode for Ask when the request sets none (unspecified: the"
        " retriever's default, hybrid)."
    )
    answer_alpha: float | None = Field(
        None, ge=0, le=1, description="Hybrid weight for Ask when the request sets none (1 vector, 0 keyword);"
        " unset: the retriever's default."
    )
    answer_max_sentences: int = Field(
        3, ge=0, le=50, description="Sentences kept of each passage: those that bear on the question; 0 keeps"
        " whole chunks."
    )
    answer_max_words: int = Field(80, ge=10, description="Words kept of each passage at most.")
    answer_rerank: bool = Field(True, description="Order passages by their kept sentences' weight of question terms.")
    answer_dedupe: bool = Field(True, description="Drop a passage whose kept words another passage already holds.")
    answer_drop_unrelated: bool = Field(True, description="Drop passages that share no term with the question.")
    answer_min_share: float = Field(
        0.5, ge=0, le=1, description="Drop passages whose question terms weigh less than this share of the best"
        " passage's (rare terms such as names weigh most); 0 keeps every related passage."
    )
    answer_abstain: bool = Field(
        True, description="Answer \"The documents do not say.\" instead of the model when no retrieved passage"
        " mentions what the question names (the generator still checks the request with one token); base model"
        " only: an adapter may have been fine-tuned on the answer."
    )
    answer_attribution: Literal["sentence", "overlap"] = Field(
        "sentence", description="How citations are found when the answer has no valid [n] marks: the passage whose"
        " sentences hold the answer's own facts (sentence), or plain word overlap (overlap)."
    )
    answer_one_sentence: bool = Field(
        False, description="End answers from context after their first sentence (the gateway stops the generation)."
        " Off: it cut short answers that copy a passage from its start (measured in bench/answers_bench.py)."
    )
    answer_stop: list[str] = Field(
        ["\n"], description="Stop strings for answers from context when the request sets none (JSON list)."
    )
    key_refresh_s: float = Field(
        2.0, gt=0, le=300, description="How often each replica reloads API keys from the database: a revoked key is"
        " refused by every replica at most this long after RevokeApiKey."
    )
    key_max_staleness_s: float = Field(
        60.0, gt=0, description="How old a replica's view of the API keys may grow while it cannot reload them"
        " (database unreachable, pool exhausted) before it refuses every key with UNAVAILABLE (HTTP 503) and"
        " reports itself not ready. The trade-off: until then, requests keep being served on the last loaded"
        " keys, so a key revoked meanwhile may still work that long; past it, an outage of the database becomes"
        " an outage of the gateway. 60 s (30 refresh periods) rides out a PostgreSQL restart or failover;"
        " lower it to bound revocation tighter. At least twice RAGTUNE_GATEWAY_KEY_REFRESH_S."
    )

    @field_validator("key_max_staleness_s")
    @classmethod
    def _staleness_outlasts_refreshes(cls, value: float, info: ValidationInfo) -> float:
        # Below two periods, one slow reload would make every key refused between two good ones.
        refresh = info.data.get("key_refresh_s")
        if refresh is not None and value < 2 * refresh:
            raise ValueError(f"must be at least twice RAGTUNE_GATEWAY_KEY_REFRESH_S ({refresh:g} s), so that one"
                             " slow reload does not refuse every key")
        return value
    evaluation_workers: int = Field(
        1, ge=0, le=16, description="Evaluations this replica runs at once (claimed from the database); 0 serves the"
        " evaluation RPCs but runs none."
    )
    evaluation_lease_s: float = Field(
        30.0, ge=1, description="A replica's claim on a running evaluation lasts this long unless renewed; when it dies,"
        " another replica resumes the evaluation at most this long later."
    )
    evaluation_max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts an evaluation gets before it ends FAILED with its last error: a run"
        " that raises, or whose replica dies or loses its lease, uses one; a replica shutting down gives its back."
    )
    poll_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often idle evaluation workers look for work and watchers for changes."
    )
    tokenizer_dir: Path | None = Field(
        None, description="Tokenizer used to fit context into the window; default the prepared base model."
    )
    # The OpenAI-compatible HTTP front (gateway/http), served by the same process beside the gRPC port.
    http_port: int = Field(
        8080, ge=-1, le=65535, description="Port of the OpenAI-compatible HTTP API (/v1/chat/completions, ...),"
        " bound on the same host as the gRPC port; 0 picks a free port (tests), -1 disables the HTTP front."
    )
    http_grace_s: float = Field(
        5.0, ge=0, le=3600, description="On shutdown, how long the HTTP front lets requests in flight finish"
        " (streams included) after it stops accepting new ones."
    )
    # Quotas (gateway/quotas.py): the defaults of every tenant; `ragtune quotas set` (SetQuota) overrides them per
    # tenant and per API key in the control plane. Generous, so nothing changes unless a quota is configured.
    quota_requests_per_s: float = Field(
        1000.0, ge=0, description="Default requests per second of a tenant (a token bucket; 0 refuses every call)."
    )
    quota_burst_s: float = Field(
        2.0, gt=0, le=60, description="A requests-per-second bucket holds this many seconds of its rate (at least"
        " one request): the burst a client may send after being idle."
    )
    quota_generated_tokens_per_min: int = Field(
        1_000_000, ge=0, description="Default generated (completion) tokens per minute of a tenant; charged after"
        " each answer, so a call is refused once the minute's tokens are spent, until they refill."
    )
    quota_concurrent_streams: int = Field(
        256, ge=0, description="Default streams (AskStream, ChatStream, Watch*, streamed completions) a tenant may"
        " hold open at once."
    )
    quota_queued_jobs: int = Field(
        100, ge=0, description="Default fine-tuning jobs a tenant may have waiting or running (CreateJob beyond it"
        " is RESOURCE_EXHAUSTED)."
    )
    quota_running_evaluations: int = Field(
        16, ge=0, description="Default evaluations a tenant may have queued or running at once."
    )
    quota_stored_bytes: int = Field(
        100 * 2**30, ge=0, description="Default bytes of datasets a tenant may store; an upload is refused once the"
        " tenant's datasets reach it."
    )
    quota_refresh_s: float = Field(
        5.0, gt=0, le=300, description="How often each replica reloads the quotas from the control plane (a change"
        " made through another replica applies within this bound; through this one at once)."
    )
    quota_redis_url: SecretStr | None = Field(
        None, description="redis://host:6379/0 to keep the quota counters (request buckets, token budgets, open"
        " streams) in Redis, shared by every gateway replica; unset: in this process (one replica)."
    )
    generation_slots: int = Field(
        32, ge=1, description="Generator calls this gateway runs at once; more wait in a queue served round-robin"
        " between tenants. Near the generators' batch size (max_num_seqs x replicas / gateways) keeps one tenant's"
        " flood from queueing ahead of another tenant inside the engine. Default: one generator's default"
        " RAGTUNE_GENERATOR_MAX_NUM_SEQS (32)."
    )
    generation_per_tenant: int = Field(
        0, ge=0, description="Generator calls one tenant may run at once (0: up to generation_slots); its further"
        " calls wait their turn while other tenants' calls go ahead. On a CPU engine every sequence in the batch"
        " slows the others, so this cap is what bounds another tenant's latency during one tenant's flood"
        " (bench.tenant_fairness_bench: 3 slots, 2 per tenant -> p95 1.18x of alone; 32 slots, no cap -> 2.34x)."
    )
