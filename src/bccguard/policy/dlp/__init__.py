"""Customer data in bodies and attachments: pure detectors and the verdict they lead to."""
