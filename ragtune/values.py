"""Conversion between Python scalars and the `ragtune.v1.Value` message used for metadata."""

from __future__ import annotations

from ragtune.v1 import common_pb2

Scalar = str | int | float | bool


def to_value(v: Scalar) -> common_pb2.Value:
    # bool before int: True is an int in Python, but a bool to the declared metadata types.
    if isinstance(v, bool):
        return common_pb2.Value(bool_value=v)
    if isinstance(v, int):
        return common_pb2.Value(int_value=v)
    if isinstance(v, float):
        return common_pb2.Value(double_value=v)
    return common_pb2.Value(string_value=str(v))


def from_value(v: common_pb2.Value) -> Scalar:
    return getattr(v, v.WhichOneof("kind"))
