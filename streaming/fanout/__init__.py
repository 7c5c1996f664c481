"""Local fanout: per-task channels, cursors, coalesced writes, catch-up, keep-alives.

Internal: no stability promise (see ``streaming`` for the public API).
"""
