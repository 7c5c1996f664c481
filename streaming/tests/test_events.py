"""Unit tests of streaming/events.py: the one SSE encoding of an event and its JSON payload."""

import dataclasses
import json
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from unittest import mock

from django.test import SimpleTestCase

from streaming import events
from streaming.events import (
    CANCELLED,
    COMPLETE,
    ERROR,
    KEEPALIVE,
    RETRY,
    TERMINAL_TYPES,
    Event,
    build_payload,
    encode_sse,
    retry_hint,
    to_json_value,
    validate_event_type,
)

FIXED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


class EncodeSSETests(SimpleTestCase):
    def test_exact_bytes(self):
        self.assertEqual(
            encode_sse(7, "progress", '{"a": 1}'),
            b'event: progress\ndata: {"a": 1}\nid: 7\n\n',
        )

    def test_returns_bytes_utf8(self):
        out = encode_sse(1, "log", '{"t": "\u00e9"}')
        self.assertIsInstance(out, bytes)
        self.assertEqual(out, 'event: log\ndata: {"t": "\u00e9"}\nid: 1\n\n'.encode())

    def test_field_order_event_data_id(self):
        lines = encode_sse(42, "x", "{}").split(b"\n")
        self.assertEqual(lines, [b"event: x", b"data: {}", b"id: 42", b"", b""])

    def test_keepalive_and_retry_hint(self):
        self.assertEqual(KEEPALIVE, b": keep-alive\n\n")
        self.assertEqual(retry_hint(1500), b"retry: 1500\n\n")


class EventTests(SimpleTestCase):
    def test_sse_equals_encode_sse(self):
        event = Event(3, "progress", '{"step": 3}')
        self.assertEqual(event.sse, encode_sse(3, "progress", '{"step": 3}'))
        self.assertEqual(event.sse, b'event: progress\ndata: {"step": 3}\nid: 3\n\n')

    def test_sse_computed_once_at_construction(self):
        with mock.patch.object(events, "encode_sse", wraps=events.encode_sse) as spy:
            event = Event(1, "progress", "{}")
            self.assertEqual(spy.call_count, 1)
            first = event.sse
            for _ in range(3):
                self.assertIs(event.sse, first)
            self.assertEqual(spy.call_count, 1)

    def test_frozen(self):
        event = Event(1, "progress", "{}")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            event.sse = b"other"
        with self.assertRaises(dataclasses.FrozenInstanceError):
            event.seq = 2

    def test_sse_not_in_init_compare_or_repr(self):
        with self.assertRaises(TypeError):
            Event(1, "progress", "{}", b"x")
        self.assertEqual(Event(1, "a", "{}"), Event(1, "a", "{}"))
        self.assertNotEqual(Event(1, "a", "{}"), Event(2, "a", "{}"))
        self.assertNotIn("sse", repr(Event(1, "a", "{}")))

    def test_terminal_only_for_complete_error_cancelled(self):
        self.assertEqual(TERMINAL_TYPES, {"complete", "error", "cancelled"})
        for event_type in (COMPLETE, ERROR, CANCELLED):
            with self.subTest(event_type=event_type):
                self.assertTrue(Event(1, event_type, "{}").terminal)
        for event_type in (RETRY, "progress", "log", "Complete", "completed", "step.complete", "error:x"):
            with self.subTest(event_type=event_type):
                self.assertFalse(Event(1, event_type, "{}").terminal)

    def test_data_parses_payload(self):
        self.assertEqual(Event(1, "a", '{"x": [1, 2]}').data(), {"x": [1, 2]})


class BuildPayloadTests(SimpleTestCase):
    def test_exact_text_task_fields_first_then_meta(self):
        payload = build_payload({"b": 2, "a": [1, 2]}, task_id=7, model_name="ExampleTask", timestamp=FIXED)
        self.assertEqual(
            payload,
            '{"b": 2, "a": [1, 2], "_task_id": 7, "_model": "ExampleTask", '
            '"_timestamp": "2024-01-02T03:04:05+00:00"}',
        )

    def test_key_order(self):
        data = {"z": 1, "m": 2, "a": 3}
        keys = list(json.loads(build_payload(data, task_id=1, model_name="M")))
        self.assertEqual(keys, ["z", "m", "a", "_task_id", "_model", "_timestamp"])

    def test_default_separators(self):
        payload = build_payload({"a": {"b": [1, 2]}}, task_id=1, model_name="M", timestamp=FIXED)
        self.assertIn('"a": {"b": [1, 2]}, "_task_id": 1', payload)
        self.assertNotIn('":1', payload)
        self.assertNotIn(",\n", payload)

    def test_none_means_empty(self):
        payload = build_payload(None, task_id=1, model_name="M", timestamp=FIXED)
        self.assertEqual(payload, '{"_task_id": 1, "_model": "M", "_timestamp": "2024-01-02T03:04:05+00:00"}')

    def test_does_not_mutate_data(self):
        data = {"a": 1}
        build_payload(data, task_id=1, model_name="M")
        self.assertEqual(data, {"a": 1})

    def test_default_timestamp_is_now_utc_iso8601(self):
        before = datetime.now(UTC)
        body = json.loads(build_payload({}, task_id=1, model_name="M"))
        after = datetime.now(UTC)
        text = body["_timestamp"]
        self.assertTrue(text.endswith("+00:00"), text)
        parsed = datetime.fromisoformat(text)
        self.assertEqual(parsed.utcoffset(), timedelta(0))
        self.assertLessEqual(before, parsed)
        self.assertLessEqual(parsed, after)

    def test_given_timestamp_is_used(self):
        stamp = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
        body = json.loads(build_payload({}, task_id=1, model_name="M", timestamp=stamp))
        self.assertEqual(body["_timestamp"], "2030-05-06T07:08:09.123456+00:00")

    def test_rejects_non_dict(self):
        for data in ([1, 2], "text", 5, (("a", 1),), {"a"}):
            with self.subTest(data=data), self.assertRaises(TypeError) as cm:
                build_payload(data, task_id=1, model_name="M")
            self.assertIn("must be a dict", str(cm.exception))
            self.assertIn(type(data).__name__, str(cm.exception))

    def test_rejects_non_serializable_with_clear_message(self):
        class Thing:
            pass

        with self.assertRaises(TypeError) as cm:
            build_payload({"x": Thing()}, task_id=1, model_name="M")
        message = str(cm.exception)
        self.assertIn("Event data is not JSON serializable", message)
        self.assertIn("Thing", message)
        # "from None": the encoder's internal error is not chained.
        self.assertIsNone(cm.exception.__cause__)
        self.assertTrue(cm.exception.__suppress_context__)

    def test_rejects_non_string_keys_that_json_cannot_take(self):
        with self.assertRaises(TypeError) as cm:
            build_payload({(1, 2): "x"}, task_id=1, model_name="M")
        self.assertIn("not JSON serializable", str(cm.exception))

    def test_django_json_encoder_types(self):
        task_uuid = uuid.UUID("12345678-1234-5678-1234-567812345678")
        data = {
            "when": datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
            "day": date(2024, 1, 2),
            "amount": Decimal("1.10"),
            "id": task_uuid,
            "took": timedelta(seconds=90),
        }
        body = json.loads(build_payload(data, task_id=task_uuid, model_name="M", timestamp=FIXED))
        self.assertEqual(body["when"], "2024-01-02T03:04:05.123Z")
        self.assertEqual(body["day"], "2024-01-02")
        self.assertEqual(body["amount"], "1.10")
        self.assertEqual(body["id"], "12345678-1234-5678-1234-567812345678")
        self.assertEqual(body["took"], "P0DT00H01M30S")
        self.assertEqual(body["_task_id"], "12345678-1234-5678-1234-567812345678")

    def test_payload_is_one_line_so_sse_framing_holds(self):
        payload = build_payload({"text": "a\nb\r\nc\n\n"}, task_id=1, model_name="M", timestamp=FIXED)
        self.assertNotIn("\n", payload)
        self.assertNotIn("\r", payload)
        self.assertEqual(json.loads(payload)["text"], "a\nb\r\nc\n\n")
        sse = Event(1, "log", payload).sse
        self.assertEqual(sse.count(b"\n\n"), 1)
        self.assertTrue(sse.endswith(b"\n\n"))

    # Regression (fixed in b1dd83c): with json.dumps' default allow_nan=True, NaN and
    # Infinity went out as the bare tokens NaN/Infinity, which are not JSON (RFC 8259)
    # and make JSON.parse in a browser throw.
    def test_rejects_nan_and_infinity(self):
        for value in (float("nan"), float("inf"), float("-inf")):
            with self.subTest(value=value), self.assertRaises(TypeError):
                build_payload({"x": value}, task_id=1, model_name="M")

    # Regression (fixed in b1dd83c): json.dumps' ValueError("Circular reference
    # detected") escaped instead of the documented TypeError.
    def test_rejects_circular_data_with_type_error(self):
        loop = []
        loop.append(loop)
        with self.assertRaises(TypeError) as cm:
            build_payload({"x": loop}, task_id=1, model_name="M")
        self.assertIn("Event data is not JSON serializable", str(cm.exception))

    # Regression (fixed in b1dd83c): body = dict(data) kept a runner key the task
    # supplied at the task's position, breaking "task's fields, then _task_id,
    # _model, _timestamp".
    def test_reserved_keys_from_task_still_come_last(self):
        data = {"_model": "spoof", "a": 1, "_timestamp": "x"}
        body = json.loads(build_payload(data, task_id=1, model_name="M", timestamp=FIXED))
        self.assertEqual(body["_model"], "M")
        self.assertEqual(body["_timestamp"], "2024-01-02T03:04:05+00:00")
        self.assertEqual(list(body), ["a", "_task_id", "_model", "_timestamp"])


class ValidateEventTypeTests(SimpleTestCase):
    def test_accepts(self):
        for value in ("progress", "a.b:c-d_1", "X", "a" * 64, "0", "step.done", "A-Z_a-z.0:9"):
            with self.subTest(value=value):
                self.assertEqual(validate_event_type(value), value)

    def test_rejects(self):
        for value in ("", "has space", "new\nline", "a" * 65, "tab\there", "caf\u00e9", "a/b", "x,y", "\n"):
            with self.subTest(value=value), self.assertRaises(ValueError) as cm:
                validate_event_type(value)
            self.assertIn(repr(value), str(cm.exception))

    def test_rejects_non_str(self):
        for value in (None, 1, b"progress", ["progress"], 1.5):
            with self.subTest(value=value), self.assertRaises(ValueError):
                validate_event_type(value)

    # Regression (fixed in b1dd83c, .match -> .fullmatch): "$" also matches before a
    # trailing "\n", so "progress\n" was accepted and encode_sse wrote
    # "event: progress\n\ndata: ..." - the blank line ended the SSE message early.
    def test_rejects_trailing_newline(self):
        for value in ("progress\n", "progress\r\n", "a" * 64 + "\n"):
            with self.subTest(value=value), self.assertRaises(ValueError):
                validate_event_type(value)


class ToJsonValueTests(SimpleTestCase):
    def test_round_trip(self):
        self.assertIsNone(to_json_value(None))
        self.assertEqual(to_json_value(5), 5)
        self.assertEqual(to_json_value("s"), "s")
        self.assertEqual(to_json_value([1, "a", None]), [1, "a", None])
        self.assertEqual(to_json_value((1, 2)), [1, 2])
        self.assertEqual(to_json_value({1: "a", "b": {"c": True}}), {"1": "a", "b": {"c": True}})

    def test_django_types(self):
        value = {
            "d": Decimal("2.50"),
            "u": uuid.UUID(int=1),
            "t": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))),
        }
        self.assertEqual(
            to_json_value(value),
            {"d": "2.50", "u": "00000000-0000-0000-0000-000000000001", "t": "2024-01-02T03:04:05+02:00"},
        )

    def test_rejects_non_serializable(self):
        with self.assertRaises(TypeError) as cm:
            to_json_value({"x": object()})
        self.assertIn("process() returned a value that is not JSON serializable", str(cm.exception))
        self.assertIsNone(cm.exception.__cause__)

    def test_rejects_nan_infinity_and_circular(self):
        loop = {}
        loop["self"] = loop
        for value in (float("nan"), [float("inf")], {"x": float("-inf")}, loop):
            with self.subTest(value=repr(value)[:20]), self.assertRaises(TypeError) as cm:
                to_json_value(value)
            self.assertIn("not JSON serializable", str(cm.exception))
