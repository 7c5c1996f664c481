"""The ASGI entry point, importable before Django is set up (as an asgi.py needs).

# yourproject/asgi.py
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "yourproject.settings")
from streaming.asgi import get_asgi_application
application = get_asgi_application()
"""


def get_asgi_application():
    """The project's ASGI app: streaming paths, /health, and Django for all else."""
    import django

    django.setup(set_prefix=False)
    from django.conf import settings
    from django.core.handlers.asgi import ASGIHandler

    from .web.app import StreamingApp

    django_app = ASGIHandler()
    if settings.DEBUG and "django.contrib.staticfiles" in settings.INSTALLED_APPS:
        from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

        django_app = ASGIStaticFilesHandler(django_app)
    return StreamingApp(django_app)
