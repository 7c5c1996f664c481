"""The HTTP face: the ASGI app (streams, /health, the project's app for the rest).

Internal: a project builds the app with ``streaming.asgi.get_asgi_application()``.
"""
