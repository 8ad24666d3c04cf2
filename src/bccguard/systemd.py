"""sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET.

`Type=notify` units wait for READY=1 before they count the service as up,
and STOPPING=1 tells systemd the drain has begun. The protocol is a single
AF_UNIX datagram, so a library would add more than it saves.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1"); False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
