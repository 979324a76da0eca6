"""Run an ASGI app (the personavec server, or any FastAPI app) with uvicorn in a background thread on a
loopback port: for notebooks, tests and benchmarks that talk to a real server over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal


@contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, lifespan: Literal["auto", "on", "off"] = "on",
                    start_timeout: float = 30.0, stop_timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` for the duration of the block; yields its root URL (e.g. http://127.0.0.1:PORT).

    Port 0 takes a free port; the socket is bound before the thread starts, so the URL is valid at once.
    On exit the server is asked to stop and the thread joined, even if the block raised."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout)
        sock.close()
