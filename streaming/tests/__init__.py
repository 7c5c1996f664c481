"""The test suite. ``manage.py test streaming.tests.StreamingSystemTests`` runs the seed's scenarios.

The name resolves lazily so that discovery (``manage.py test``) finds the
class once, in test_system.py, and not a second time here.
"""


def __getattr__(name):
    if name == "StreamingSystemTests":
        from .test_system import StreamingSystemTests

        return StreamingSystemTests
    raise AttributeError(name)
