"""The inbound STARTTLS context, built from `[server.tls]` once per config snapshot.

A new context is built on every start and SIGHUP (app.py builds a new
Runtime), so a renewed certificate is picked up by new sessions without a
restart; sessions already open keep the context they negotiated with.
"""

from __future__ import annotations

import ssl

from bccguard.config import ConfigError, TLSConfig

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are
# fixed by OpenSSL and all qualify). Mozilla's "intermediate" profile.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


def server_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The context for STARTTLS, or None when no certificate is configured.

    No client certificates are asked for (aiosmtpd warns if verify_mode
    requires them), compression is off (CRIME), renegotiation is off.
    A cert/key that does not load is a ConfigError: the relay does not
    start with it, and a reload keeps the old context.
    """
    if not tls.cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion[tls.min_version.replace("TLSv1.", "TLSv1_")]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_ciphers(CIPHERS)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(
            [
                f"server.tls: cannot load {tls.cert} / {tls.key} ({reason}) "
                "(fix: a PEM certificate chain and its key)"
            ]
        ) from None
    return ctx
