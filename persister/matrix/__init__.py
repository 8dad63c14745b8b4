"""Matrix event format rules: canonical JSON, redaction, event IDs, PDU checks.

Pure functions only; nothing here does I/O.
"""
