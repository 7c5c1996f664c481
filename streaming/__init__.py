"""Run long async Django tasks in the background and stream their events as SSE."""
