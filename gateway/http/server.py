"""Serves the HTTP front with uvicorn inside the gateway process, on the gateway's event loop: bound at
start (port 0 = a free one, reported as `port`), stopped in order (stop accepting, let requests in flight
finish within the grace period, then cancel what remains)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

import uvicorn

from gateway.http.app import build_app
from gateway.http.context import FrontState
from ragtune.server import PortInUse
from ragtune.settings import TLSSettings
from ragtune.tls import FileWatch, reload_ssl_context

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway's host owns SIGTERM and stops us in order."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it each SSE event after the headers waited ~40 ms for the client's delayed ACK (Nagle), measured.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"cannot serve the gateway's HTTP API on {host}:{port}: the address is already in use;"
                            " stop what holds it or choose another port with RAGTUNE_GATEWAY_HTTP_PORT") from None
        raise RuntimeError(f"cannot serve the gateway's HTTP API on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpFront:
    def __init__(self, state: FrontState, ssl_options: dict | None = None, tls: TLSSettings | None = None):
        """`tls`: the settings `ssl_options` came from, so rotated certificate files are served anew."""
        s = state.settings
        self._host, self._wanted_port, self._grace = s.host, s.http_port, s.http_grace_s
        self._config = uvicorn.Config(
            build_app(state), lifespan="off", access_log=False, log_level="warning", server_header=False,
            timeout_graceful_shutdown=self._grace, **(ssl_options or {}),
        )
        self._server = _EmbeddedServer(self._config)
        self._task: asyncio.Task | None = None
        self._reloader: asyncio.Task | None = None
        self._tls = tls if ssl_options else None
        self.port: int | None = None
        self.scheme = "https" if ssl_options else "http"

    async def start(self) -> int:
        sock = _bind(self._host, self._wanted_port)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the gateway's HTTP API stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", self.scheme, self._host, self.port)
        if self._tls is not None and self._config.ssl is not None:
            self._reloader = asyncio.create_task(self._reload_certificates(), name="gateway-http-tls-reload")
        return self.port

    async def _reload_certificates(self) -> None:
        """Serves rotated certificate files to new connections (uvicorn reads them once, at start)."""
        watch = FileWatch([self._tls.cert_file, self._tls.key_file, self._tls.client_ca_file])
        while True:
            await asyncio.sleep(1.0)
            if watch.changed():
                reload_ssl_context(self._config.ssl, self._tls)

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            await asyncio.gather(self._reloader, return_exceptions=True)
            self._reloader = None
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._grace + 5)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
