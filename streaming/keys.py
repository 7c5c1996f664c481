"""TaskKey: how one task is named everywhere (channels, the event log, Redis)."""

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from django.db.models import Model


class TaskKey(NamedTuple):
    """A task's identity across processes: its model's ``label_lower`` and its pk as text."""

    label: str  # "app_label.modelname"
    pk: str

    @classmethod
    def of(cls, model: "type[Model] | Model", pk: object = None) -> "TaskKey":
        """The key of a task row (``TaskKey.of(task)``) or of a model and pk.

        A proxy model's rows are its concrete model's: they share one key.
        """
        if pk is None and not isinstance(model, type):
            pk = model.pk
        meta = model._meta.concrete_model._meta if model._meta.concrete_model else model._meta
        return cls(meta.label_lower, str(pk))

    @classmethod
    def parse(cls, text: str) -> "TaskKey":
        label, sep, pk = text.partition(":")
        if not sep or not label or not pk:
            raise ValueError(f"Not a task key: {text!r} (expected 'app_label.model:pk')")
        return cls(label, pk)

    def __str__(self) -> str:
        return f"{self.label}:{self.pk}"
