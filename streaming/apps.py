from django.apps import AppConfig


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.apps import apps

        from . import checks, conf, signals
        from .models import StreamTask

        conf.get_settings()  # fail at start-up, not mid-request, on a bad STREAMING dict
        # Proxies too: saving through a proxy saves a task row all the same.
        signals.connect(tuple(m for m in apps.get_models() if issubclass(m, StreamTask)))
        checks.register()
