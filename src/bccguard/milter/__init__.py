"""The milter edge: MTA events -> (envelope, message bytes) -> the relay's decision -> header edits/reply."""
