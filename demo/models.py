"""The seed's two demo tasks: ExampleTask (steps on a timer) and ContinueTask (steered by its row)."""

import asyncio
from typing import Any

from django.db import models

from streaming import Recovery, StreamTask


class ExampleTask(StreamTask):
    """The seed's demo: start, three progress steps ``step_delay`` s apart, complete."""

    recovery = Recovery.RETRY  # idempotent: running it again is harmless
    public_stream = True  # the seed's curl and stream_client.py watch it without credentials

    message = models.CharField(max_length=500, default="Task created via management command")
    total_steps = models.PositiveIntegerField(default=3)
    step_delay = models.FloatField(default=2.0)

    async def process(self) -> dict[str, Any]:
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
    public_stream = True  # the seed's curl and stream_client.py watch it without credentials

    message = models.CharField(max_length=500, default="Waiting for signal...")
    continue_field = models.BooleanField(default=False)
    # None: wait as long as it takes (a person may need minutes to open a shell).
    wait_timeout = models.FloatField(null=True, blank=True)
    poll_interval = models.FloatField(default=0.5)

    async def process(self) -> dict[str, Any]:
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
