"""`python -m ragtune.healthcheck ADDRESS [SERVICE]`: exits 0 when grpc.health.v1 reports SERVING, else 1.

The container images use it as their HEALTHCHECK (Kubernetes uses its native gRPC probes instead;
under TLS they ask the plaintext health-only port, RAGTUNE_GRPC_HEALTH_PORT). It speaks TLS the
way the process's RAGTUNE_TLS_* environment says (ragtune/tls.py): with RAGTUNE_TLS_CA_FILE it
trusts that CA and presents RAGTUNE_TLS_CLIENT_CERT_FILE, so it passes a server that requires
client certificates; `--server-name` is the name to verify when ADDRESS is 127.0.0.1. Without
RAGTUNE_TLS_* it imports only grpc and the health stubs, so a check costs a fraction of a second
and never touches the models.
"""

from __future__ import annotations

import argparse
import os
import sys

SERVING, NOT_SERVING = 0, 1


def check(address: str, service: str = "", timeout_s: float = 3.0, *, tls=None,
          server_name: str | None = None) -> tuple[int, str]:
    """Asks `address` for the health of `service` ("" for the whole server); returns (exit code, reason).
    `tls` (TLSSettings) defaults to the environment; `server_name` is the name to verify in its certificate."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None and not any(name.startswith("RAGTUNE_TLS_") for name in os.environ):
        channel = grpc.insecure_channel(address)  # the common case, without loading the settings classes
    else:
        from ragtune.tls import TLSConfigError, sync_channel

        try:
            channel = sync_channel(address, tls, server_name=server_name)
        except TLSConfigError as exc:
            return NOT_SERVING, f"TLS settings: {exc}"
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            # NOT_FOUND names an unknown service; UNAVAILABLE / DEADLINE_EXCEEDED a server not (yet) up.
            return NOT_SERVING, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING), status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ragtune.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of the gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("service", nargs="?", default="", help="full service name, e.g. ragtune.v1.GatewayService")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    parser.add_argument("--server-name", default=None,
                        help="under TLS, the name to verify in the server's certificate (default the address's host)")
    args = parser.parse_args(argv)
    code, reason = check(args.address, args.service, args.timeout, server_name=args.server_name)
    print(f"{args.address} {args.service or '(server)'}: {reason}", file=sys.stdout if code == SERVING else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
