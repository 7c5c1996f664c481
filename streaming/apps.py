from django.apps import AppConfig


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from . import conf, signals  # noqa: F401

        conf.get_settings()  # fail at start-up, not mid-request, on a bad STREAMING dict
