"""The naming rules every service applies: what a collection, adapter, metadata field, dataset or alias may
be called. Written once here so the services, the registry and the job specs cannot drift apart."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ragtune.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class NameRule:
    pattern: re.Pattern[str]
    description: str  # completes "must be ..."

    def matches(self, name: str | None) -> bool:
        return bool(self.pattern.match(name or ""))

    def violation(self, name: str | None, field: str) -> FieldViolation | None:
        return None if self.matches(name) else FieldViolation(field, f"must be {self.description}")

    def check(self, name: str | None, field: str) -> str:
        """The name, or INVALID_ARGUMENT naming `field` and the rule."""
        if not self.matches(name):
            raise InvalidArgument(field, f"must be {self.description}")
        return name


# Collections and adapters: also folder names in the artifact store, hence no dots or slashes.
RESOURCE_NAME = NameRule(
    re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"), "a letter, then up to 63 letters, digits, '_' or '-'"
)
# Metadata fields become Weaviate properties and LanceDB columns: no '-'.
FIELD_NAME = NameRule(re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$"), "a letter, then up to 63 letters, digits or '_'")
# Datasets are uploaded files: a dot is allowed ("support.v2"), a leading one is not.
DATASET_NAME = NameRule(
    re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"),
    "a letter or digit, then up to 127 letters, digits, '_', '-' or '.'",
)
# Aliases are short and lowercase so "<name>@prod" reads the same everywhere.
ALIAS_NAME = NameRule(
    re.compile(r"^[a-z][a-z0-9_-]{0,31}$"), "a lowercase letter, then up to 31 lowercase letters, digits, '_' or '-'"
)
