from django.apps import AppConfig


class OtherAppConfig(AppConfig):
    name = "streaming.tests.otherapp"
    label = "otherapp"
    verbose_name = "Streaming test tasks of a second app"
    default_auto_field = "django.db.models.BigAutoField"
