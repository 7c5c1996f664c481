"""Which models are streamable, and how a task is named in keys and URLs."""

from functools import cache

from django.apps import apps

from ..models import StreamTask


@cache
def stream_models() -> tuple[type[StreamTask], ...]:
    return tuple(
        model
        for model in apps.get_models()
        if issubclass(model, StreamTask) and not model._meta.proxy and model.runs_here()
    )


class UnknownModel(LookupError):
    pass


def resolve_model(name: str, app_label: str | None = None) -> type[StreamTask]:
    """The streamable model named ``name`` (optionally in ``app_label``).

    Anything that is not a StreamTask subclass is unknown, whatever Django
    calls it: /stream/auth/User/1 finds nothing.
    """
    candidates = [
        model
        for model in stream_models()
        if model.__name__ == name and (app_label is None or model._meta.app_label == app_label)
    ]
    if not candidates:
        where = f"{app_label}.{name}" if app_label else name
        # Only a name the client typed, give or take case: nothing it did not know.
        near = sorted({m.__name__ for m in stream_models() if m.__name__.lower() == name.lower()})
        hint = f" (names are case-sensitive: {', '.join(repr(n) for n in near)}?)" if near else ""
        raise UnknownModel(f"Unknown task model '{where}'{hint}")
    if len(candidates) > 1:
        labels = ", ".join(m._meta.label for m in candidates)
        raise UnknownModel(
            f"Task model name '{name}' is ambiguous ({labels}); use /stream/<app_label>/<Model>/<id>"
        )
    return candidates[0]
