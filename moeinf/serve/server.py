"""`moeinf serve`'s server: the port bound before the model loads, then uvicorn over the app.

    sock = bind_port("127.0.0.1", 8000)      # PortInUseError now, not after a long load
    llm = LLM(...)
    server = Server(llm, sock, ["my-model"])  # an engine loop over the LLM
    server.run()                              # blocks; SIGINT / SIGTERM (main thread) or stop()
                                              # end it once the requests it has are answered

uvicorn speaks HTTP (keep-alive, bodies, disconnects); its graceful shutdown stops taking
connections and waits for the open ones, streams included.
"""

from __future__ import annotations

import errno
import socket

import uvicorn

from moeinf.errors import MoeinfError
from moeinf.runtime.engine import LLM
from moeinf.runtime.engine_loop import EngineLoop
from moeinf.serve.app import build_app


class ServeError(MoeinfError, OSError):
    """The server cannot listen where it was asked to."""


class PortInUseError(ServeError):
    """Another process listens on the port."""


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), ready for the server to listen on."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"--port: expected an integer in [0, 65535], found {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ServeError(f"--host: expected an address this machine has, found {host!r} ({error})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart does not wait out TIME_WAIT
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"{host}:{port}: address already in use (another server listens there); pass another --port, "
                "or --port 0 for any free one"
            ) from None
        raise ServeError(f"{host}:{port}: cannot listen there ({error.strerror})") from None
    return sock


class Server:
    def __init__(
        self,
        llm: LLM,
        sock: socket.socket,
        names: list[str],
        max_running: int | None = None,
        log_requests: bool = True,
        engine: EngineLoop | None = None,
    ):
        """engine: what runs the requests (default: an EngineLoop of max_running over llm; a
        benchmark passes its baseline, which submits, cancels and closes alike); run() closes it."""
        self.llm, self.sock, self.names = llm, sock, names
        self.engine = engine or EngineLoop(llm, max_running)
        config = uvicorn.Config(
            build_app(llm, self.engine, names),
            log_level="info" if log_requests else "warning",
            access_log=log_requests,
            lifespan="off",
        )
        self.uvicorn = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    @property
    def started(self) -> bool:
        return self.uvicorn.started

    def run(self) -> None:
        """Serves until stop() or, on the main thread, SIGINT / SIGTERM; returns once the open
        requests are answered."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.engine.close()  # answers what it still holds first
            self.sock.close()

    def stop(self) -> None:
        """Asks run() to finish (from any thread)."""
        self.uvicorn.should_exit = True
