"""Tasks the tests drive: scripted steps, failures, silence, each recovery policy.

The engine's test models are public (``public_stream = True``): their tests
are about streaming, not access. PrivateTask and OwnedTask are not: the
access tests (test_access.py) use them.
"""

import asyncio

from django.conf import settings
from django.db import models

from streaming.models import Recovery, StreamTask


class ScriptFields(models.Model):
    steps = models.PositiveIntegerField(default=3)
    delay = models.FloatField(default=0.0)
    payload_size = models.PositiveIntegerField(default=0)
    fail_at = models.IntegerField(null=True, blank=True)  # raise before this step
    result = models.JSONField(null=True, blank=True)  # what process() returns

    class Meta:
        abstract = True

    async def process(self):
        filler = "x" * self.payload_size
        for step in range(1, self.steps + 1):
            if self.fail_at == step:
                raise ValueError(f"failing at step {step} as scripted")
            data = {"step": step, "attempt": self.attempts}
            if filler:
                data["filler"] = filler
            await self.send_event("step", data)
            # A turn of the loop between events even at delay 0, as a task
            # doing real work gives (and as bench/ceiling.py's sender does).
            await asyncio.sleep(self.delay)
        return self.result


class ScriptedTask(ScriptFields, StreamTask):
    public_stream = True
    recovery = Recovery.RETRY


class FragileTask(ScriptFields, StreamTask):
    """The default policy: interrupted means failed."""

    public_stream = True


class EphemeralTask(ScriptFields, StreamTask):
    public_stream = True
    persist_events = False
    recovery = Recovery.RETRY


class GeneratorTask(StreamTask):
    public_stream = True

    count = models.PositiveIntegerField(default=3)
    use_async = models.BooleanField(default=True)

    async def process(self):
        if self.use_async:

            async def items():
                for i in range(self.count):
                    yield {"i": i}

            sent = await self.send_events_from(items())
        else:
            sent = await self.send_events_from({"i": i} for i in range(self.count))
        return sent


class ScriptedProxy(ScriptedTask):
    """A proxy of a task model: its rows are ScriptedTask rows."""

    class Meta:
        proxy = True


class PrivateTask(ScriptFields, StreamTask):
    """Declares nothing about access: only a token or the model's view permission opens it."""


class OwnedTask(ScriptFields, StreamTask):
    """Its owner may watch it, and whoever the default rule (the view permission) lets in."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)

    def has_stream_permission(self, user):
        return user.pk == self.owner_id or super().has_stream_permission(user)


class Report(ScriptFields, StreamTask):
    """A class name that otherapp.Report has too (system check streaming.I001): two
    apps' task models of one name, which clients must tell apart by app label."""

    public_stream = True
    recovery = Recovery.RETRY
