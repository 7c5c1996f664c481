"""Running tasks: the registry of task models, the store (all SQL), the event-log
writer, one run of a task, the runner, and how runners are woken.

Internal: no stability promise. The public API is in ``streaming``,
``streaming.asgi``, ``streaming.admin``, ``streaming.testing`` and
``streaming.client``.
"""
