"""runserver_stream's server: uvicorn parses requests, streams take their sockets over.

Internal: run it with ``manage.py runserver_stream``.
"""
