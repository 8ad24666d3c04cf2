"""Who is on the other end: the TCP peer, or the client a PROXY header named.

Its own module so the relay's orchestration (relay.py) and the SMTP edge
(smtp/server.py) can both use it without importing each other.
"""

from __future__ import annotations

from typing import Any


def peer_ip(peer: Any) -> str:
    """The address of an asyncio `peername` (a tuple for IP sockets), as text."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def client_ip(session: Any) -> str:
    """The real client: the PROXY protocol source when one was received, else the TCP peer."""
    proxy = getattr(session, "proxy_data", None)
    src = getattr(proxy, "src_addr", None) if proxy is not None else None
    if src:
        return str(src)
    return peer_ip(getattr(session, "peer", None))
