"""TLS for ragtune, in one place: server credentials, client channels and the HTTP front's options.

Everything comes from `ragtune.settings.TLSSettings` (RAGTUNE_TLS_*). A server serves TLS when it
has a certificate and key, and requires client certificates (mutual TLS) when it has a client CA;
a process's outgoing gRPC channels use TLS when it has a CA file, presenting its client certificate
when it has one. Nothing set = plaintext, as on one machine.

Files are read when a server or channel starts (never at import) and again by servers when they change on
disk (certificate rotation), checked here so that a wrong
path or a key that does not match its certificate fails at start with a `TLSConfigError` naming the
variable, instead of gRPC's opaque handshake failures later. Key material is never logged.
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path
from typing import Any, Sequence

import grpc

from ragtune.settings import TLSSettings

log = logging.getLogger(__name__)


class TLSConfigError(ValueError):
    """The TLS settings are incomplete or name a file that is missing, unreadable or not what it should be."""


def _env(settings: TLSSettings, field: str, names: dict[str, str] | None = None) -> str:
    """What the operator set `field` with: its environment variable, or the flag in `names`."""
    if names and field in names:
        return names[field]
    return f"{settings.model_config.get('env_prefix', '')}{field}".upper()


def _read_pem(variable: str, path: Path, what: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{variable}={path}: cannot read the {what} ({exc.strerror or exc})") from None
    if marker not in data:
        raise TLSConfigError(f"{variable}={path}: not a PEM {what} (no '{marker.decode()}' line)")
    return data


def _no_password() -> bytes:
    raise TLSConfigError("encrypted private keys are not supported: give the key unencrypted (e.g. from a Secret)")


def _check_pair(cert_var: str, cert: Path, key_var: str, key: Path) -> None:
    """The key must belong to the certificate: OpenSSL checks it the way the handshake would."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_password)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        raise TLSConfigError(f"{key_var}={key} does not fit {cert_var}={cert}: {reason}") from None


def _pair(settings: TLSSettings, cert_field: str, key_field: str,
          names: dict[str, str] | None = None) -> tuple[bytes, bytes] | None:
    """(certificate chain, key) PEM for two fields that go together, or None when both are unset."""
    cert, key = getattr(settings, cert_field), getattr(settings, key_field)
    cert_var, key_var = _env(settings, cert_field, names), _env(settings, key_field, names)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing, given = (cert_var, key_var) if cert is None else (key_var, cert_var)
        raise TLSConfigError(
            f"{given} is set but {missing} is not: set both (certificate chain and its key) or neither"
        )
    chain = _read_pem(cert_var, cert, "certificate chain", b"-----BEGIN CERTIFICATE-----")
    private = _read_pem(key_var, key, "private key", b"PRIVATE KEY-----")
    _check_pair(cert_var, cert, key_var, key)
    return chain, private


def _ca(settings: TLSSettings, field: str, names: dict[str, str] | None = None) -> bytes | None:
    path = getattr(settings, field)
    if path is None:
        return None
    return _read_pem(_env(settings, field, names), path, "CA certificate", b"-----BEGIN CERTIFICATE-----")


def _server_material(settings: TLSSettings) -> tuple[bytes, bytes, bytes | None] | None:
    """(chain, key, client CA) the server serves with, checked; None for plaintext."""
    pair = _pair(settings, "cert_file", "key_file")
    client_ca = _ca(settings, "client_ca_file")
    if pair is None:
        if client_ca is not None:
            raise TLSConfigError(
                f"{_env(settings, 'client_ca_file')} is set but the server has no certificate: set"
                f" {_env(settings, 'cert_file')} and {_env(settings, 'key_file')} too"
            )
        return None
    return (*pair, client_ca)


class FileWatch:
    """Tells when any of some files changed (modification time, size, inode), looking at most every `period_s`:
    certificates are rotated on disk (cert-manager rewrites the mounted Secret) under long-lived processes."""

    def __init__(self, paths: Sequence[Path | None], period_s: float = 1.0):
        self._paths = [Path(p) for p in paths if p is not None]
        self._period = period_s
        self._next = 0.0
        self._seen = self._signature()

    def _signature(self) -> tuple:
        marks = []
        for path in self._paths:
            try:
                st = path.stat()
                marks.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                marks.append(None)
        return tuple(marks)

    def changed(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._period
        signature = self._signature()
        if signature == self._seen:
            return False
        self._seen = signature
        return True


def server_credentials(settings: TLSSettings | None = None) -> grpc.ServerCredentials | None:
    """What a gRPC server binds with: None (plaintext) unless a certificate and key are set; with
    RAGTUNE_TLS_CLIENT_CA_FILE, clients must present a certificate that CA signed. The files are looked at
    again (at most once a second, before a new connection's handshake) and served anew when they change; a
    rotation caught half-written, or one that no longer fits, keeps the previous certificate and is logged."""
    settings = settings or TLSSettings()
    material = _server_material(settings)
    if material is None:
        return None
    chain, key, client_ca = material
    watch = FileWatch([settings.cert_file, settings.key_file, settings.client_ca_file])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if not watch.changed():
            return None
        try:
            fresh = _server_material(settings)
        except TLSConfigError as exc:
            log.warning("TLS files changed but cannot be served (keeping the previous certificate): %s", exc)
            return None
        if fresh is None:
            return None
        log.info("TLS certificate reloaded from %s", settings.cert_file)
        new_chain, new_key, new_ca = fresh
        return grpc.ssl_server_certificate_configuration([(new_key, new_chain)], root_certificates=new_ca)

    initial = grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)
    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=client_ca is not None)


def reload_ssl_context(context: ssl.SSLContext, settings: TLSSettings) -> bool:
    """Loads rotated files into a live SSLContext (the HTTP front's): new connections get them. False, and the
    old certificate kept, when the new files do not fit."""
    try:
        _server_material(settings)
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file), password=_no_password)
        if settings.client_ca_file is not None:
            context.load_verify_locations(cafile=str(settings.client_ca_file))
    except (TLSConfigError, ssl.SSLError, OSError) as exc:
        log.warning("TLS files changed but cannot be served over HTTP (keeping the previous certificate): %s", exc)
        return False
    log.info("HTTP front's TLS certificate reloaded from %s", settings.cert_file)
    return True


def channel_credentials(settings: TLSSettings | None = None) -> grpc.ChannelCredentials | None:
    """What outgoing channels use: None (plaintext) unless RAGTUNE_TLS_CA_FILE is set; then TLS trusting
    that CA, presenting RAGTUNE_TLS_CLIENT_CERT_FILE / _KEY_FILE when set."""
    settings = settings or TLSSettings()
    client = _pair(settings, "client_cert_file", "client_key_file")
    roots = _ca(settings, "ca_file")
    if roots is None:
        if client is not None:
            raise TLSConfigError(
                f"{_env(settings, 'client_cert_file')} is set but {_env(settings, 'ca_file')} is not: outgoing calls"
                " use TLS only with the CA that signed the servers' certificates"
            )
        return None
    chain, key = client or (None, None)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def client_credentials(ca_file: Path | str | None = None, cert_file: Path | str | None = None,
                       key_file: Path | str | None = None, *,
                       names: dict[str, str] | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a client given paths directly (the CLI's --ca/--cert/--key): `ca_file`
    None trusts gRPC's default roots (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else its bundled set).
    `names` maps the fields (ca_file, client_cert_file, client_key_file) to what errors call them."""
    settings = TLSSettings.model_construct(
        ca_file=Path(ca_file) if ca_file else None,
        client_cert_file=Path(cert_file) if cert_file else None,
        client_key_file=Path(key_file) if key_file else None,
    )
    client = _pair(settings, "client_cert_file", "client_key_file", names)
    roots = _ca(settings, "ca_file", names)
    chain, key = client or (None, None)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def channel_options(settings: TLSSettings | None = None, server_name: str | None = None) -> list[tuple[str, Any]]:
    """Channel options for the name verified in the server's certificate, when it is not the address's host."""
    name = server_name or (settings or TLSSettings()).server_name_override
    return [("grpc.ssl_target_name_override", name)] if name else []


def aio_channel(address: str, settings: TLSSettings | None = None, *, options: Sequence[tuple[str, Any]] = (),
                interceptors: Sequence[Any] | None = None, server_name: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS when the settings say so, else plaintext."""
    settings = settings or TLSSettings()
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=[*options, *channel_options(settings, server_name)],
                                   interceptors=interceptors)


def sync_channel(address: str, settings: TLSSettings | None = None, *, options: Sequence[tuple[str, Any]] = (),
                 server_name: str | None = None) -> grpc.Channel:
    """A blocking channel to `address`: TLS when the settings say so, else plaintext."""
    settings = settings or TLSSettings()
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials, options=[*options, *channel_options(settings, server_name)])


def http_ssl_options(settings: TLSSettings | None = None) -> dict[str, Any]:
    """Keyword arguments for uvicorn (`uvicorn.Config(..., **http_ssl_options())`) serving the same
    certificate as the gRPC server: {} when plaintext; with a client CA, client certificates required."""
    settings = settings or TLSSettings()
    server_credentials(settings)  # the same checks, so both fronts fail alike on a bad setting
    if settings.cert_file is None:
        return {}
    return {
        "ssl_certfile": str(settings.cert_file),
        "ssl_keyfile": str(settings.key_file),
        "ssl_ca_certs": str(settings.client_ca_file) if settings.client_ca_file else None,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if settings.client_ca_file else ssl.CERT_NONE,
    }


def describe(settings: TLSSettings | None = None) -> str:
    """One line for the start-up log: what this process serves and calls with (no key material)."""
    settings = settings or TLSSettings()
    serves = "plaintext"
    if settings.cert_file is not None:
        serves = "TLS, client certificates required" if settings.client_ca_file else "TLS"
    calls = "plaintext"
    if settings.ca_file is not None:
        calls = "mutual TLS" if settings.client_cert_file else "TLS"
    return f"serves {serves}; calls services over {calls}"
