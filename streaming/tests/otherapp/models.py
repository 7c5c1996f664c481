"""A second test app, for the one thing it is: a task model whose class name
another app's task model has (testapp.Report). ``/stream/Report/<id>`` is then
ambiguous (404); clients, the dashboard and the admin must name them
``otherapp/Report`` and ``testapp/Report``.
"""

from streaming.models import Recovery, StreamTask
from streaming.tests.testapp.models import ScriptFields


class Report(ScriptFields, StreamTask):
    public_stream = True
    recovery = Recovery.RETRY
