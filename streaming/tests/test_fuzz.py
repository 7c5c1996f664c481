"""Fuzz tests (hypothesis): the SSE encoding read back by a spec parser; requests never answered 5xx.

1. Every event the encoder writes, read by a WHATWG event-stream parser
   written here from the spec, is exactly one event with its type, its id
   and its data, whatever the data holds (line breaks of every kind, NUL,
   lone surrogates, very long strings), in a stream cut into any chunks.
2. Requests for streams, however odd (paths, ids, Last-Event-ID, query,
   methods, Host, Accept, tokens, cookies), are never answered 5xx and
   always with a well-formed response: over raw sockets against a real
   server (runserver_stream's direct socket path), and through the ASGI
   app in process. The server still serves normally afterwards.
3. Credentials for a protected task (tokens valid, expired, for another
   task, altered, signed with odd payloads; real and bogus session
   cookies; several at once) are never answered 5xx either.

Access control may refuse any request for a non-public task model (401,
403), so the request properties assert "< 500" and well-formedness, and a
4xx (any) only where every answer must be one whatever the access rules:
a method other than GET, and a malformed Last-Event-ID.

Examples are not derandomized (CI sees fresh ones); a failure prints the
falsifying example.
"""

import asyncio
import codecs
import contextlib
import copy
import json
import logging
import os
import re
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus
from urllib.parse import quote, unquote

from django.apps import apps
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core import signing
from django.test import SimpleTestCase, TransactionTestCase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.events import KEEPALIVE, RUNNER_KEYS, Event, build_payload, retry_hint, validate_event_type
from streaming.keys import TaskKey
from streaming.node import Node
from streaming.tests.support import eventually, node_settings, serving
from streaming.tests.testapp.models import ScriptedTask
from streaming.web.app import StreamingApp

try:  # access control is new; without it the token examples are plain garbage
    from streaming.access import TOKEN_SALT
except ImportError:  # pragma: no cover
    TOKEN_SALT = None

# STREAMING_FUZZ_SCALE=20 runs twenty times the examples (a longer hunt, locally).
SCALE = float(os.environ.get("STREAMING_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


FAST = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# -- a WHATWG event-stream parser ------------------------------------------------------
# https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

_LINE_END = re.compile(r"\r\n|\r|\n")


class EventStreamParser:
    """The spec's interpretation of an event stream, fed bytes in any chunks.

    ``events`` collects dispatched events as ``(type, data, last_event_id)``;
    ``reconnection_time`` is the last valid ``retry:`` value.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # text after the last line end
        self._started = False  # a leading BOM is skipped once
        self._after_cr = False  # the last chunk ended with CR: an LF next is part of that line end
        self._data = ""
        self._type = ""
        self._id = ""
        self.last_event_id = ""
        self.reconnection_time: int | None = None
        self.events: list[tuple[str, str, str]] = []

    def feed(self, chunk: bytes) -> None:
        self._text(self._decoder.decode(chunk))

    def close(self) -> list[tuple[str, str, str]]:
        """End of stream: an event without its blank line is discarded."""
        self._text(self._decoder.decode(b"", final=True))
        return self.events

    def _text(self, text: str) -> None:
        if not text:
            return
        if not self._started:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        pending = self._pending + text
        start = 0
        for end in _LINE_END.finditer(pending):
            self._line(pending[start : end.start()])
            start = end.end()
        self._after_cr = start == len(pending) and pending.endswith("\r")
        self._pending = pending[start:]

    def _line(self, line: str) -> None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment
        if ":" in line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
        else:
            name, value = line, ""
        if name == "event":
            self._type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            self.reconnection_time = int(value)
        return None  # any other field is ignored

    def _dispatch(self) -> None:
        self.last_event_id = self._id
        if not self._data:
            self._type = ""
            return
        self.events.append((self._type or "message", self._data.removesuffix("\n"), self.last_event_id))
        self._data = self._type = ""


def parse_stream(data: bytes, cuts: list[int] = ()) -> EventStreamParser:
    parser = EventStreamParser()
    start = 0
    for cut in sorted(set(cuts)):
        parser.feed(data[start:cut])
        start = cut
    parser.feed(data[start:])
    parser.close()
    return parser


class ParserSelfTests(SimpleTestCase):
    """The parser against the spec's own examples, so a pass below means something."""

    def test_spec_examples(self):
        parser = parse_stream(b"data: YHOO\ndata: +2\ndata: 10\n\n")
        self.assertEqual(parser.events, [("message", "YHOO\n+2\n10", "")])
        parser = parse_stream(b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n")
        self.assertEqual(parser.events, [("message", "first event", "1"), ("message", "second event", "")])
        parser = parse_stream(b"data\n\ndata\ndata\n\ndata:")  # the last, unterminated, is dropped
        self.assertEqual(parser.events, [("message", "", ""), ("message", "\n", "")])
        parser = parse_stream(b"data:test\n\ndata: test\n\n")
        self.assertEqual(parser.events, [("message", "test", ""), ("message", "test", "")])

    def test_line_ends_bom_and_chunks(self):
        raw = "\ufeffevent: a\rdata: x\u2028y\r\nid: 7\r\r\nevent: b\ndata\n\n".encode()
        expected = [("a", "x\u2028y", "7"), ("b", "", "7")]
        for cut in range(len(raw) + 1):
            self.assertEqual(parse_stream(raw, [cut]).events, expected, cut)
        self.assertEqual(parse_stream(b"retry: 12\n\nretry: x\n\n").reconnection_time, 12)


# -- 1. the encoder ----------------------------------------------------------------------

# Characters that split lines somewhere: the SSE line ends, and the ones
# str.splitlines() (and readers built on it) also splits on.
LINE_BREAKERS = ["\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
NASTY = [
    *LINE_BREAKERS,
    *["\x00", "\ufeff", "\ud800", "\udfff", "\U0001f389", "\U0010ffff", "\u00e9", "\x7f", '"', "\\"],
    *[":", " ", "\n\n", "data: x", "event: x\n", "id: 1\r", "retry: 1\n\n", "</script>"],
]
# any character, lone surrogates included
chars = st.one_of(st.characters(exclude_categories=()), st.sampled_from([c for c in NASTY if len(c) == 1]))
texts = st.one_of(
    st.text(alphabet=chars, max_size=24), st.lists(st.sampled_from(NASTY), max_size=8).map("".join)
)
long_texts = st.builds(
    lambda s, n: s * n, st.sampled_from([*NASTY, "x", "\u00e9\U0001f389"]), st.integers(1000, 30_000)
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
    long_texts,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=16,
)
data_dicts = st.dictionaries(st.one_of(texts, st.sampled_from(RUNNER_KEYS)), json_values, max_size=6)
event_types = st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)
seqs = st.integers(1, 2**63 - 1)
task_ids = st.one_of(st.integers(), texts, st.uuids())
timestamps = st.datetimes(
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))])
)


def utf16(text: str) -> str:
    """``text`` as JSON (and JavaScript) sees it: UTF-16 code units. Two lone
    surrogates side by side in a Python str are escaped one by one, and read
    back as the one character they make together."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def tagged(value):
    """A JSON value with its types spelled out: True is not 1, 1 is not 1.0."""
    if value is None:
        return None
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, str):
        return ("str", utf16(value))
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, list):
        return ["list", *map(tagged, value)]
    if isinstance(value, dict):
        return {utf16(k): tagged(v) for k, v in value.items()}
    raise AssertionError(f"not a JSON value: {value!r}")


def expected_data(data, task_id, model_name, timestamp):
    body = {k: v for k, v in (data or {}).items() if k not in RUNNER_KEYS}
    body["_task_id"] = str(task_id) if isinstance(task_id, uuid.UUID) else task_id
    body["_model"] = model_name
    body["_timestamp"] = timestamp.isoformat()
    return body


def first_difference(got, expected, width=300) -> str:
    """Where two big values differ, shortly (unittest's diff of a megabyte takes minutes)."""
    a, b = repr(got), repr(expected)
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, at - width // 2)
    got_part, want_part = a[start : at + width], b[start : at + width]
    return f"differ at {at} of {len(a)}/{len(b)}:\n got …{got_part}\n want …{want_part}"


class BigValues:
    def assert_same(self, got, expected):
        if got != expected:
            self.fail(first_difference(got, expected))


class EncoderFuzzTests(BigValues, SimpleTestCase):
    def assert_one_event(self, sse: bytes, event_type: str, seq: int, expected: dict) -> None:
        parser = parse_stream(sse)
        if len(parser.events) != 1:
            self.fail(f"{len(parser.events)} events: {first_difference(parser.events, [])}")
        got_type, got_data, got_id = parser.events[0]
        self.assertEqual(got_type, event_type)
        self.assertEqual(got_id, str(seq))
        self.assertEqual(parser.last_event_id, str(seq))
        self.assertIsNone(parser.reconnection_time)
        self.assert_same(tagged(json.loads(got_data)), tagged(expected))
        # Beyond the spec: readers that split lines as str.splitlines() does
        # (httpx's iter_lines; hand-written clients) see the same three
        # fields, and the bytes are strict UTF-8 (the spec decodes with
        # replacement, silently).
        self.assertEqual(len(sse.decode("utf-8").splitlines()), 4, sse[:300])

    @settings(FAST, max_examples=examples(250))
    @given(event_types, seqs, st.one_of(st.none(), data_dicts), task_ids, texts, timestamps)
    def test_an_event_reads_back_as_itself(self, event_type, seq, data, task_id, model_name, timestamp):
        before = copy.deepcopy(data)
        payload = build_payload(data, task_id=task_id, model_name=model_name, timestamp=timestamp)
        self.assert_same(tagged(data), tagged(before))  # the caller's dict is left alone
        expected = expected_data(data, task_id, model_name, timestamp)
        self.assert_same(tagged(json.loads(payload)), tagged(expected))
        event = Event(seq, event_type, payload)
        self.assert_same(tagged(event.data()), tagged(expected))
        self.assert_one_event(event.sse, event_type, seq, expected)

    @settings(FAST, max_examples=examples(100))
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("event"), event_types, seqs, data_dicts),
                st.tuples(st.just("keepalive")),
                st.tuples(st.just("retry"), st.integers(0, 10**12)),
            ),
            max_size=8,
        ),
        st.lists(st.integers(0, 10**6), max_size=8),
    )
    def test_a_stream_in_any_chunks_reads_back_as_its_events(self, items, cuts):
        stamp = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
        wire, expected, last_id, retry = b"", [], "", None
        for item in items:
            if item[0] == "keepalive":
                wire += KEEPALIVE
            elif item[0] == "retry":
                wire += retry_hint(item[1])
                retry = item[1]
            else:
                _, event_type, seq, data = item
                wire += Event(
                    seq, event_type, build_payload(data, task_id=1, model_name="M", timestamp=stamp)
                ).sse
                last_id = str(seq)
                expected.append((event_type, tagged(expected_data(data, 1, "M", stamp)), last_id))
        parser = parse_stream(wire, [cut % (len(wire) + 1) for cut in cuts])
        self.assert_same([(t, tagged(json.loads(d)), i) for t, d, i in parser.events], expected)
        self.assertEqual(parser.last_event_id, last_id)  # comments and retry hints keep it
        self.assertEqual(parser.reconnection_time, retry)

    def test_a_keepalive_is_no_event(self):
        parser = parse_stream(KEEPALIVE * 3)
        self.assertEqual((parser.events, parser.last_event_id, parser.reconnection_time), ([], "", None))

    @settings(FAST, max_examples=examples(100))
    @given(st.integers(0, 10**18))
    def test_a_retry_hint_is_no_event_and_sets_the_reconnection_time(self, milliseconds):
        parser = parse_stream(retry_hint(milliseconds))
        self.assertEqual(parser.events, [])
        self.assertEqual(parser.reconnection_time, milliseconds)
        self.assertEqual(parser.last_event_id, "")

    @settings(FAST, max_examples=examples(300))
    @given(
        st.one_of(
            event_types,
            st.text(max_size=70),
            st.text(alphabet=chars, max_size=8),
            # a valid type with one bad character in it, or one too long
            st.builds(
                lambda a, bad, b: a + bad + b,
                event_types,
                st.sampled_from([*NASTY, "", "/", "\t", "\u0660", "\uff21"]),
                event_types,
            ),
            # ...or after it: "$" in a regex matches before a final "\n"
            st.builds(lambda a, end: a + end, event_types, st.sampled_from(LINE_BREAKERS)),
        ),
        seqs,
    )
    def test_an_accepted_event_type_reads_back_and_any_other_is_refused(self, event_type, seq):
        try:
            accepted = validate_event_type(event_type)
        except ValueError:
            # Refused: it could break the event, or is just not a type we allow.
            self.assertFalse(re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", event_type, re.ASCII))
            return
        self.assertEqual(accepted, event_type)
        stamp = datetime(2024, 1, 2, tzinfo=UTC)
        payload = build_payload({"x": 1}, task_id=1, model_name="M", timestamp=stamp)
        self.assert_one_event(
            Event(seq, event_type, payload).sse, event_type, seq, expected_data({"x": 1}, 1, "M", stamp)
        )

    @settings(FAST, max_examples=examples(30))
    @given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text()), st.tuples(st.text())))
    def test_a_non_string_event_type_is_refused(self, event_type):
        with self.assertRaises(ValueError):
            validate_event_type(event_type)


def _circular_dict():
    d = {"a": 1}
    d["self"] = d
    return d


def _circular_list():
    items = [1]
    items.append(items)
    return items


POISONS = [
    lambda: float("nan"),
    lambda: float("inf"),
    lambda: float("-inf"),
    set,
    lambda: {1, 2},
    frozenset,
    object,
    lambda: b"bytes",
    lambda: bytearray(b"x"),
    lambda: 1j,
    lambda: {(1, 2): "tuple key"},
    lambda: {float("nan"): "NaN key"},
    lambda: range(3),
    lambda: 10**5000,  # past Python's int-to-text digit limit
    _circular_dict,
    _circular_list,
]
plain_keys = texts.filter(lambda k: k not in RUNNER_KEYS)


@st.composite
def poisoned_data(draw):
    """A dict of JSON values with one value somewhere inside that is not JSON."""
    value = draw(st.sampled_from(POISONS))()
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            siblings = draw(st.lists(json_values, max_size=2))
            siblings.insert(draw(st.integers(0, len(siblings))), value)
            value = siblings
        else:
            holder = draw(st.dictionaries(texts, json_values, max_size=2))
            holder[draw(texts)] = value
            value = holder
    data = draw(st.dictionaries(plain_keys, json_values, max_size=3))
    data[draw(plain_keys)] = value
    return data


class EncoderErrorFuzzTests(SimpleTestCase):
    @settings(FAST, max_examples=examples(150))
    @given(poisoned_data())
    def test_data_that_is_not_json_raises_type_error(self, data):
        with self.assertRaises(TypeError):
            build_payload(data, task_id=1, model_name="M")

    @settings(FAST, max_examples=examples(30))
    @given(
        st.one_of(json_scalars.filter(lambda v: v is not None), st.lists(json_values), st.tuples(st.text()))
    )
    def test_data_that_is_not_a_dict_raises_type_error(self, data):
        with self.assertRaises(TypeError):
            build_payload(data, task_id=1, model_name="M")


# -- 2. requests -------------------------------------------------------------------------


def one_in(n: int):
    """True about once in ``n`` draws. (Not ``integers(0, n - 1) == 0``: hypothesis
    favours the ends of a range, and the rare case would come every other time.)"""
    return st.integers(0, n - 1).map(lambda i: i == n // 2)


PATH_SAMPLES = [
    *["ScriptedTask", "testapp", "FragileTask", "ScriptedProxy", "StreamTask", "demo", "ExampleTask"],
    *["auth", "User", "streaming", "TaskEvent", "scriptedtask", "SCRIPTEDTASK"],
    *[".", "..", "%2e%2e", "%2E", "%2F", "%2f..%2f", "%00", "%ff", "%", "%zz", "%%", "~", ";", "a;b=c"],
    *["0", "-1", "1e3", "1.0", "+1", "0x1", "1_0", " 1", "%201", "1%20", "%09", "99999999999999999999999"],
    *["9223372036854775807", "9223372036854775808", "-9223372036854775809", "\u0661", "%D9%A1", "%EF%BC%91"],
    *["\u00e9", "\U0001f389", "%C3%A9", "%F0%9F%8E%89", "%C0%AE", "%ED%A0%80", "NaN", "None", "null", "true"],
]
SEGMENT_UNSAFE = b" \r\n"  # kept out of raw segments so the request line stays one line


def _raw(data: bytes) -> bytes:
    return bytes(b for b in data if b not in SEGMENT_UNSAFE)


TASK_MODELS = [
    *["ScriptedTask", "testapp/ScriptedTask", "testapp/FragileTask", "GeneratorTask", "ScriptedProxy"],
    *["PrivateTask", "testapp/OwnedTask", "demo/ExampleTask"],
]


@st.composite
def stream_paths(draw, pks):
    """Mostly a task's path (a model, an id), often slightly off; else any segments."""
    if draw(one_in(4)):
        return b"/stream/" + b"/".join(draw(st.lists(segments(pks), max_size=5)))
    model = draw(segments(pks) if draw(one_in(3)) else st.sampled_from(TASK_MODELS).map(str.encode))
    pk = draw(segments(pks) if draw(one_in(3)) else st.sampled_from(pks).map(str.encode))
    return b"/stream/" + model + b"/" + pk


def segments(pks):
    return st.one_of(
        st.sampled_from([*PATH_SAMPLES, *pks]).map(str.encode),
        st.text(max_size=12).map(lambda s: quote(s, safe="").encode()),  # percent-encoded UTF-8
        st.binary(max_size=8).map(lambda b: quote(b, safe="").encode()),  # percent-encoded, any bytes
        st.text(max_size=6).map(lambda s: _raw(s.encode())),  # raw UTF-8 in the request line
        st.binary(max_size=6).map(_raw),  # raw bytes
        st.builds(lambda c, n: c * n, st.sampled_from([b"9", b"a", b"%41", b"/"]), st.integers(100, 3000)),
    )


def query_values(pks, valid_tokens=()):
    return st.one_of(
        tokens(valid_tokens).map(lambda t: quote(t, safe="")),
        st.sampled_from(["all", "1", "true", "0", "-1", "", "99999999999999999999", "%00", "%ff", "all%00"]),
        st.sampled_from(["%D9%A1", "1%0A", "%0D%0Aset-cookie:%20x=1", "yes", "ALL", *pks]),
        st.text(max_size=10).map(lambda s: quote(s, safe="")),
        st.binary(max_size=10).map(lambda b: quote(b, safe="")),
    ).map(str.encode)


def queries(pks, valid_tokens=()):
    pair = st.tuples(
        st.sampled_from(
            [b"history", b"last_event_id", b"token", b"x", b"", b"history%00", b"last_event_id[]"]
        ),
        st.sampled_from([b"=", b"=", b""]),
        query_values(pks, valid_tokens),
    ).map(b"".join)
    return st.one_of(
        st.just(b""),
        st.lists(pair, min_size=1, max_size=4).map(lambda ps: b"?" + b"&".join(ps)),
        st.binary(max_size=20).map(lambda b: b"?" + _raw(b)),
    )


def header_values(samples):
    return st.one_of(
        st.sampled_from(samples),
        st.text(max_size=20).map(str.encode),
        st.binary(max_size=20),
    ).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


last_event_ids = header_values(
    [
        *[b"", b" ", b"0", b"1", b"3", b"-1", b"+1", b"1.0", b"1e3", b"0x1", b"1_0", b" 2 ", b"\t7\t"],
        *[b"999999999999999999", b"1000000000000000000", b"9" * 400, b"\xd9\xa1", "\uff11".encode()],
        *["\u00b2".encode(), b"\xb2", b"\xa05", b"5\xa0", b"\xff\xfe", b"\xc0\x80", b"1\x00", b"\x1f1"],
    ]
) | st.integers().map(lambda n: str(n).encode())
accepts = header_values(
    [b"application/json", b"text/event-stream", b"*/*", b"application/json;q=0", b"APPLICATION/JSON"]
)
# Hosts ALLOWED_HOSTS lets through under the tests (the loopback names and Django's testserver), mostly.
GOOD_HOSTS = [b"127.0.0.1", b"127.0.0.1:8000", b"localhost", b"[::1]:80", b"testserver"]
ODD_HOSTS = [b"", b"evil.example", b"127.0.0.1:99999", b"[::1", b"127.0.0.1 ", b"127.0.0.1\x00"]
hosts = one_in(10).flatmap(lambda odd: header_values(ODD_HOSTS) if odd else st.sampled_from(GOOD_HOSTS))
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"get"]


@st.composite
def tokens(draw, valid=()):
    """A valid token, garbage, or a token signed with our key whose payload is garbage
    (only the server can mint these)."""
    if valid and draw(st.booleans()):
        return draw(st.sampled_from(valid)).encode()
    if TOKEN_SALT is None or draw(st.booleans()):
        return draw(header_values([b"", b".", b"a:b", b"a:b:c", b"." * 50, b"eyJrIjpbXX0:x"]))
    payload = draw(
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"k": st.one_of(json_values, st.lists(st.one_of(texts, json_scalars), max_size=3))},
                optional={"x": st.one_of(json_values, st.integers(-(10**400), 10**400), st.just(1e308))},
            ),
        )
    )
    signed = signing.Signer(salt=TOKEN_SALT).sign_object(payload, compress=draw(st.booleans()))
    return signed.encode()


URL_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # what HTTP parsers take raw in a request target


@st.composite
def http_requests(draw, pks, valid_tokens=()):
    """One raw request. Most are well-formed HTTP (odd in what they ask for) so that
    they reach the streaming app; one in four may be anything (the HTTP parser's to refuse)."""
    wild = draw(one_in(4))

    def value(raw: bytes) -> bytes:
        return raw if wild else bytes(c for c in raw if c == 9 or 0x20 <= c != 0x7F)

    method = b"GET"
    if draw(one_in(3)):
        method = draw(st.sampled_from(METHODS))
        if wild and draw(one_in(2)):
            method = draw(st.binary(min_size=1, max_size=7).map(_raw))
    path = draw(stream_paths(pks))
    path += draw(st.sampled_from([b"", b"", b"/", b"//", b"#frag"]))
    target = path + draw(queries(pks, valid_tokens))
    if not wild:
        target = quote(target, safe=URL_SAFE).encode()
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    headers = [] if draw(one_in(32)) else [b"host: " + value(draw(hosts))]
    if draw(one_in(16)):
        headers.append(b"x-forwarded-host: " + value(draw(hosts)))
    last_event_id = None
    if draw(st.booleans()):
        last_event_id = value(draw(last_event_ids))
        name = draw(st.sampled_from([b"last-event-id", b"Last-Event-ID", b"LAST-EVENT-ID"]))
        headers.append(name + b": " + last_event_id)
    if draw(st.booleans()):
        headers.append(b"accept: " + value(draw(accepts)))
    if draw(one_in(3)):
        scheme = draw(st.sampled_from([b"Bearer ", b"Bearer ", b"bearer  ", b"Basic ", b"Bearer", b""]))
        headers.append(b"authorization: " + value(scheme + draw(tokens(valid_tokens))))
    if draw(one_in(4)):
        cookie = draw(header_values([b"sessionid=x", b"sessionid=", b"a=b; sessionid=\x00"]))
        headers.append(b"cookie: " + value(cookie))
    raw = method + b" " + target + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n"
    return {"raw": raw, "method": method, "last_event_id": last_event_id}


def malformed_last_event_id(value: bytes | None) -> bool:
    """A Last-Event-ID any reading must refuse: printable non-digits in it, or too long a number."""
    if value is None:
        return False
    return bool(re.search(rb"[!-/:-~]", value) or re.fullmatch(rb"[ \t]*[0-9]{19,}[ \t]*", value))


HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): ?([^\x00-\x08\x0a-\x1f\x7f]*)")


class ResponseChecks:
    """Well-formedness of an answer, and the properties any answer must have."""

    def check_answer(self, status, headers, body, *, method, last_event_id, head_only=False):
        self.assertGreaterEqual(status, 200)
        self.assertLess(status, 500, body[:500])
        if method == b"OPTIONS":  # what is allowed (a preflight's answer), or refused
            self.assertTrue(status == 204 or 400 <= status < 500, status)
        elif method != b"GET":
            self.assertGreaterEqual(status, 400)
            self.assertLess(status, 500)
        if malformed_last_event_id(last_event_id) and method != b"OPTIONS":
            self.assertGreaterEqual(status, 400)
            self.assertLess(status, 500)
        for name, value in headers:
            self.assertRegex(name + b": " + value, HEADER_LINE)
        names = [name.lower() for name, _ in headers]
        self.assertLessEqual(names.count(b"content-length"), 1)
        content_type = dict((n.lower(), v) for n, v in headers).get(b"content-type", b"")
        if status == 200:
            self.assertIn(content_type.split(b";")[0], (b"text/event-stream", b"application/json"))
        if b"content-length" in names and not head_only:
            length = int(dict((n.lower(), v) for n, v in headers)[b"content-length"])
            self.assertEqual(len(body), length)
            if b"charset=utf-8" in content_type:
                body.decode("utf-8")  # the charset it says
            if content_type == b"application/json":
                json.loads(body)


def exchange(port: int, raw: bytes, *, head_only: bool) -> tuple[bytes, list, bytes]:
    """Send one raw request, read the answer's head and (unless it is a stream) its body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # answered and closed before it read everything? The answer is what counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        head, found, body = buffer.partition(b"\r\n\r\n")
        if not found:
            raise AssertionError(f"no complete response head: {buffer!r}")
        status_line, *header_lines = head.split(b"\r\n")
        headers = []
        for line in header_lines:
            match = HEADER_LINE.fullmatch(line)
            if not match:
                raise AssertionError(f"malformed header line {line!r} in {head!r}")
            headers.append((match[1], match[2]))
        lengths = [int(v) for n, v in headers if n.lower() == b"content-length"]
        if lengths and not head_only:
            while len(body) < lengths[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    return status_line, headers, body


async def open_stream(port: int, path: str, headers: str = ""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head.decode(), reader, writer


async def read_to_close(reader, timeout=10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


def valid_tokens(*tasks) -> list[str]:
    """Tokens that open these tasks, where tasks have them (access control)."""
    return [task.stream_token() for task in tasks if hasattr(task, "stream_token")]


STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\x20-\x7e]+)")


@contextlib.contextmanager
def quiet(name: str):
    """Warnings of logger ``name`` off (errors still show)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class DirectSocketFuzzTests(ResponseChecks, TransactionTestCase):
    """runserver_stream's server (uvicorn, then the socket takeover), raw requests over TCP."""

    async def test_odd_requests_are_never_answered_5xx(self):
        idle = await ScriptedTask.objects.acreate(steps=1, status="created")  # streams stay open, empty
        done = await ScriptedTask.objects.acreate(steps=2, status="created")
        async with serving() as (app, port):
            await done.astart()
            await eventually(
                lambda: ScriptedTask.objects.filter(pk=done.pk, status="completed").aexists(),
                message="the task to complete",
            )
            pks = [str(idle.pk), str(done.pk)]
            seen = {}

            @settings(FAST, max_examples=examples(250))
            @given(http_requests(pks, valid_tokens(idle, done)))
            def check(request):
                head_only = request["method"] == b"HEAD"
                status_line, headers, body = exchange(port, request["raw"], head_only=head_only)
                match = STATUS_LINE.fullmatch(status_line)
                self.assertIsNotNone(match, status_line)
                status = int(match[1])
                self.assertEqual(match[2].decode(), HTTPStatus(status).phrase)
                seen[status] = seen.get(status, 0) + 1
                self.check_answer(
                    status,
                    headers,
                    body,
                    method=request["method"],
                    last_event_id=request["last_event_id"],
                    head_only=head_only,
                )

            with quiet("uvicorn.error"):  # a warning per request its parser refuses
                await asyncio.to_thread(check)
            # Every client has left: nothing is left behind, and the server serves as before.
            await eventually(lambda: not app.node.hub._channels, message="every channel to be dropped")
            head, reader, writer = await open_stream(port, "/health", "connection: close\r\n")
            self.assertTrue(head.startswith("HTTP/1.1 200 OK\r\n"), head)
            self.assertEqual(await read_to_close(reader, 5), b"OK")
            writer.close()
            task = await ScriptedTask.objects.acreate(steps=2, status="created")
            authorization = "".join(f"authorization: Bearer {t}\r\n" for t in valid_tokens(task))
            path = f"/stream/testapp/ScriptedTask/{task.pk}"
            head, reader, writer = await open_stream(port, path, authorization)
            await task.astart()
            body = await read_to_close(reader)
            writer.close()
        self.assertGreaterEqual(len(seen), 3, seen)  # the examples reached several kinds of answer
        self.assertTrue(head.startswith("HTTP/1.1 200 OK\r\n"), head)
        events = parse_stream(body).events
        self.assertEqual([(t, i) for t, _, i in events], [("step", "1"), ("step", "2"), ("complete", "3")])
        self.assertEqual(json.loads(events[0][1])["step"], 1)


# -- 2b. the same through the ASGI app, in process ----------------------------------------


def asgi_paths(pks):
    """An ASGI path is text, decoded by the server (with replacement: no lone surrogates)."""
    decoded = stream_paths(pks).map(lambda raw: unquote(raw.decode("latin-1")))
    segment = st.one_of(
        st.sampled_from([*PATH_SAMPLES, *TASK_MODELS, *pks]),
        st.text(max_size=12),
        st.builds(lambda c, n: c * n, st.sampled_from(["9", "\u00e9", "/"]), st.integers(100, 3000)),
    )
    anything = st.lists(segment, max_size=5).map(lambda ss: "/stream/" + "/".join(ss))
    return one_in(3).flatmap(lambda odd: anything if odd else decoded)


@st.composite
def asgi_scopes(draw, pks, valid_tokens=()):
    path = draw(asgi_paths(pks))
    headers = [] if draw(one_in(16)) else [(b"host", draw(hosts))]
    last_event_id = None
    if draw(st.booleans()):
        last_event_id = draw(st.binary(max_size=30) if draw(one_in(4)) else last_event_ids)
        headers.append((b"last-event-id", last_event_id))
    if draw(st.booleans()):
        headers.append((b"accept", draw(accepts | st.binary(max_size=30))))
    if draw(one_in(3)):
        headers.append((b"authorization", b"Bearer " + draw(tokens(valid_tokens))))
    if draw(one_in(4)):
        headers.append((b"cookie", draw(header_values([b"sessionid=x", b"sessionid="]))))
    if draw(one_in(4)):
        headers += draw(st.lists(st.tuples(st.binary(max_size=10), st.binary(max_size=10)), max_size=2))
    method = "GET"
    if draw(one_in(3)):
        method = draw(st.sampled_from([m.decode() for m in METHODS]) | st.text(max_size=8))
    query = draw(st.binary(max_size=30) if draw(one_in(4)) else queries(pks, valid_tokens))
    query = query.removeprefix(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8"),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }


async def call_asgi(app, scope) -> list[dict]:
    """One request through the app; the client leaves once the answer has started."""
    messages: list[dict] = []
    started = asyncio.Event()
    asked = False

    async def receive():
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await started.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)
        if message["type"] == "http.response.start":
            started.set()

    await asyncio.wait_for(app(scope, receive, send), 10)
    return messages


class ASGIFuzzTests(ResponseChecks, TransactionTestCase):
    async def test_odd_scopes_are_never_answered_5xx(self):
        idle = await ScriptedTask.objects.acreate(steps=1, status="created")
        pks = [str(idle.pk)]
        tokens_for_idle = valid_tokens(idle)
        app = StreamingApp(node_factory=lambda: Node(node_settings(RUN_TASKS=False)))
        await app.start()
        loop = asyncio.get_running_loop()
        seen = {}
        try:

            @settings(FAST, max_examples=examples(400))
            @given(asgi_scopes(pks, tokens_for_idle))
            def check(scope):
                messages = asyncio.run_coroutine_threadsafe(call_asgi(app, scope), loop).result(15)
                start, *rest = messages
                seen[start["status"]] = seen.get(start["status"], 0) + 1
                self.assertEqual(start["type"], "http.response.start")
                self.assertIsInstance(start["status"], int)
                for name, value in start.get("headers", []):
                    self.assertIsInstance(name, bytes)
                    self.assertIsInstance(value, bytes)
                self.assertTrue(all(m["type"] == "http.response.body" for m in rest), rest)
                if start["status"] != 200:
                    self.assertFalse(rest[-1].get("more_body", False))
                self.check_answer(
                    start["status"],
                    start.get("headers", []),
                    b"".join(m.get("body", b"") for m in rest),
                    method=scope["method"].encode("utf-8", "surrogatepass"),
                    last_event_id=scope_last_event_id(scope),
                )

            await asyncio.to_thread(check)
            await eventually(lambda: not app.node.hub._channels, message="every channel to be dropped")
        finally:
            await app.shutdown()
        self.assertGreaterEqual(len(seen), 3, seen)  # the examples reached several kinds of answer


def scope_last_event_id(scope):
    values = [v for n, v in scope["headers"] if n == b"last-event-id"]
    return values[-1] if values else None


# -- 3. credentials (access control) through the ASGI app ---------------------------------


def _model(label: str, name: str):
    try:
        return apps.get_model(label, name)
    except LookupError:  # pragma: no cover - the test app changed
        return None


def signed(payload) -> bytes:
    """A token signed with our key, its payload anything (an older format, a bug, a forgery with the key)."""
    return signing.Signer(salt=TOKEN_SALT).sign_object(payload, compress=True).encode()


def mint(task, expires_in) -> bytes:
    """A token as the application mints one; an expiry it refuses to mint gives a 5-minute one."""
    try:
        return task.stream_token(expires_in=expires_in).encode()
    except (ValueError, OverflowError):
        return task.stream_token().encode()


@st.composite
def credential_tokens(draw, task, other):
    key = str(TaskKey.of(type(task), task.pk))
    kinds = ["minted", "long-lived", "other", "expired", "odd", "any", "altered", "garbage"]
    kind = draw(st.sampled_from(kinds))
    if kind == "minted":  # as the application mints them
        return mint(task, draw(st.sampled_from([1, 300, 10**6, 10**9])))
    if kind == "long-lived":  # an expiry past the year 9999
        return mint(task, draw(st.sampled_from([10**12, 1e300])))
    if kind == "other":  # valid, for another task
        return mint(other, 300)
    if kind == "expired":
        return signed({"k": [key], "x": int(time.time()) - draw(st.integers(0, 10**6))})
    if kind == "odd":  # our format, odd values in it
        keys = draw(st.just([key]) | st.lists(st.one_of(texts, json_scalars, st.just(key)), max_size=3))
        expiry = draw(
            st.one_of(json_scalars, st.integers(-(10**400), 10**400), st.sampled_from([1e308, 10**11]))
        )
        return signed({"k": keys, "x": expiry})
    if kind == "any":  # any JSON at all
        return signed(draw(json_values))
    if kind == "altered":  # a valid token with one character changed
        token = task.stream_token()
        at = draw(st.integers(0, len(token) - 1))
        return (token[:at] + draw(st.sampled_from(list("A0:._-=\x00\u00e9"))) + token[at + 1 :]).encode()
    return draw(header_values([b"", b"x", b"a:b", b"." * 40]))


@st.composite
def credential_scopes(draw, paths, tokens, cookies):
    headers = [(b"host", b"127.0.0.1")]
    query = []
    case = draw(
        st.sampled_from(["bearer", "bearer", "query", "query", "cookie", "several", "scheme", "none"])
    )
    if case in ("bearer", "several"):
        headers.append((b"authorization", draw(st.sampled_from([b"Bearer ", b"bearer  "])) + draw(tokens)))
    if case in ("query", "several"):
        query.append(b"token=" + quote(draw(tokens), safe="").encode())
    if case in ("cookie", "several"):
        headers.append((b"cookie", draw(cookies)))
    if case == "scheme":
        headers.append((b"authorization", draw(st.sampled_from([b"Basic ", b"Token ", b""])) + draw(tokens)))
    if draw(one_in(3)):
        headers.append((b"accept", b"application/json"))
    if draw(one_in(4)):
        headers.append((b"last-event-id", draw(last_event_ids)))
    if draw(one_in(4)):
        query.append(b"history=" + draw(st.sampled_from([b"all", b"x"])))
    path = draw(st.sampled_from(paths))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"&".join(draw(st.permutations(query))),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }


class CredentialFuzzTests(ResponseChecks, TransactionTestCase):
    """Tokens (valid, expired, for another task, altered, signed with odd payloads) and session
    cookies (real, unknown, garbage), alone or together, for a task only they can open."""

    async def test_credentials_are_never_answered_5xx(self):
        private = _model("testapp", "PrivateTask")
        if private is None or private.public_stream or TOKEN_SALT is None:  # pragma: no cover
            self.skipTest("no protected task model or no stream tokens")
        task = await private.objects.acreate(status="created")
        other = await private.objects.acreate(status="created")
        cookies = [f"{django_settings.SESSION_COOKIE_NAME}=nosuchsession0123456789".encode()]
        for user in [
            await User.objects.acreate_superuser("root", "root@example.com", "x"),
            await User.objects.acreate_user("plain", "plain@example.com", "x"),
        ]:
            await self.async_client.aforce_login(user)
            session = self.async_client.cookies[django_settings.SESSION_COOKIE_NAME].value
            cookies.append(f"{django_settings.SESSION_COOKIE_NAME}={session}".encode())
        cookie_values = st.sampled_from(cookies) | header_values([b"sessionid=", b"a=b; sessionid=\xff"])
        paths = [f"/stream/testapp/PrivateTask/{task.pk}", f"/stream/PrivateTask/{task.pk}"]
        paths.append(f"/stream/PrivateTask/{task.pk + 1000}")  # no such row
        app = StreamingApp(node_factory=lambda: Node(node_settings(RUN_TASKS=False)))
        await app.start()
        loop = asyncio.get_running_loop()
        seen = {}
        try:

            @settings(FAST, max_examples=examples(300))
            @given(credential_scopes(paths, credential_tokens(task, other), cookie_values))
            def check(scope):
                messages = asyncio.run_coroutine_threadsafe(call_asgi(app, scope), loop).result(15)
                start, *rest = messages
                seen[start["status"]] = seen.get(start["status"], 0) + 1
                self.check_answer(
                    start["status"],
                    start.get("headers", []),
                    b"".join(m.get("body", b"") for m in rest),
                    method=b"GET",
                    last_event_id=scope_last_event_id(scope),
                )
                names = {name for name, _ in scope["headers"]}
                if (
                    b"authorization" not in names
                    and b"cookie" not in names
                    and b"token=" not in scope["query_string"]
                ):
                    self.assertGreaterEqual(start["status"], 400)  # nothing proven: refused

            await asyncio.to_thread(check)
            await eventually(lambda: not app.node.hub._channels, message="every channel to be dropped")
        finally:
            await app.shutdown()
        self.assertGreaterEqual(len(seen), 3, seen)
