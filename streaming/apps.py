from django.apps import AppConfig


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, conf, signals
        from .tasks.registry import stream_models

        conf.get_settings()  # fail at start-up, not mid-request, on a bad STREAMING dict
        signals.connect(stream_models())
        checks.register()
