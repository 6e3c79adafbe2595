"""What a job trains: the method, LoRA settings and hyperparameters. A client's values are checked by
pydantic models (every bad value reported as a field violation named by its path in the CreateJob
request, e.g. spec.hyperparameters.learning_rate), then defaults are applied into plain dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ragtune.naming import RESOURCE_NAME
from ragtune.errors import FieldViolation, InvalidArgument

METHODS = ("lora", "selective", "ia3", "prompt_tuning", "dpo")
LORA_METHODS = ("lora", "dpo")
SCHEDULES = ("linear", "cosine", "constant")
# The linear layers of every SmolLM2 (Llama) decoder layer, which LoRA can adapt.
ADAPTABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Peak learning rates that suit each method: adapters with few parameters need larger steps.
DEFAULT_LEARNING_RATE = {"lora": 2e-4, "selective": 2e-5, "ia3": 3e-3, "prompt_tuning": 3e-2, "dpo": 5e-5}
# Hyperparameters that mean something for one method only.
ONLY_FOR = {"selective_top_layers": "selective", "num_virtual_tokens": "prompt_tuning", "dpo_beta": "dpo"}


# -- the resolved spec: what the runner trains (stored with the job as a dict) -------------------


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
class GateSettings:
    """A promotion gate: once trained, the new version must beat what `alias` serves on `metric` by
    `margin` (lower 95% bound) over the eval set before the alias moves to it."""

    eval_set: str
    alias: str
    metric: str = "token_f1"
    margin: float = 0.0
    collection: str = ""


@dataclass(frozen=True)
class JobSpec:
    adapter_name: str
    dataset: str
    method: str = "lora"
    lora: LoraSettings | None = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    gate: GateSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        lora = data.get("lora")
        gate = data.get("gate")
        return cls(
            adapter_name=data["adapter_name"],
            dataset=data["dataset"],
            method=data["method"],
            lora=LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])}) if lora else None,
            hyperparameters=Hyperparameters(**data["hyperparameters"]),
            gate=GateSettings(**gate) if gate else None,
        )


@dataclass(frozen=True)
class SpecRequest:
    """A client's values as sent; None (or absent) means "use the default" (proto3 sends zero)."""

    adapter_name: str
    dataset: str
    method: str
    lora: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None


# -- validation: the client's values, with the bounds the training code relies on ----------------


class _LoraModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    r: int = Field(8, ge=1, le=64)
    alpha: float | None = Field(None, gt=0, le=1024)  # None: twice the rank
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in targets if t not in ADAPTABLE_MODULES]
        if unknown:
            raise ValueError(f"unknown modules {unknown}; choose from {list(ADAPTABLE_MODULES)}")
        if len(set(targets)) != len(targets):
            raise ValueError("lists a module twice")
        return targets


class _HyperparametersModel(BaseModel):
    """Only the values the client set (the rest stay None and get the method's defaults)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    epochs: int | None = Field(None, ge=1, le=100)
    learning_rate: float | None = Field(None, gt=0, le=1)
    lr_schedule: Literal["linear", "cosine", "constant"] | None = None
    batch_size: int | None = Field(None, ge=1, le=64)
    gradient_accumulation: int | None = Field(None, ge=1, le=64)
    max_seq_len: int | None = Field(None, ge=16, le=2048)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    validation_fraction: float | None = Field(None, ge=0, lt=0.5)
    early_stopping_patience: int | None = Field(None, ge=0, le=100)
    max_steps: int | None = Field(None, ge=0, le=1_000_000)
    checkpoint_every_steps: int | None = Field(None, ge=1, le=1_000_000)
    selective_top_layers: int | None = Field(None, ge=1)
    num_virtual_tokens: int | None = Field(None, ge=1, le=128)
    dpo_beta: float | None = Field(None, gt=0, le=10)

    @field_validator("selective_top_layers", "num_virtual_tokens", "dpo_beta")
    @classmethod
    def _only_for_its_method(cls, value, info: ValidationInfo):
        method = (info.context or {}).get("method")
        owner = ONLY_FOR[info.field_name]
        if method in METHODS and method != owner:
            raise ValueError(f"applies only to {owner}, not {method}")
        return value

    @field_validator("selective_top_layers")
    @classmethod
    def _within_the_model(cls, value: int, info: ValidationInfo) -> int:
        layers = (info.context or {}).get("num_layers")
        if layers and value > layers:
            raise ValueError(f"{value} is more than the model's {layers} layers")
        return value


class _GateModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    eval_set: str = Field(min_length=1, max_length=16 * 1024 * 1024)
    alias: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    metric: Literal["token_f1", "exact_match", "rouge_l", "citation_precision"] = "token_f1"
    margin: float = Field(0.0, ge=0, le=1)
    collection: str = Field("", max_length=64)


class _SpecModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    adapter_name: str
    dataset: str
    method: Literal["lora", "selective", "ia3", "prompt_tuning", "dpo"]
    lora: _LoraModel | None = None
    hyperparameters: _HyperparametersModel = _HyperparametersModel()
    gate: _GateModel | None = None

    @field_validator("adapter_name")
    @classmethod
    def _adapter_name(cls, name: str) -> str:
        if not RESOURCE_NAME.matches(name):
            raise ValueError(f"must be {RESOURCE_NAME.description}")
        return name

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, name: str) -> str:
        if not name:
            raise ValueError("must name an uploaded dataset")
        return name

    @field_validator("lora")
    @classmethod
    def _lora_methods_only(cls, lora, info: ValidationInfo):
        method = info.data.get("method")
        if lora is not None and method is not None and method not in LORA_METHODS:
            raise ValueError(f"applies only to lora and dpo, not {method}")
        return lora


def violations(error: ValidationError, prefix: str = "") -> list[FieldViolation]:
    """pydantic's errors as field violations named by their path in the request."""
    found = []
    for item in error.errors(include_url=False):
        path = prefix + ".".join(str(part) for part in item["loc"])
        if item["type"] == "value_error":
            description = str(item["ctx"]["error"])
        else:
            description = f"{item['msg']} (got {item['input']!r})"
        found.append(FieldViolation(path.rstrip("."), description))
    return found


def validated(model: type[BaseModel], data: dict[str, Any], *, prefix: str = "", context: dict | None = None):
    """`model` built from `data`, or InvalidArgument naming every bad field at once."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        raise InvalidArgument.of(violations(error, prefix)) from None


def _given(values: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (values or {}).items() if v not in (None, 0, 0.0, "", (), [])}


def resolve_spec(request: SpecRequest, *, num_layers: int, default_checkpoint_every: int) -> JobSpec:
    """Validates a client's spec and applies the defaults; raises InvalidArgument naming every bad
    field (spec.lora.r, spec.hyperparameters.learning_rate, ...)."""
    data = {
        "adapter_name": request.adapter_name or "",
        "dataset": request.dataset or "",
        "method": request.method,
        "lora": None if request.lora is None else _given(request.lora),
        "hyperparameters": _given(request.hyperparameters),
        "gate": request.gate,
    }
    context = {"method": request.method, "num_layers": num_layers}
    spec = validated(_SpecModel, data, prefix="spec.", context=context)
    lora = None
    if spec.method in LORA_METHODS:
        given = spec.lora or _LoraModel()
        alpha = given.alpha or 2.0 * given.r
        lora = LoraSettings(r=given.r, alpha=float(alpha), dropout=float(given.dropout),
                            target_modules=tuple(given.target_modules))
    defaults = Hyperparameters(
        learning_rate=DEFAULT_LEARNING_RATE[spec.method], checkpoint_every_steps=default_checkpoint_every
    )
    chosen = spec.hyperparameters.model_dump(exclude_none=True)
    hyperparameters = Hyperparameters(**{**asdict(defaults), **chosen})
    gate = GateSettings(**spec.gate.model_dump()) if spec.gate else None
    return JobSpec(spec.adapter_name, spec.dataset, spec.method, lora, hyperparameters, gate)
