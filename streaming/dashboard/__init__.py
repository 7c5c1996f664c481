"""The live dashboard: every task model's tasks, live, on one page (``streaming.urls``).

``access`` decides who may open it and what each user may see and do,
``rows`` reads tasks and their latest events as the page shows them, and
``views`` serves the pages, the JSON list and the actions. The pages follow
the tasks with ``static/streaming/dashboard.js`` over one multiplexed stream.
"""
