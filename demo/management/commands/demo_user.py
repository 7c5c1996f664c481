"""The demo project's dashboard user: `manage.py demo_user` (scripts/demo.sh runs it)."""

import secrets

from django.contrib.auth.models import Permission, User
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create (or reset) the demo's staff user with a fresh random password, allowed to see, "
        "start, cancel and re-run the demo's tasks on the dashboard (/streaming/). Demo project only."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument(
            "--url", default="http://127.0.0.1:8888/streaming/", help="the dashboard URL to print"
        )

    def handle(self, *args, username, url, **options):
        password = secrets.token_urlsafe(9)
        user, created = User.objects.get_or_create(username=username)
        user.is_staff = True
        user.is_active = True
        user.set_password(password)
        user.save()
        # The dashboard shows a model's tasks with its view permission; cancel and
        # start need change, re-run needs add (as in the admin).
        # The demo's models, and the tasks of Django's tasks framework (the demo
        # settings route @task functions to this server: streaming.EnqueuedTask).
        steer = r"^(view|change|add)_"
        user.user_permissions.add(
            *Permission.objects.filter(content_type__app_label="demo", codename__regex=steer),
            *Permission.objects.filter(
                content_type__app_label="streaming", content_type__model="enqueuedtask", codename__regex=steer
            ),
        )
        self.stdout.write(
            f"{'Created' if created else 'Reset'} the demo user: {username} / {password}\n"
            f"  Dashboard: {url} (sign in with it)"
        )
