"""The event log, and the two demo tasks of the seed (ExampleTask, ContinueTask)."""

import asyncio

from django.db import models

from .base import FINISHED_STATUSES, Recovery, Status, StreamTask

__all__ = [
    "FINISHED_STATUSES",
    "ContinueTask",
    "ExampleTask",
    "Recovery",
    "Status",
    "StreamTask",
    "TaskEvent",
]


class TaskEvent(models.Model):
    """One event of one task: the durable record behind every stream."""

    task_type = models.CharField(max_length=100)  # the model's label_lower
    task_id = models.CharField(max_length=64)
    seq = models.BigIntegerField()
    type = models.CharField(max_length=64)
    payload = models.TextField()  # the JSON sent as data:, byte for byte
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task_type", "task_id", "seq"], name="streaming_event_unique_seq")
        ]
        ordering = ["task_type", "task_id", "seq"]

    def __str__(self):
        return f"{self.task_type}:{self.task_id} #{self.seq} {self.type}"


class ExampleTask(StreamTask):
    """The seed's demo: start, three progress steps ``step_delay`` s apart, complete."""

    recovery = Recovery.RETRY  # idempotent: running it again is harmless

    message = models.CharField(max_length=500, default="Task created via management command")
    total_steps = models.PositiveIntegerField(default=3)
    step_delay = models.FloatField(default=2.0)

    async def process(self):
        await self.send_event("start", {"message": self.message, "total_steps": self.total_steps})
        for step in range(1, self.total_steps + 1):
            await asyncio.sleep(self.step_delay)
            await self.send_event(
                "progress",
                {
                    "step": step,
                    "total_steps": self.total_steps,
                    "message": f"Step {step} of {self.total_steps}",
                    "data": f"Processing step {step}...",
                },
            )
        return {"message": "Task completed successfully", "total_steps": self.total_steps}


class ContinueTask(StreamTask):
    """The seed's DB-driven task: waits until someone sets ``continue_field``."""

    recovery = Recovery.RETRY  # waiting again is harmless

    message = models.CharField(max_length=500, default="Waiting for signal...")
    continue_field = models.BooleanField(default=False)
    # None: wait as long as it takes (a person may need minutes to open a shell).
    wait_timeout = models.FloatField(null=True, blank=True)
    poll_interval = models.FloatField(default=0.5)

    async def process(self):
        await self.send_event("started", {"message": self.message, "continue": self.continue_field})
        try:
            await self.wait_until(
                lambda task: task.continue_field,
                fields=["continue_field"],
                poll_interval=self.poll_interval,
                timeout=self.wait_timeout,
            )
        except TimeoutError:
            raise TimeoutError(f"continue_field was not set within {self.wait_timeout:g} s") from None
        await self.send_event(
            "final", {"message": "Continue signal received", "continue": self.continue_field}
        )
        return {"message": "Task completed successfully"}
