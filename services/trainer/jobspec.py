"""What a job trains: the method, LoRA settings and hyperparameters, with defaults applied and every
bad value reported as a field violation named by its path in the CreateJob request."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ragtune.errors import FieldViolation, InvalidArgument
from ragtune.registry import _NAME_RE

METHODS = ("lora", "selective", "ia3", "prompt_tuning", "dpo")
LORA_METHODS = ("lora", "dpo")
SCHEDULES = ("linear", "cosine", "constant")
# The linear layers of every SmolLM2 (Llama) decoder layer, which LoRA can adapt.
ADAPTABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Peak learning rates that suit each method: adapters with few parameters need larger steps.
DEFAULT_LEARNING_RATE = {"lora": 2e-4, "selective": 2e-5, "ia3": 3e-3, "prompt_tuning": 3e-2, "dpo": 5e-5}


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = 1
    learning_rate: float = 2e-4
    lr_schedule: str = "linear"
    batch_size: int = 4
    gradient_accumulation: int = 1
    max_seq_len: int = 256
    seed: int = 0
    validation_fraction: float = 0.1
    early_stopping_patience: int = 0
    max_steps: int = 0
    checkpoint_every_steps: int = 50
    selective_top_layers: int = 2
    num_virtual_tokens: int = 8
    dpo_beta: float = 0.1


@dataclass(frozen=True)
class JobSpec:
    adapter_name: str
    dataset: str
    method: str = "lora"
    lora: LoraSettings | None = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        lora = data.get("lora")
        return cls(
            adapter_name=data["adapter_name"],
            dataset=data["dataset"],
            method=data["method"],
            lora=LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])}) if lora else None,
            hyperparameters=Hyperparameters(**data["hyperparameters"]),
        )


def _check_range(problems, path, value, low, high, *, low_open=False, high_open=False):
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        problems.append(FieldViolation(path, f"{value} is outside {lo}{low}, {high}{hi}"))


def resolve_spec(
    *,
    adapter_name: str,
    dataset: str,
    method: str,
    lora: dict[str, Any] | None,
    hyperparameters: dict[str, Any],
    num_layers: int,
    default_checkpoint_every: int,
) -> JobSpec:
    """Applies defaults to the values a client set (absent or zero means default) and validates
    them all at once; raises InvalidArgument naming every bad field (spec.lora.r, ...)."""
    problems: list[FieldViolation] = []
    if not _NAME_RE.match(adapter_name or ""):
        problems.append(
            FieldViolation("spec.adapter_name", "must be a letter, then up to 63 letters, digits, '_' or '-'")
        )
    if not dataset:
        problems.append(FieldViolation("spec.dataset", "must name an uploaded dataset"))
    if method not in METHODS:
        problems.append(FieldViolation("spec.method", f"unknown method {method!r}; one of {', '.join(METHODS)}"))
        raise InvalidArgument.of(problems)

    lora_settings = None
    if lora is not None and method not in LORA_METHODS:
        problems.append(FieldViolation("spec.lora", f"applies only to lora and dpo, not {method}"))
    elif method in LORA_METHODS:
        given = lora or {}
        r = given.get("r") or 8
        _check_range(problems, "spec.lora.r", r, 1, 64)
        alpha = given.get("alpha") or 2.0 * r
        _check_range(problems, "spec.lora.alpha", alpha, 0, 1024, low_open=True)
        dropout = given.get("dropout") or 0.05
        _check_range(problems, "spec.lora.dropout", dropout, 0, 1, high_open=True)
        targets = tuple(given.get("target_modules") or DEFAULT_TARGETS)
        unknown = [t for t in targets if t not in ADAPTABLE_MODULES]
        if unknown:
            problems.append(
                FieldViolation(
                    "spec.lora.target_modules", f"unknown modules {unknown}; choose from {list(ADAPTABLE_MODULES)}"
                )
            )
        elif len(set(targets)) != len(targets):
            problems.append(FieldViolation("spec.lora.target_modules", "lists a module twice"))
        lora_settings = LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets)

    hp = {k: v for k, v in hyperparameters.items() if v}
    only_for = {"selective_top_layers": "selective", "num_virtual_tokens": "prompt_tuning", "dpo_beta": "dpo"}
    for name, owner in only_for.items():
        if name in hp and method != owner:
            problems.append(FieldViolation(f"spec.hyperparameters.{name}", f"applies only to {owner}, not {method}"))
    defaults = Hyperparameters(
        learning_rate=DEFAULT_LEARNING_RATE[method], checkpoint_every_steps=default_checkpoint_every
    )
    resolved = Hyperparameters(**{**asdict(defaults), **{k: v for k, v in hp.items() if k in asdict(defaults)}})
    p = "spec.hyperparameters."
    _check_range(problems, p + "epochs", resolved.epochs, 1, 100)
    _check_range(problems, p + "learning_rate", resolved.learning_rate, 0, 1, low_open=True)
    if resolved.lr_schedule not in SCHEDULES:
        problems.append(
            FieldViolation(p + "lr_schedule", f"unknown schedule {resolved.lr_schedule!r}; one of {SCHEDULES}")
        )
    _check_range(problems, p + "batch_size", resolved.batch_size, 1, 64)
    _check_range(problems, p + "gradient_accumulation", resolved.gradient_accumulation, 1, 64)
    _check_range(problems, p + "max_seq_len", resolved.max_seq_len, 16, 2048)
    _check_range(problems, p + "seed", resolved.seed, 0, 2**31 - 1)
    _check_range(problems, p + "validation_fraction", resolved.validation_fraction, 0, 0.5, high_open=True)
    _check_range(problems, p + "early_stopping_patience", resolved.early_stopping_patience, 0, 100)
    _check_range(problems, p + "max_steps", resolved.max_steps, 0, 1_000_000)
    _check_range(problems, p + "checkpoint_every_steps", resolved.checkpoint_every_steps, 1, 1_000_000)
    _check_range(problems, p + "selective_top_layers", resolved.selective_top_layers, 1, num_layers)
    _check_range(problems, p + "num_virtual_tokens", resolved.num_virtual_tokens, 1, 128)
    _check_range(problems, p + "dpo_beta", resolved.dpo_beta, 0, 10, low_open=True)
    if problems:
        raise InvalidArgument.of(problems)
    return JobSpec(adapter_name, dataset, method, lora_settings, resolved)
