"""Local fanout: per-task channels, cursors, coalesced writes, catch-up, keep-alives."""
