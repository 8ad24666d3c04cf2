"""aiosmtpd's `SMTP.__init__`, without redoing its class introspection for every connection.

aiosmtpd builds three lookup tables per connection by scanning `dir()` of
the protocol and of the handler (`smtp_*` verbs, `auth_*` mechanisms via
`inspect.getmembers`, `handle_*` hooks) and inspects the EHLO hook's
signature: about 30 us per connection, a twentieth of a small message's
whole CPU. The names only depend on the classes, so they are computed once
per class here and bound per connection; the handler's hooks are bound
once per handler, which lives as long as the listener.

The attributes set are exactly those of aiosmtpd 1.4's `SMTP.__init__` for
the options bccguard uses (UTF-8 on, bytes content, no call limits, AUTH
only over TLS, our handler's 5-argument EHLO hook);
`tests/test_throughput_paths.py` compares them with a real `SMTP()` so an
aiosmtpd upgrade that adds one fails the suite instead of a session.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, _AuthMechAttr, login_always_fail

# Per protocol class: (verb, attribute) for smtp_* and (mechanism, attribute) for auth_*.
_VERBS: dict[type, tuple[tuple[str, str], ...]] = {}
_MECHANISMS: dict[type, tuple[tuple[str, str], ...]] = {}


def _verbs(cls: type) -> tuple[tuple[str, str], ...]:
    found = _VERBS.get(cls)
    if found is None:
        found = _VERBS[cls] = tuple((n[5:], n) for n in dir(cls) if n.startswith("smtp_"))
    return found


def _mechanisms(cls: type) -> tuple[tuple[str, str], ...]:
    """aiosmtpd's naming: `__auth_mechanism_name__`, else auth_X__Y -> X-Y."""
    found = _MECHANISMS.get(cls)
    if found is None:
        found = _MECHANISMS[cls] = tuple(
            (getattr(member, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")), name)
            for name, member in inspect.getmembers(cls)
            if name.startswith("auth_")
        )
    return found


def handler_hooks(handler: Any) -> dict[str, Any]:
    """The handler's handle_* hooks by command, bound once and kept on the handler."""
    hooks: dict[str, Any] | None = getattr(handler, "_bccguard_hooks", None)
    if hooks is None:
        hooks = {n[7:]: getattr(handler, n) for n in dir(handler) if n.startswith("handle_")}
        if any(n.startswith("auth_") for n in dir(handler)):
            raise TypeError("handler auth_* mechanisms are not supported here; define them on the protocol")
        if "EHLO" in hooks and len(inspect.signature(hooks["EHLO"]).parameters) != 5:
            raise TypeError("handle_EHLO must take the 5-argument form")
        handler._bccguard_hooks = hooks
    return hooks


def init_smtp(
    proto: SMTP,
    handler: Any,
    *,
    loop: asyncio.AbstractEventLoop,
    data_size_limit: int,
    hostname: str,
    ident: str,
    timeout: float,
    tls_context: ssl.SSLContext | None,
    require_starttls: bool,
    auth_exclude_mechanism: list[str],
    proxy_protocol_timeout: float | None,
) -> None:
    """Set up `proto` as `SMTP.__init__(handler, enable_SMTPUTF8=True, decode_data=False,
    auth_require_tls=True, ...)` would, minus the per-connection introspection."""
    p: Any = proto
    p.__ident__ = ident
    p.loop = loop
    asyncio.StreamReaderProtocol.__init__(
        proto,
        asyncio.StreamReader(loop=loop, limit=SMTP.line_length_limit),
        client_connected_cb=p._cb_client_connected,
        loop=loop,
    )
    p.event_handler = handler
    p.data_size_limit = data_size_limit
    p.enable_SMTPUTF8 = True
    p._decode_data = False
    p.hostname = hostname or socket.getfqdn()
    p.tls_context = tls_context
    p.require_starttls = tls_context and require_starttls
    p._timeout_duration = timeout
    p._timeout_handle = None
    p._tls_handshake_okay = True
    p._tls_protocol = None
    p._original_transport = None
    p.session = None
    p.envelope = None
    p.transport = None
    p._handler_coroutine = None
    p._auth_require_tls = True
    if proxy_protocol_timeout is not None and proxy_protocol_timeout <= 0:
        raise ValueError("proxy_protocol_timeout must be > 0")
    p._proxy_timeout = proxy_protocol_timeout
    p._authenticator = None
    p._auth_callback = login_always_fail
    p._auth_required = False
    p._auth_methods = {
        mech: _AuthMechAttr(getattr(proto, name), True)
        for mech, name in _mechanisms(type(proto))
        if mech not in auth_exclude_mechanism
    }
    p._handle_hooks = handler_hooks(handler)
    p._ehlo_hook_ver = "new" if "EHLO" in p._handle_hooks else None
    p._smtp_methods = {verb: getattr(proto, name) for verb, name in _verbs(type(proto))}
    p._enforce_call_limit = False
