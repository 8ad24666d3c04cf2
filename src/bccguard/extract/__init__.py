"""Message bytes -> text to scan for customer data: the MIME walk and each format's reader.

Not pure (it decompresses and parses untrusted documents with third-party
libraries), so it runs at the edge, off the event loop, under the limits in
`limits.py`. What it returns is plain data (`policy.dlp.model.Extraction`)
that the pure detectors read.
"""
