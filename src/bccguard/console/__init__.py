"""The quarantine console: held mail reviewed, released and deleted in a browser.

An edge over `store/` and `review.py`, run as its own process
(`bccguard console`) so the SMTP event loop never serves HTML. It reads and
changes the same quarantine directory and audit log as `bccguard quarantine`,
and releases through the same `review.release_now`.
"""
