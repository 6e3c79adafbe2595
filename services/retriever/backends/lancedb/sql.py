"""Translates validated filter trees into LanceDB (DataFusion SQL) predicates, with no way to inject SQL.

Field names reach here only after validation against the collection's declared identifiers and are
backtick-quoted (which also keeps their case); values are typed scalars rendered as literals, strings
single-quoted with quotes doubled.
"""

from __future__ import annotations

import math

from services.retriever.domain import AllOf, AnyOf, Between, Equals, Filter, InList, Scalar


def column(field: str) -> str:
    """The quoted column of a metadata field. Field names are validated identifiers; backticks keep case."""
    return f"`m_{field}`"


def sql_literal(value: Scalar) -> str:
    """A SQL literal for a validated scalar; strings are single-quoted with quotes doubled (no injection)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite number in a filter")
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def where_clause(node: Filter) -> str:
    """Translates a validated filter tree into a LanceDB (DataFusion SQL) predicate."""
    if isinstance(node, Equals):
        return f"{column(node.field)} = {sql_literal(node.value)}"
    if isinstance(node, InList):
        return f"{column(node.field)} IN ({', '.join(sql_literal(v) for v in node.values)})"
    if isinstance(node, Between):
        parts = [
            f"{column(node.field)} {op} {sql_literal(bound)}"
            for op, bound in ((">", node.gt), (">=", node.gte), ("<", node.lt), ("<=", node.lte))
            if bound is not None
        ]
        return "(" + " AND ".join(parts) + ")"
    joiner = " AND " if isinstance(node, AllOf) else " OR "
    if not isinstance(node, (AllOf, AnyOf)):
        raise TypeError(f"unknown filter node {node!r}")
    return "(" + joiner.join(where_clause(child) for child in node.filters) + ")"


def ids_clause(document_ids: list[str]) -> str:
    return f"document_id IN ({', '.join(sql_literal(d) for d in document_ids)})"
