from django.apps import AppConfig


class DemoConfig(AppConfig):
    """The seed's demo tasks; installed by the demo project, not part of the library."""

    name = "demo"
    verbose_name = "Demo tasks"
    default_auto_field = "django.db.models.BigAutoField"
