"""Signal receivers: connected per task model (proxies included), never for every model."""

from django.db.models.deletion import Collector
from django.test import TransactionTestCase

from streaming.keys import TaskKey
from streaming.models import TaskEvent
from streaming.tasks import wake
from streaming.tasks.store import write_events
from streaming.tests.testapp.models import ScriptedProxy, ScriptedTask

from .test_broker import ev


class RecordingHooks:
    def __init__(self):
        self.woken = 0
        self.changed: list[TaskKey] = []

    def wake_all(self):
        self.woken += 1

    def row_changed(self, key):
        self.changed.append(key)


class SignalTests(TransactionTestCase):
    def setUp(self):
        self.hooks = RecordingHooks()
        wake.install(self.hooks)
        self.addCleanup(wake.uninstall, self.hooks)

    def test_a_pending_row_saved_wakes_the_runners_after_commit(self):
        task = ScriptedTask.objects.create(status="pending")
        self.assertEqual(self.hooks.woken, 1)
        self.assertEqual(self.hooks.changed, [TaskKey("testapp.scriptedtask", str(task.pk))])

    def test_a_created_row_changes_the_row_but_wakes_nobody(self):
        ScriptedTask.objects.create(status="created")
        self.assertEqual(self.hooks.woken, 0)
        self.assertEqual(len(self.hooks.changed), 1)

    def test_saving_through_a_proxy_wakes_the_runners_for_the_concrete_row(self):
        task = ScriptedProxy.objects.create(status="pending")
        self.assertEqual(self.hooks.woken, 1)
        self.assertEqual(self.hooks.changed, [TaskKey("testapp.scriptedtask", str(task.pk))])

    def test_deleting_a_task_through_a_proxy_deletes_its_events(self):
        task = ScriptedProxy.objects.create(status="created")
        write_events([(TaskKey.of(ScriptedTask, task.pk), ev(1))])
        task.delete()
        self.assertFalse(TaskEvent.objects.filter(task_id=str(task.pk)).exists())

    def test_models_that_are_not_tasks_keep_fast_delete(self):
        # A post_delete receiver without a sender would make this False for every model.
        self.assertTrue(Collector(using="default").can_fast_delete(TaskEvent.objects.all()))
