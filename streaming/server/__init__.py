"""runserver_stream's server: uvicorn parses requests, streams take their sockets over."""
