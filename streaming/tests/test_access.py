"""Who may watch a task (streaming/access.py), against a real server over HTTP.

Public classes answer everyone; a protected one (the default) only a request
with a stream token for the task, or of a Django user (session cookie) whom
the class's ``has_stream_permission`` lets in. 403 for "not allowed", with
or without the row; 401 for a bad token; 404 only once access is proven.
Also: the Host header against ALLOWED_HOSTS, and no traceback to clients.
"""

import sys
import time
from dataclasses import dataclass, field
from unittest import mock

import httpx
from django.conf import settings
from django.contrib.auth.models import AnonymousUser, Permission, User
from django.contrib.sessions.models import Session
from django.core import signing
from django.test import SimpleTestCase, TestCase, override_settings

from demo.models import ExampleTask
from streaming import access
from streaming.keys import TaskKey
from streaming.tests.testapp.models import OwnedTask, PrivateTask, ScriptedTask
from streaming.web import app as web_app

from .servercase import ServerTestCase
from .support import SSE, parse_sse, read_stream

HOSTS_SETTINGS = {"DJANGO_SETTINGS_MODULE": "streaming.tests.settings_hosts"}
UVICORN = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", "{port}"]


@dataclass
class Watched:
    """A stream read until the server closed it: each event with when it arrived."""

    status: int
    body: str = ""
    events: list[SSE] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.time() of each event
    closed_at: float = 0.0

    @property
    def types(self) -> list[str]:
        return [e.event for e in self.events]


def watch(url: str, headers: dict | None = None, timeout: float = 30.0) -> Watched:
    """GET ``url`` and read it to the end (the server closes a stream after its last event)."""
    with httpx.stream("GET", url, headers=headers or {}, timeout=timeout) as response:
        if response.status_code != 200:
            return Watched(response.status_code, response.read().decode())
        watched = Watched(200)
        buffer = ""
        for text in response.iter_text():
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for message in parse_sse(block + "\n\n"):
                    watched.events.append(message)
                    watched.arrived.append(time.time())
        watched.closed_at = time.time()
        return watched


def forged_token(
    keys: list[str], expires_at: float, *, salt: str = access.TOKEN_SALT, key: str | None = None
) -> str:
    """A token as stream_token() builds one, with any expiry (or another salt or key)."""
    signer = signing.Signer(key=key, salt=salt)
    return signer.sign_object({"k": keys, "x": expires_at}, compress=True)


def tampered(token: str) -> str:
    """The token with one character of its payload changed."""
    payload, _, signature = token.rpartition(":")
    index = len(payload) // 2
    swapped = "A" if payload[index] != "A" else "B"
    return f"{payload[:index]}{swapped}{payload[index + 1 :]}:{signature}"


class AccessCase(ServerTestCase):
    def path_url(self, model, pk, **query) -> str:
        url = f"{self.server.url}/stream/{model.stream_name()}/{pk}"
        if query:
            url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return url

    def get(self, url: str, **headers) -> httpx.Response:
        return httpx.get(url, headers=headers, timeout=10)

    def status(self, url: str, **headers) -> httpx.Response:
        return self.get(url, accept="application/json", **headers)

    def session_cookie(self, user) -> str:
        """A real Django session of ``user`` (a row in the test database), as a Cookie header."""
        self.client.force_login(user)
        return f"{settings.SESSION_COOKIE_NAME}={self.client.cookies[settings.SESSION_COOKIE_NAME].value}"

    def assertRefused(self, response: httpx.Response | Watched, status: int, text: str):
        code = response.status_code if isinstance(response, httpx.Response) else response.status
        body = response.text if isinstance(response, httpx.Response) else response.body
        self.assertEqual(code, status, body)
        self.assertIn(text, body)
        self.assertEqual(body.count("\n"), 1, "a one-line message")


class AnonymousAccessTests(AccessCase):
    def test_anonymous_gets_no_stream_and_no_status_of_a_protected_task(self):
        task = PrivateTask.objects.create(steps=1)
        self.wait_status(task, "completed")
        missing = task.pk + 1000
        for pk in (task.pk, missing):
            with self.subTest(pk=pk):
                stream = self.get(self.path_url(PrivateTask, pk))
                self.assertRefused(stream, 403, f"Not allowed to watch PrivateTask {pk}")
                status = self.status(self.path_url(PrivateTask, pk))
                self.assertRefused(status, 403, f"Not allowed to watch PrivateTask {pk}")
                history = self.get(self.path_url(PrivateTask, pk, history="all"), **{"last-event-id": "0"})
                self.assertEqual(history.status_code, 403)
        # Whether the row exists makes no difference to the answer.
        existing = self.get(self.path_url(PrivateTask, task.pk)).text.replace(str(task.pk), "N")
        absent = self.get(self.path_url(PrivateTask, missing)).text.replace(str(missing), "N")
        self.assertEqual(existing, absent)

    def test_a_class_that_declares_nothing_is_protected(self):
        self.assertFalse(PrivateTask.public_stream)
        self.assertFalse(OwnedTask.public_stream)
        self.assertTrue(ExampleTask.public_stream)

    def test_a_public_demo_task_streams_to_anyone(self):
        task = ExampleTask.objects.create(step_delay=0.02)
        events = read_stream(self.url(task, history="all"))
        self.assertEqual([e.event for e in events], ["start", "progress", "progress", "progress", "complete"])
        self.assertEqual(self.status(self.url(task)).status_code, 200)
        # Public models answer 404 for a missing row, as before.
        self.assertEqual(self.get(self.path_url(ExampleTask, task.pk + 1000)).status_code, 404)

    def test_a_logged_out_or_unknown_session_is_anonymous(self):
        user = User.objects.create_superuser("root", password="pw")
        task = PrivateTask.objects.create(steps=1)
        cookie = self.session_cookie(user)
        allowed = self.status(self.url(task), cookie=cookie)
        self.assertEqual(allowed.status_code, 200)  # the session works...
        self.assertEqual(allowed.headers["cache-control"], "no-store")  # ...for this request only
        self.client.logout()  # ...until it is logged out (its row deleted)
        refused = self.status(self.url(task), cookie=cookie)
        self.assertRefused(refused, 403, "Not allowed")
        self.assertEqual(refused.headers["cache-control"], "no-store")
        garbage = f"{settings.SESSION_COOKIE_NAME}=nosuchsessionkeyatall0123456789"
        self.assertRefused(self.get(self.url(task), cookie=garbage), 403, "Not allowed")
        # A session cookie is not a token: no 401 for it.
        self.assertRefused(self.get(self.url(task), cookie="sessionid=x; other=y"), 403, "Not allowed")


class SessionAccessTests(AccessCase):
    def setUp(self):
        self.owner = User.objects.create_user("owner", password="pw")
        self.other = User.objects.create_user("other", password="pw")

    def test_the_owner_streams_and_another_user_is_refused(self):
        task = OwnedTask.objects.create(owner=self.owner, steps=3, delay=0.05)
        events = read_stream(
            self.url(task), headers={"cookie": self.session_cookie(self.owner), "last-event-id": "0"}
        )
        self.assertEqual([e.event for e in events], ["step", "step", "step", "complete"])
        self.assertEqual(
            self.status(self.url(task), cookie=self.session_cookie(self.owner)).json()["status"], "completed"
        )
        other = self.session_cookie(self.other)
        self.assertRefused(
            self.get(self.url(task), cookie=other), 403, f"Not allowed to watch OwnedTask {task.pk}"
        )
        self.assertRefused(self.status(self.url(task), cookie=other), 403, "Not allowed")

    def test_the_models_view_permission_lets_a_user_watch_its_tasks(self):
        task = PrivateTask.objects.create(steps=2, delay=0.05)
        cookie = self.session_cookie(self.other)
        self.assertRefused(self.get(self.url(task), cookie=cookie), 403, "Not allowed")
        self.other.user_permissions.add(Permission.objects.get(codename="view_privatetask"))
        events = read_stream(self.url(task, history="all"), headers={"cookie": cookie})
        self.assertEqual([e.event for e in events], ["step", "step", "complete"])
        # The permission is the model's: OwnedTask's view permission is another one.
        owned = OwnedTask.objects.create(owner=self.owner, steps=1)
        self.assertRefused(self.get(self.url(owned), cookie=cookie), 403, "Not allowed")

    def test_a_superuser_watches_anything(self):
        root = User.objects.create_superuser("root", password="pw")
        task = OwnedTask.objects.create(owner=self.owner, steps=1)
        events = read_stream(self.url(task, history="all"), headers={"cookie": self.session_cookie(root)})
        self.assertEqual(events[-1].event, "complete")

    def test_a_missing_row_is_403_for_a_user_too(self):
        # The hook decides per row; a row that does not exist is granted to nobody.
        root = User.objects.create_superuser("root", password="pw")
        cookie = self.session_cookie(root)
        self.assertRefused(self.get(self.path_url(PrivateTask, 999999), cookie=cookie), 403, "Not allowed")
        self.assertRefused(self.status(self.path_url(PrivateTask, 999999), cookie=cookie), 403, "Not allowed")

    def test_an_inactive_user_or_a_changed_password_ends_the_sessions_access(self):
        task = OwnedTask.objects.create(owner=self.owner, steps=1)
        cookie = self.session_cookie(self.owner)
        self.assertEqual(self.status(self.url(task), cookie=cookie).status_code, 200)
        self.owner.set_password("new")  # Django logs the other sessions out (the session auth hash)
        self.owner.save()
        self.assertRefused(self.status(self.url(task), cookie=cookie), 403, "Not allowed")
        cookie = self.session_cookie(self.owner)
        self.assertEqual(self.status(self.url(task), cookie=cookie).status_code, 200)
        User.objects.filter(pk=self.owner.pk).update(is_active=False)
        self.assertRefused(self.status(self.url(task), cookie=cookie), 403, "Not allowed")


class TokenAccessTests(AccessCase):
    def test_a_token_opens_its_task_in_the_query_string_and_as_bearer(self):
        task = PrivateTask.objects.create(steps=3, delay=0.05)
        events = read_stream(
            f"{self.server.url}{task.stream_url(expires_in=60)}", headers={"last-event-id": "0"}
        )
        self.assertEqual([e.event for e in events], ["step", "step", "step", "complete"])
        bearer = {"authorization": f"Bearer {task.stream_token(expires_in=60)}"}
        self.assertEqual(read_stream(self.url(task, history="all"), headers=bearer)[-1].event, "complete")
        status = self.status(self.url(task), **bearer)
        self.assertEqual(status.status_code, 200, status.text)
        self.assertEqual(status.json()["status"], "completed")

    def test_a_token_never_opens_another_task(self):
        mine, theirs = PrivateTask.objects.create(steps=1), PrivateTask.objects.create(steps=1)
        token = mine.stream_token()
        for headers, query in (({}, {"token": token}), ({"authorization": f"Bearer {token}"}, {})):
            with self.subTest(bearer=bool(headers)):
                self.assertRefused(self.get(self.url(theirs, **query), **headers), 403, "Not allowed")
                self.assertRefused(self.status(self.url(theirs, **query), **headers), 403, "Not allowed")
                # Nor the same pk in another model.
                owned = self.path_url(OwnedTask, mine.pk, **query)
                self.assertRefused(self.get(owned, **headers), 403, "Not allowed")

    def test_a_valid_token_for_a_missing_row_is_404(self):
        token = forged_token(["testapp.privatetask:999999"], time.time() + 60)
        self.assertRefused(self.get(self.path_url(PrivateTask, 999999, token=token)), 404, "not found")

    def test_a_tampered_token_is_refused_loudly(self):
        task = PrivateTask.objects.create(steps=1)
        token = task.stream_token()
        bad_tokens = {
            "tampered": tampered(token),
            "another signature": token[:-3] + ("xyz" if not token.endswith("xyz") else "abc"),
            "another salt": forged_token([str(TaskKey.of(task))], time.time() + 60, salt="other"),
            "another key": forged_token([str(TaskKey.of(task))], time.time() + 60, key="not-our-secret"),
            "not a token": "hello",
            "empty": "",
        }
        for name, bad in bad_tokens.items():
            with self.subTest(name):
                response = self.get(self.url(task, token=bad))
                self.assertRefused(response, 401, "Invalid stream token")
                self.assertIn('Bearer error="invalid_token"', response.headers["www-authenticate"])
                self.assertRefused(
                    self.status(self.url(task), authorization=f"Bearer {bad}x"), 401, "Invalid"
                )
        # A session that would let the user in does not rescue a bad token: the token decides.
        root = User.objects.create_superuser("root", password="pw")
        cookie = self.session_cookie(root)
        self.assertRefused(self.get(self.url(task, token=tampered(token)), cookie=cookie), 401, "Invalid")

    def test_an_expired_token_is_refused_loudly(self):
        task = PrivateTask.objects.create(steps=1)
        self.wait_status(task, "completed")
        expired = forged_token([str(TaskKey.of(task))], int(time.time()) - 1)
        self.assertRefused(self.get(self.url(task, token=expired)), 401, "Stream token expired")
        self.assertRefused(self.status(self.url(task), authorization=f"Bearer {expired}"), 401, "expired")
        # Resuming is a new request: access is checked again.
        resume = self.get(self.url(task, token=expired), **{"last-event-id": "1"})
        self.assertRefused(resume, 401, "Stream token expired")

    def test_a_token_given_twice_is_a_bad_request(self):
        task = PrivateTask.objects.create(steps=1)
        token = task.stream_token()
        response = self.get(self.url(task, token=token), authorization=f"Bearer {token}")
        self.assertRefused(response, 400, "not both")

    def test_a_token_for_several_tasks_opens_each_of_them_and_no_other(self):
        a, b = PrivateTask.objects.create(steps=1), PrivateTask.objects.create(steps=1)
        owned = OwnedTask.objects.create(steps=1)
        other = PrivateTask.objects.create(steps=1)
        token = access.stream_token([a, b, owned], expires_in=60)
        for task in (a, b, owned):
            with self.subTest(task=str(task)):
                events = read_stream(self.url(task, token=token, history="all"))
                self.assertEqual(events[-1].event, "complete")
        self.assertRefused(self.get(self.url(other, token=token)), 403, "Not allowed")

    def test_a_token_expiring_mid_stream_ends_the_stream_with_an_event_that_says_why(self):
        assert_expires_mid_stream(self)

    def test_the_json_status_of_a_failed_task_has_no_traceback(self):
        task = PrivateTask.objects.create(steps=3, fail_at=2)
        self.wait_status(task, "failed")
        response = self.status(self.url(task, token=task.stream_token()))
        self.assertEqual(response.status_code, 200, response.text)
        body = response.json()
        self.assertEqual(body["status"], "failed")
        self.assertEqual(body["error"], {"type": "ValueError", "message": "failing at step 2 as scripted"})
        self.assertNotIn("Traceback", response.text)
        self.assertNotIn("File ", response.text)
        task.refresh_from_db()
        self.assertIn("Traceback (most recent call last)", task.error)  # the row keeps it, for the admin
        # The error event carries the type and message only (and the runner's keys).
        events = read_stream(self.url(task, token=task.stream_token(), history="all"))
        error = events[-1]
        self.assertEqual(error.event, "error")
        self.assertEqual(set(error.data), {"type", "message", "_task_id", "_model", "_timestamp"})
        self.assertNotIn("Traceback", str(error.data))
        # A task that did not fail has no error.
        done = ScriptedTask.objects.create(steps=1)
        self.wait_status(done, "completed")
        self.assertIsNone(self.status(self.url(done)).json()["error"])


def assert_expires_mid_stream(case: AccessCase):
    """A stream opened with a token ends at the token's expiry, with ``access_expired``;
    resuming with the expired token is refused, with a fresh one it goes on."""
    task = PrivateTask.objects.create(steps=200, delay=0.05)  # 10 s: outlives the token
    token = task.stream_token(expires_in=2)
    expires_at = access.read_token(token).expires_at
    watched = watch(case.url(task, token=token, history="all"))
    case.assertEqual(watched.status, 200, watched.body)
    *steps, last = watched.events
    case.assertTrue(steps and {e.event for e in steps} == {"step"}, watched.types)
    case.assertEqual(last.event, "access_expired")
    case.assertIsNone(last.id)  # no id: Last-Event-ID stays on the task's last event
    case.assertEqual(last.data["message"], "Stream token expired")
    late = watched.arrived[-1] - expires_at
    case.assertTrue(-0.05 <= late < 0.5, f"the expiry event came {late:+.3f} s after the token's expiry")
    case.assertLess(watched.closed_at - watched.arrived[-1], 0.5, "the stream closes after the expiry event")
    task.refresh_from_db()
    case.assertNotEqual(task.status, "completed", "the task outlived the token")
    # Resume with Last-Event-ID and the expired token: a new request, refused.
    resume = {"last-event-id": str(steps[-1].id)}
    case.assertRefused(case.get(case.url(task, token=token), **resume), 401, "Stream token expired")
    # A fresh token resumes where the stream stopped.
    events = read_stream(case.url(task, token=task.stream_token(expires_in=60)), headers=resume, timeout=30)
    case.assertEqual(events[0].id, steps[-1].id + 1)
    case.assertEqual(events[-1].event, "complete")
    sys.stderr.write(f"\n[test_access] access_expired {late * 1000:+.0f} ms after the token's expiry\n")


class HostTests(AccessCase):
    """ALLOWED_HOSTS on the direct socket path (runserver_stream)."""

    server_settings = {"env": HOSTS_SETTINGS}

    def test_a_bogus_host_gets_400(self):
        task = ScriptedTask.objects.create(steps=1)
        self.wait_status(task, "completed")
        for host in ("evil.example.org", "", "127.0.0.1.evil.org", "stream.example.com.evil.org"):
            with self.subTest(host=host):
                self.assertRefused(self.get(self.url(task), host=host), 400, "Invalid Host header")
                self.assertRefused(self.status(self.url(task), host=host), 400, "Invalid Host header")
        for host in ("stream.example.com", "stream.example.com:443", f"127.0.0.1:{self.server.port}"):
            with self.subTest(host=host):
                self.assertEqual(self.status(self.url(task), host=host).status_code, 200)
        # /health answers any Host (load balancers probe by address); Django guards the rest.
        self.assertEqual(self.get(f"{self.server.url}/health", host="evil.example.org").text, "OK")
        self.assertEqual(
            self.get(f"{self.server.url}/admin/login/", host="evil.example.org").status_code, 400
        )


class AsgiPathTests(AccessCase):
    """The same rules on the ASGI path: config.asgi:application under plain uvicorn."""

    server_settings = {"command": UVICORN, "env": HOSTS_SETTINGS}

    def test_a_bogus_host_gets_400(self):
        task = ScriptedTask.objects.create(steps=1)
        self.wait_status(task, "completed")
        response = self.get(self.url(task), host="evil.example.org")
        self.assertRefused(response, 400, "Invalid Host header")
        self.assertEqual(self.get(self.url(task, history="all")).status_code, 200)

    def test_access_rules(self):
        task = PrivateTask.objects.create(steps=2)
        self.wait_status(task, "completed")
        self.assertRefused(self.get(self.url(task)), 403, "Not allowed")
        self.assertRefused(self.get(self.path_url(PrivateTask, task.pk + 1000)), 403, "Not allowed")
        self.assertRefused(self.get(self.url(task, token=tampered(task.stream_token()))), 401, "Invalid")
        with httpx.stream(
            "GET", self.url(task, token=task.stream_token(), history="all"), timeout=15
        ) as response:
            self.assertEqual(response.headers["transfer-encoding"], "chunked")  # not our socket path
            events = parse_sse(response.read().decode())
        self.assertEqual([e.event for e in events], ["step", "step", "complete"])

    def test_a_token_expiring_mid_stream_ends_the_stream_with_an_event_that_says_why(self):
        assert_expires_mid_stream(self)


# -- in-process ------------------------------------------------------------------------


class TokenTests(SimpleTestCase):
    def test_a_token_names_its_tasks_and_expiry(self):
        a, b = PrivateTask(pk=7), OwnedTask(pk=7)
        before = time.time()
        grant = access.read_token(access.stream_token([a, b], expires_in=120))
        self.assertEqual(grant.keys, {TaskKey("testapp.privatetask", "7"), TaskKey("testapp.ownedtask", "7")})
        self.assertTrue(before + 120 <= grant.expires_at <= time.time() + 121)
        self.assertLess(len(access.stream_token(a)), 120, "compact enough for a URL")

    def test_a_proxy_instance_mints_for_its_concrete_model(self):
        from streaming.tests.testapp.models import ScriptedProxy

        self.assertEqual(
            access.read_token(ScriptedProxy(pk=3).stream_token()).keys, {TaskKey("testapp.scriptedtask", "3")}
        )

    def test_minting_refuses_nonsense(self):
        with self.assertRaises(ValueError):
            access.stream_token([])
        with self.assertRaises(ValueError):
            PrivateTask(pk=1).stream_token(expires_in=0)
        with self.assertRaises(ValueError):
            PrivateTask().stream_token()  # not saved: no pk
        for forever in (10**12, 1e300, float("inf"), float("nan")):  # past what a date can show
            with self.assertRaises(ValueError):
                PrivateTask(pk=1).stream_token(expires_in=forever)

    def test_signed_payloads_of_the_wrong_shape_are_invalid_not_a_crash(self):
        # Found by test_fuzz: these raised AttributeError/OverflowError (a 500).
        signer = signing.Signer(salt=access.TOKEN_SALT)
        for payload in (
            {"k": [None], "x": 1},
            {"k": "testapp.privatetask:1", "x": 2**40},
            {"k": ["testapp.privatetask:1"], "x": 10**400},
            {"k": ["testapp.privatetask:1"], "x": float("nan")},
            {"k": ["testapp.privatetask:1"], "x": 6.78e16},
        ):
            with self.subTest(payload=payload), self.assertRaises(access.InvalidToken):
                access.read_token(signer.sign_object(payload, compress=True))

    def test_secret_key_fallbacks_still_open_old_tokens(self):
        token = PrivateTask(pk=1).stream_token()
        with override_settings(SECRET_KEY="a-new-key-" * 5, SECRET_KEY_FALLBACKS=[settings.SECRET_KEY]):
            self.assertEqual(access.read_token(token).keys, {TaskKey("testapp.privatetask", "1")})
        with override_settings(SECRET_KEY="a-new-key-" * 5), self.assertRaises(access.InvalidToken):
            access.read_token(token)

    def test_expiry(self):
        token = PrivateTask(pk=1).stream_token(expires_in=10)
        expires_at = access.read_token(token).expires_at
        access.read_token(token, now=expires_at - 0.001)
        with self.assertRaises(access.TokenExpired):
            access.read_token(token, now=expires_at)

    def test_stream_url(self):
        url = PrivateTask(pk=5).stream_url(expires_in=30)
        path, _, token = url.partition("?token=")
        self.assertEqual(path, "/stream/PrivateTask/5")
        self.assertEqual(access.read_token(token).keys, {TaskKey("testapp.privatetask", "5")})


class SessionUserTests(TestCase):
    def test_a_session_signed_with_a_fallback_key_still_works_and_is_not_written(self):
        user = User.objects.create_user("u", password="pw")
        self.client.force_login(user)
        key = self.client.cookies[settings.SESSION_COOKIE_NAME].value
        self.assertEqual(access.session_user(key), user)
        with override_settings(SECRET_KEY="a-new-key-" * 5, SECRET_KEY_FALLBACKS=[settings.SECRET_KEY]):
            self.assertEqual(access.session_user(key), user)
        with override_settings(SECRET_KEY="a-new-key-" * 5):
            self.assertIsNone(access.session_user(key))
        # A password change logs the session out: no user, and (read only) the
        # session is neither rotated nor flushed here (no response carries a new cookie).
        user.set_password("new")
        user.save()
        self.assertIsNone(access.session_user(key))
        self.assertTrue(Session.objects.filter(session_key=key).exists())

    def test_no_session_or_a_backend_no_longer_configured(self):
        self.assertIsNone(access.session_user("x" * 32))
        user = User.objects.create_user("u", password="pw")
        self.client.force_login(user)
        key = self.client.cookies[settings.SESSION_COOKIE_NAME].value
        with override_settings(AUTHENTICATION_BACKENDS=["django.contrib.auth.backends.RemoteUserBackend"]):
            self.assertIsNone(access.session_user(key))

    def test_the_default_hook_is_the_models_view_permission(self):
        user = User.objects.create_user("u", password="pw")
        task = PrivateTask(pk=1)
        self.assertFalse(task.has_stream_permission(user))
        user.user_permissions.add(Permission.objects.get(codename="view_privatetask"))
        user = User.objects.get(pk=user.pk)  # permissions are cached on the instance
        self.assertTrue(task.has_stream_permission(user))
        self.assertFalse(task.has_stream_permission(AnonymousUser()))


class HostRuleTests(SimpleTestCase):
    """Django's own rule (HttpRequest.get_host), as web/app.py applies it to stream requests."""

    def allowed(self, host: bytes, forwarded: bytes | None = None) -> bool:
        headers = {b"host": host} if forwarded is None else {b"host": host, b"x-forwarded-host": forwarded}
        with mock.patch.object(web_app.host_logger, "warning"):
            return web_app._host_allowed(web_app._request_host(headers))

    def test_debug_without_allowed_hosts_allows_localhost_only(self):
        with override_settings(DEBUG=True, ALLOWED_HOSTS=[]):
            self.assertTrue(self.allowed(b"localhost:8888"))
            self.assertTrue(self.allowed(b"127.0.0.1"))
            self.assertTrue(self.allowed(b"[::1]:8000"))
            self.assertFalse(self.allowed(b"example.com"))
        with override_settings(DEBUG=False, ALLOWED_HOSTS=[]):
            self.assertFalse(self.allowed(b"localhost"))

    def test_patterns_and_forwarded_host(self):
        with override_settings(ALLOWED_HOSTS=[".example.com"]):
            self.assertTrue(self.allowed(b"a.example.com"))
            self.assertFalse(self.allowed(b"example.com.evil"))
            self.assertTrue(self.allowed(b"a.example.com", forwarded=b"evil"))  # not trusted by default
            with override_settings(USE_X_FORWARDED_HOST=True):
                self.assertFalse(self.allowed(b"a.example.com", forwarded=b"evil"))
                self.assertTrue(self.allowed(b"evil", forwarded=b"b.example.com"))
        with override_settings(ALLOWED_HOSTS=["*"]):
            self.assertTrue(self.allowed(b"anything"))
            self.assertFalse(self.allowed(b""))  # an empty Host header
            self.assertTrue(web_app._host_allowed(None))  # none at all (HTTP/1.0): "*" only, as Django
        with (
            override_settings(ALLOWED_HOSTS=["127.0.0.1"]),
            mock.patch.object(web_app.host_logger, "warning"),
        ):
            self.assertFalse(web_app._host_allowed(None))
