"""Who may open the dashboard, and which models and actions each user gets.

The gate is ``STREAMING["DASHBOARD_ACCESS"]`` (a function ``(user) -> bool``;
by default active staff users). Past it, the model's own permissions apply,
as in the admin: ``view`` to see its tasks, ``change`` to cancel or start,
``add`` to re-run.
"""

from collections.abc import Callable
from functools import cache
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ..conf import get_settings
from ..models import StreamTask
from ..tasks.registry import stream_models


def staff_only(user: Any) -> bool:
    """The default gate: an active staff user."""
    return bool(user.is_authenticated and user.is_active and user.is_staff)


@cache
def _gate(path: str | None) -> Callable[[Any], bool]:
    if path is None:
        return staff_only
    try:
        gate = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"STREAMING['DASHBOARD_ACCESS'] = {path!r} cannot be imported: {exc}"
        ) from exc
    if not callable(gate):
        raise ImproperlyConfigured(f"STREAMING['DASHBOARD_ACCESS'] = {path!r} is not a function")
    return gate


def may_open(user: Any) -> bool:
    """May ``user`` (authenticated) open the dashboard at all?"""
    return bool(user.is_authenticated and _gate(get_settings().DASHBOARD_ACCESS)(user))


def _perm(model: type[StreamTask], action: str) -> str:
    return f"{model._meta.app_label}.{action}_{model._meta.model_name}"


def may_view(user: Any, model: type[StreamTask]) -> bool:
    return bool(user.has_perm(_perm(model, "view")))


def may_change(user: Any, model: type[StreamTask]) -> bool:
    """Cancel and start, as the admin's actions."""
    return bool(user.has_perm(_perm(model, "change")))


def may_add(user: Any, model: type[StreamTask]) -> bool:
    """Re-run (a new row), as the admin's action."""
    return bool(user.has_perm(_perm(model, "add")))


def viewable_models(user: Any) -> list[type[StreamTask]]:
    """The task models whose tasks ``user`` may see, by label."""
    return sorted((m for m in stream_models() if may_view(user, m)), key=lambda m: m._meta.label)
