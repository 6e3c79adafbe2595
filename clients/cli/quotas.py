"""`ragtune quotas set | show | list`: the caller's tenant's quota limits and its keys' overrides (admin scope)."""

from __future__ import annotations

import argparse
import sys

from ragtune.v1 import gateway_pb2

# flag name -> (limit, type, help)
_LIMITS = {
    "requests-per-s": ("requests_per_s", float, "calls per second"),
    "generated-tokens-per-min": ("generated_tokens_per_min", int, "generated tokens per minute"),
    "concurrent-streams": ("concurrent_streams", int, "streams open at once"),
    "queued-jobs": ("queued_jobs", int, "fine-tuning jobs waiting or running"),
    "running-evaluations": ("running_evaluations", int, "evaluations queued or running"),
    "stored-bytes": ("stored_bytes", int, "bytes of stored datasets"),
}
_NAMES = tuple(limit for limit, _, _ in _LIMITS.values())


def add_quota_commands(sub, client_of) -> None:
    """Registers `quotas` on the CLI's subcommands; `client_of(args)` opens the gateway client."""
    p = sub.add_parser("quotas", help="quota limits of your tenant and its API keys (admin scope)")
    actions = p.add_subparsers(dest="action", required=True)
    set_ = actions.add_parser("set", help="set limits (merged into those stored unless --replace)")
    # --key-id, not --key: the CLI's --key is the TLS client key.
    set_.add_argument("--key-id", default="", help="an API key id (from `ragtune keys list`); default: the tenant")
    for flag, (_, kind, text) in _LIMITS.items():
        set_.add_argument(f"--{flag}", type=kind, help=f"{text} (0 allows nothing)")
    set_.add_argument("--clear", action="append", default=[], choices=_NAMES,
                      help="return this limit to its default (repeatable)")
    set_.add_argument("--replace", action="store_true", help="store only the limits given; the others: default")
    show = actions.add_parser("show", help="the stored and effective limits")
    show.add_argument("--key-id", default="", help="an API key id; default: the tenant")
    actions.add_parser("list", help="the tenant's quota and its keys' overrides")
    p.set_defaults(func=lambda args: run(args, client_of(args)))


def _limits(message: gateway_pb2.QuotaLimits) -> dict:
    return {name: getattr(message, name) for name in _NAMES if message.HasField(name)}


def _print(quota: gateway_pb2.Quota) -> None:
    who = f"key {quota.key_id}" if quota.key_id else f"tenant {quota.tenant}"
    print(f"{who}" + (f"  (set by {quota.updated_by})" if quota.updated_by else "  (defaults)"))
    stored = _limits(quota.limits)
    effective = _limits(quota.effective)
    for name in _NAMES:
        value = effective.get(name, "-")
        origin = "set" if name in stored else ("tenant" if quota.key_id else "default")
        print(f"  {name:<26} {value:<16} {origin}")


def run(args: argparse.Namespace, client) -> int:
    if args.action == "list":
        for quota in client.call("ListQuotas", gateway_pb2.ListQuotasRequest()).quotas:
            _print(quota)
        return 0
    if args.action == "show":
        _print(client.call("GetQuota", gateway_pb2.GetQuotaRequest(key_id=args.key_id)).quota)
        return 0
    given = {limit: getattr(args, flag.replace("-", "_")) for flag, (limit, _, _) in _LIMITS.items()}
    given = {limit: value for limit, value in given.items() if value is not None}
    both = set(given) & set(args.clear)
    if both:
        print(f"error: {sorted(both)} both set and cleared", file=sys.stderr)
        return 2
    if not given and not args.clear and not args.replace:
        print("error: name at least one limit to set (or --clear one)", file=sys.stderr)
        return 2
    limits = {} if args.replace else _limits(
        client.call("GetQuota", gateway_pb2.GetQuotaRequest(key_id=args.key_id)).quota.limits)
    limits.update(given)
    for name in args.clear:
        limits.pop(name, None)
    reply = client.call("SetQuota", gateway_pb2.SetQuotaRequest(key_id=args.key_id,
                                                                 limits=gateway_pb2.QuotaLimits(**limits)))
    _print(reply.quota)
    return 0
