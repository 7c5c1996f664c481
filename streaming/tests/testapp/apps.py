from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "streaming.tests.testapp"
    label = "testapp"
    verbose_name = "Streaming test tasks"
    default_auto_field = "django.db.models.BigAutoField"
