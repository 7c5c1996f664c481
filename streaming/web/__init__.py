"""The HTTP face: the ASGI app (streams, /health, Django for the rest) and stream requests."""
