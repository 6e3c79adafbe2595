"""Gateway settings (environment variables prefixed RAGTUNE_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
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
    evaluation_workers: int = Field(
        1, ge=0, le=16, description="Evaluations this replica runs at once (claimed from the database); 0 serves the"
        " evaluation RPCs but runs none."
    )
    evaluation_lease_s: float = Field(
        30.0, ge=1, description="A replica's claim on a running evaluation lasts this long unless renewed; when it dies,"
        " another replica resumes the evaluation at most this long later."
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
        5.0, ge=0, le=300, description="On shutdown, how long the HTTP front lets requests in flight finish"
        " (streams included) after it stops accepting new ones."
    )
