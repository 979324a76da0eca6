"""What `personavec serve` checks before it loads a model, so that a bad address or an empty key costs one
error line at once instead of a traceback after a long model load: the address can be listened on, and a
key that was asked for is not empty."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from ..errors import PersonavecError

API_KEY_ENV = "PERSONAVEC_API_KEY"


def check_listen(host: str, port: int) -> None:
    """Refuse a port outside 1..65535 (0 would listen on a port nobody is told) and an address uvicorn could
    not bind: a host that does not resolve or is not this machine's, or a port something already listens on.
    The test sockets are closed at once, so another program may still take the port before the server binds."""
    if not 1 <= port <= 65535:
        raise PersonavecError(f"port {port} is out of range; pick a TCP port in 1..65535 (--port)")
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            _bind_once(family, kind, proto, address)
    except OSError as exc:
        raise PersonavecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; give a --host of this "
                              "machine and a --port nothing else listens on") from None


def _bind_once(family: int, kind: int, proto: int, address: tuple[Any, ...]) -> None:
    """Bind and close a socket as asyncio's `create_server` (uvicorn's) binds one: a family this machine
    cannot open is skipped, address reuse is on, IPv6 listens apart from IPv4."""
    try:
        sock = socket.socket(family, kind, proto)
    except OSError:
        return
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)


def resolve_api_key(option: str | None, environ: Mapping[str, str]) -> str | None:
    """The key clients must send (None: no auth). `option` is what the command line resolved from --api-key
    or the environment; click drops an empty environment variable, so it is looked up here: an empty (or
    blank) key is refused instead of silently turning auth off."""
    if option is not None and option.strip():
        return option
    env = environ.get(API_KEY_ENV)
    if env is not None and not env.strip() and option in (None, env):
        raise PersonavecError(f"{API_KEY_ENV} is set but empty: set a key, or unset it to serve without auth")
    if option is not None:
        raise PersonavecError("--api-key is empty: give a key, or leave the option out to serve without auth")
    return None
