"""A TransactionTestCase with a real runserver_stream subprocess beside it."""

from django.test import TransactionTestCase

from streaming.models import TaskEvent

from .support import ServerProcess, read_stream, wait_for


class ServerTestCase(TransactionTestCase):
    """Each class gets one server on a free port, on the test database."""

    server_settings: dict = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server = ServerProcess(**cls.server_settings).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        super().tearDownClass()

    def url(self, task, **query) -> str:
        path = task.get_stream_path()
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return f"{self.server.url}{path}"

    def read(self, task, **kwargs):
        return read_stream(self.url(task), **kwargs)

    def wait_status(self, task, *statuses, timeout=15.0):
        def reached():
            task.refresh_from_db()
            return task.status in statuses

        wait_for(reached, timeout=timeout, message=f"{task} to reach {statuses}")
        return task

    def logged(self, task) -> list[TaskEvent]:
        return list(
            TaskEvent.objects.filter(task_type=task._meta.label_lower, task_id=str(task.pk)).order_by("seq")
        )

    def wait_logged(self, task, count, timeout=15.0):
        return wait_for(
            lambda: len(self.logged(task)) >= count,
            timeout=timeout,
            message=f"{count} logged events of {task}",
        )
