"""A seeded corpus of malformed Realtime client frames, and a driver that sends it to a Stemme server over
several connections and reports what came back: closes by code, sockets dropped without a close frame,
error events by code, and whether each connection still answers afterwards.

Frames mutate valid client events: wrong types, absurd numbers (``1e309``, ``NaN``, 400-digit integers,
booleans), deep nesting, lone surrogates, invalid base64, truncated JSON, binary frames without the
extension, oversized messages (ASCII and emoji), unknown types, dropped and extra keys. The corpus never
holds a frame that would start long work on purpose: responses are capped at a few tokens by the session,
and no mutation makes a long prompt, so a run stays bounded in time.

    python -m tests.fuzzing --url ws://127.0.0.1:8000 --frames 10000 --seed 12 [--connections 8]
    python -m tests.fuzzing --dump 20 --seed 12        # print the first frames of the corpus
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

logger = logging.getLogger(__name__)

SILENCE_100MS = base64.b64encode(bytes(4800)).decode()
"""0.1 s of 24 kHz PCM16 silence."""
RESET = {"type": "session.update", "session": {
    "type": "realtime", "output_modalities": ["text"], "max_output_tokens": 4,
    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}}}
"""Sent first on every connection: text answers of at most 4 tokens, manual turns."""
PROBE_RESPONSE = {"output_modalities": ["text"], "max_output_tokens": 2}
DRIVER_IDS = ("sync-", "probe-")
"""event_id prefixes of the driver's own frames, whose answers are not counted in the figures."""
SYNC_EVERY = 20
"""Frames a connection sends before it waits until the server has handled them. A client that runs
megabytes ahead fills the socket buffers: the server then reads the keepalive pong only after the backlog,
and websockets closes with 1011 (keepalive ping timeout) after 20 s, whatever the frames hold."""

Event = dict[str, Any]


def _user_text(text: str, role: str = "user") -> Event:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "conversation.item.create", "item": {
        "type": "message", "role": role, "content": [{"type": kind, "text": text}]}}


VALID: list[Callable[[], Event]] = [
    lambda: copy.deepcopy(RESET),
    lambda: {"type": "session.update", "session": {"instructions": "Be brief.", "audio": {
        "input": {"transcription": {"model": "whisper-base", "language": "fr"}},
        "output": {"voice": "auto", "speed": 1.1}}}},
    lambda: {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
        "create_response": True, "interrupt_response": True}}}}},
    lambda: {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "high"}}}}},
    lambda: {"type": "session.update", "session": {"input_audio_format": "pcm16", "turn_detection": None,
                                                   "modalities": ["text"], "voice": "alloy"}},
    lambda: {"type": "session.update", "session": {"stemme": {"event_names": "ga"}, "model": "stemme"}},
    lambda: {"type": "input_audio_buffer.append", "audio": SILENCE_100MS},
    lambda: {"type": "input_audio_buffer.append", "audio": SILENCE_100MS},
    lambda: {"type": "input_audio_buffer.commit"},
    lambda: {"type": "input_audio_buffer.clear"},
    lambda: _user_text("Hi."),
    lambda: _user_text("Bonjour.", "assistant"),
    lambda: _user_text("One word.", "system"),
    lambda: {"type": "conversation.item.retrieve", "item_id": "item_none"},
    lambda: {"type": "conversation.item.delete", "item_id": "item_none"},
    lambda: {"type": "conversation.item.truncate", "item_id": "item_none", "content_index": 0,
             "audio_end_ms": 100},
    lambda: {"type": "response.create", "response": {"output_modalities": ["text"], "max_output_tokens": 2,
                                                     "instructions": "Say OK.", "metadata": {"k": "v"}}},
    lambda: {"type": "response.cancel"},
    lambda: {"type": "output_audio_buffer.clear"},
]

VALID_WEIGHTS = [1.0] * 10 + [0.34] * 3 + [1.0] * 3 + [0.4, 1.0, 1.0]
"""Items (0.34 each of the three roles) and response.create (0.4) are rarer: every response accepted runs
the language model on the whole history, and a run must stay bounded in time on two cores."""
assert len(VALID_WEIGHTS) == len(VALID)
WRONG_TYPES: list[Any] = [[], {}, [1, "a"], {"a": {}}, 5, -7, 1.5, True, False, None, "x", ""]
ABSURD_NUMBERS = ["1e309", "-1e309", "1e400", "Infinity", "-Infinity", "NaN", "1e-400", "-0",
                  "18446744073709551616", "-9223372036854775809", "9" * 400, "1" + "0" * 5000,
                  "true", "false", "0.0000001", "4097", "-1"]
"""Raw JSON (or not-quite-JSON) number tokens, spliced in after dumping."""
SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\udc00\ud800", "ok\ud83d", "\ud83d\ude00\ud800"]
BAD_BASE64 = ["!!notbase64", "abc", "a===", "====", "é", "QUJD\n", "QQ", base64.b64encode(b"\x01").decode(),
              " " * 8, "QUJDRA==QUJD"]
PROMPT_KEYS = {"instructions", "text", "transcript"}
"""Keys whose values become prompt text: no mutation puts a long string there (prompt caps are another
test's business; this one must stay fast)."""


@dataclass
class Frame:
    kind: str
    """The mutation that made it."""
    data: str | bytes
    """Text (a JSON message) or bytes (a binary frame)."""


def _slots(node: Any, out: list[tuple[Any, Any]] | None = None) -> list[tuple[Any, Any]]:
    """Every (container, key) pair in an event, depth first."""
    out = [] if out is None else out
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append((node, k))
        _slots(v, out)
    return out


class Corpus:
    """Seeded frames; the same seed gives the same frames on every machine."""

    WEIGHTS = {"valid": 14, "wrong_type": 14, "absurd_number": 10, "drop_key": 5, "extra_keys": 5,
               "surrogate": 8, "deep_nesting": 5, "invalid_base64": 5, "truncated": 8, "garbage": 3,
               "binary": 8, "oversized": 0.6, "huge_string": 2, "unknown_type": 5, "non_object": 2,
               "many_containers": 0.3, "stacked": 4}

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self._raw: dict[str, str] = {}

    def frames(self, n: int) -> Iterator[Frame]:
        kinds, weights = zip(*self.WEIGHTS.items(), strict=True)
        for _ in range(n):
            kind = self.rng.choices(kinds, weights)[0]
            yield Frame(kind, getattr(self, f"_{kind}")())

    # -- helpers ------------------------------------------------------------------------------------------
    def _base(self) -> Event:
        return self.rng.choices(VALID, VALID_WEIGHTS)[0]()

    def _dump(self, event: Any) -> str:
        text = json.dumps(event)
        for token, raw in self._raw.items():
            text = text.replace(json.dumps(token), raw)
        self._raw.clear()
        return text

    def _raw_value(self, raw: str) -> str:
        token = f"@@raw{len(self._raw)}@@"
        self._raw[token] = raw
        return token

    def _slot(self, event: Event, *, strings_only: bool = False) -> tuple[Any, Any]:
        slots = [(c, k) for c, k in _slots(event) if not strings_only or isinstance(c[k], str)]
        return self.rng.choice(slots) if slots else (event, "type")

    def _mutate_one(self, event: Event) -> None:
        kind = self.rng.choice(["wrong_type", "absurd_number", "drop_key", "surrogate", "unknown_type"])
        getattr(self, f"_m_{kind}")(event)

    # -- mutations of an event (in place) -----------------------------------------------------------------
    def _m_wrong_type(self, event: Event) -> None:
        c, k = self._slot(event)
        c[k] = copy.deepcopy(self.rng.choice(WRONG_TYPES))

    def _m_absurd_number(self, event: Event) -> None:
        c, k = self._slot(event)
        c[k] = self._raw_value(self.rng.choice(ABSURD_NUMBERS))

    def _m_drop_key(self, event: Event) -> None:
        c, k = self._slot(event)
        if isinstance(c, dict):
            c.pop(k, None)

    def _m_surrogate(self, event: Event) -> None:
        s = self.rng.choice(SURROGATES)
        where = self.rng.random()
        if where < 0.2:
            event["event_id"] = "evt" + s
        elif where < 0.3:
            event[s] = 1  # in a key
        else:
            c, k = self._slot(event, strings_only=True)
            old = c.get(k) if isinstance(c, dict) else c[k]
            c[k] = (old if isinstance(old, str) else "") + s

    def _m_unknown_type(self, event: Event) -> None:
        event["type"] = self.rng.choice(["response.audio.delta", "session.created", "error", "", "x" * 300,
                                         "Session.Update", "session.update ", "input_audio_buffer.append\x00",
                                         "transcription_session.update", "conversation.item.input_audio"])

    # -- frame kinds --------------------------------------------------------------------------------------
    def _valid(self) -> str:
        return self._dump(self._base())

    def _wrong_type(self) -> str:
        e = self._base()
        self._m_wrong_type(e)
        return self._dump(e)

    def _absurd_number(self) -> str:
        e = self._base()
        numeric = [(c, k) for c, k in _slots(e) if isinstance(c[k], (int, float)) and not isinstance(c[k], bool)]
        if not numeric or self.rng.random() < 0.3:
            td = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
            key = self.rng.choice(["threshold", "prefix_padding_ms", "silence_duration_ms"])
            td[key] = self._raw_value(self.rng.choice(ABSURD_NUMBERS))
            e = {"type": "session.update", "session": self.rng.choice([
                {"audio": {"input": {"turn_detection": td}}}, {"turn_detection": td},
                {"audio": {"output": {"speed": self._raw_value(self.rng.choice(ABSURD_NUMBERS))}}},
                {"max_output_tokens": self._raw_value(self.rng.choice(ABSURD_NUMBERS))},
                {"audio": {"input": {"format": {"type": "audio/pcm",
                                                "rate": self._raw_value(self.rng.choice(ABSURD_NUMBERS))}}}}])}
            return self._dump(e)
        c, k = self.rng.choice(numeric)
        c[k] = self._raw_value(self.rng.choice(ABSURD_NUMBERS))
        return self._dump(e)

    def _drop_key(self) -> str:
        e = self._base()
        self._m_drop_key(e)
        return self._dump(e)

    def _extra_keys(self) -> str:
        e = self._base()
        for _ in range(self.rng.randint(1, 4)):
            c, _k = self._slot(e)
            target = c if isinstance(c, dict) else e
            target[self.rng.choice(["x", "response", "session", "item", "audio", "tools", "event_id"])] = \
                copy.deepcopy(self.rng.choice(WRONG_TYPES))
        return self._dump(e)

    def _surrogate(self) -> str:
        e = self._base()
        self._m_surrogate(e)
        return self._dump(e)

    def _deep_nesting(self) -> str:
        depth = self.rng.choice([33, 100, 999, 1000, 5000, 100_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        inner = opener * depth + "1" + closer * depth
        if self.rng.random() < 0.3:
            inner = opener * depth  # unbalanced too
        e = self._base()
        c, k = self._slot(e)
        c[k] = self._raw_value(inner)
        return self._dump(e)

    def _invalid_base64(self) -> str:
        audio = self.rng.choice(BAD_BASE64)
        return self._dump({"type": "input_audio_buffer.append", "audio": audio})

    def _truncated(self) -> str:
        text = self._valid()
        return text[:self.rng.randint(0, max(0, len(text) - 1))]

    def _garbage(self) -> str:
        n = self.rng.randint(0, 400)
        return "".join(chr(self.rng.choice([self.rng.randint(0x20, 0x7e), self.rng.randint(0xa0, 0x2fff)]))
                       for _ in range(n))

    def _binary(self) -> bytes:
        n = self.rng.choice([0, 1, 3, 480, 960, 4801, 9600, self.rng.randint(0, 20000)])
        if self.rng.random() < 0.5:
            return bytes(n)  # silence (or an odd length)
        return bytes(self.rng.getrandbits(8) for _ in range(min(n, 2000))) + bytes(max(0, n - 2000))

    def _oversized(self) -> str:
        which = self.rng.randrange(3)
        if which == 0:  # bytes over 1 MiB, characters too
            return self._dump({"type": "input_audio_buffer.append", "audio": "A" * (1 << 20)})
        if which == 1:  # 4 MB of emoji: under 1 Mi characters, over 1 MiB of UTF-8
            return json.dumps({"type": "conversation.item.create", "x": "😀" * 1_000_000}, ensure_ascii=False)
        return json.dumps({"type": "session.update", "session": {"voice": "é" * 600_000}}, ensure_ascii=False)

    def _huge_string(self) -> str:
        e = self._base()
        slots = [(c, k) for c, k in _slots(e) if isinstance(c[k], str) and k not in PROMPT_KEYS]
        c, k = self.rng.choice(slots) if slots else (e, "event_id")
        c[k] = self.rng.choice(["v" * 10_000, "\x1b[31m\n" * 2000, "é" * 100_000, "\u202e" * 500])
        return self._dump(e)

    def _unknown_type(self) -> str:
        e = self._base()
        self._m_unknown_type(e)
        return self._dump(e)

    def _non_object(self) -> str:
        return self.rng.choice(["[]", "[1,2]", "1", '"session.update"', "null", "true", "", " ", "{}",
                                '{"type": null}', '{"type": {"a": 1}}', '[{"type": "session.update"}]'])

    def _many_containers(self) -> str:
        n = self.rng.choice([10_001, 50_000, 200_000])
        return '{"type":"session.update","session":{"x":[' + ",".join(["[]"] * n) + "]}}"

    def _stacked(self) -> str:
        e = self._base()
        for _ in range(self.rng.randint(2, 4)):
            self._mutate_one(e)
        return self._dump(e)


# -- the driver ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    frames: int = 0
    frame_kinds: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    closes: Counter[str] = field(default_factory=Counter)
    """Closes by the server during the run, by close code; "none" counts sockets dropped without a close frame."""
    errors: Counter[str] = field(default_factory=Counter)
    """Error events received, by error code."""
    responses: Counter[str] = field(default_factory=Counter)
    """response.done received, by status."""
    transcriptions: Counter[str] = field(default_factory=Counter)
    """Committed audio turns transcribed: completed or failed."""
    sync_frames: int = 0
    """Frames of the driver's own (not counted in ``frames``): one every SYNC_EVERY frames, and the probes."""
    wedged: int = 0
    wedged_how: Counter[str] = field(default_factory=Counter)
    """What a wedged connection failed to do."""
    """Connections that did not answer a session.update and a response.create after the barrage."""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"frames": self.frames, "frame_kinds": dict(sorted(self.frame_kinds.items())),
                "sync_frames": self.sync_frames, "connections": self.connections, "closes": dict(self.closes),
                "errors": dict(self.errors.most_common()), "responses": dict(self.responses),
                "transcriptions": dict(self.transcriptions),
                "wedged": self.wedged, "wedged_how": dict(self.wedged_how), "seconds": round(self.seconds, 1)}


class Link:
    """One fuzzing connection: a reader that keeps every event, and the probes of the liveness check."""

    def __init__(self, ws: ClientConnection, report: Report) -> None:
        self.ws = ws
        self.report = report
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self.closed = False
        self.ending = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.recv()
                if isinstance(message, str):
                    ev = json.loads(message)
                    self.events.append(ev)
                    if ev.get("type") == "error" and not str(ev["error"].get("event_id")).startswith(DRIVER_IDS):
                        self.report.errors[str(ev["error"].get("code"))] += 1
                    elif ev.get("type") == "response.done":
                        self.report.responses[ev["response"]["status"]] += 1
                    elif str(ev.get("type")).startswith("conversation.item.input_audio_transcription.") and \
                            not ev["type"].endswith(".delta"):
                        self.report.transcriptions[ev["type"].rsplit(".", 1)[1]] += 1
                    self.changed.set()
        except ConnectionClosed as e:
            if not self.ending:
                self.report.closes[f"{e.rcvd.code} {e.rcvd.reason}".strip() if e.rcvd else "none"] += 1
        finally:
            self.closed = True
            self.changed.set()

    async def wait(self, start: int, match: Callable[[Event], bool], seconds: float) -> tuple[int, Event] | None:
        """The first event from index ``start`` on that matches, or None when closed or out of time."""
        deadline = time.monotonic() + seconds
        i = start
        while True:
            while i < len(self.events):
                if match(self.events[i]):
                    return i, self.events[i]
                i += 1
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return None

    async def sync(self, marker: str, seconds: float) -> None:
        """Send a frame whose answer is known (an error naming ``marker``) and wait for it: every frame sent
        before it has then been handled, so the client never runs more than a few frames ahead."""
        mark = len(self.events)
        await self.ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": marker, "event_id": marker}))
        self.report.sync_frames += 1
        await self.wait(mark, lambda e: (e.get("error") or {}).get("event_id") == marker, seconds)

    async def alive(self, n: int, seconds: float) -> str | None:
        """After the barrage: session.update → session.updated, then a response.create → response.done
        (waiting out, up to 5 times, a response that was still running). None when alive, else what failed."""
        marker = f"probe-{n}"
        await self.ws.send(json.dumps({"type": "response.cancel", "event_id": f"{marker}-cancel"}))
        await self.sync(marker, seconds)
        mark = len(self.events)
        await self.ws.send(json.dumps(RESET))
        if await self.wait(mark, lambda e: e.get("type") == "session.updated", seconds) is None:
            return "no session.updated"
        for attempt in range(5):
            eid = f"{marker}-create-{attempt}"
            mark = len(self.events)
            await self.ws.send(json.dumps({"type": "response.create", "event_id": eid, "response": PROBE_RESPONSE}))
            got = await self.wait(mark, lambda e, eid=eid: e.get("type") == "response.created" or  # type: ignore[misc]
                                  (e.get("error") or {}).get("event_id") == eid, seconds)
            if got is None:
                return "response.create unanswered"
            done = await self.wait(got[0], lambda e: e.get("type") == "response.done", seconds)
            if got[1]["type"] == "response.created":
                return None if done is not None else "no response.done"
            if done is None:  # refused: a response of the barrage was still running, and it did not end
                return f"refused ({got[1]['error'].get('code')}), no response.done"
        return "refused 5 times"


async def _open(url: str, binary: bool, report: Report) -> Link:
    ws = await connect(url + "/v1/realtime" + ("?audio=binary" if binary else ""), max_size=None,
                       open_timeout=60, ping_interval=None)
    report.connections += 1
    link = Link(ws, report)
    await ws.send(json.dumps(RESET))
    return link


async def _drive(url: str, frames: list[Frame], binary: bool, report: Report, n: int,
                 check_seconds: float) -> None:
    link = await _open(url, binary, report)
    for i, frame in enumerate(frames, 1):
        if link.closed:  # counted in closes; go on with a new connection so every frame is sent
            link = await _open(url, binary, report)
        try:
            await link.ws.send(frame.data)
        except ConnectionClosed:
            await asyncio.sleep(0.1)  # let the reader record the close
            continue
        report.frames += 1
        report.frame_kinds[frame.kind] += 1
        if i % SYNC_EVERY == 0:
            await link.sync(f"sync-{n}-{i}", check_seconds)
    try:
        failed = "closed" if link.closed else await link.alive(n, check_seconds)
    except ConnectionClosed:
        failed = "closed"
    if failed:
        report.wedged += 1
        report.wedged_how[failed] += 1
        tail = [e.get("type") if e.get("type") != "error" else f"error:{e['error'].get('code')}"
                for e in link.events[-8:]]
        logger.warning("fuzz connection %d did not answer: %s; last events %s", n, failed, tail)
    link.ending = True
    await link.ws.close()
    await link.reader


async def barrage(url: str, *, frames: int = 10_000, seed: int = 12, connections: int = 8,
                  check_seconds: float = 120.0) -> Report:
    """Send ``frames`` corpus frames over ``connections`` concurrent connections (the first one with the
    binary-audio extension), then check that each connection still answers."""
    corpus = list(Corpus(seed).frames(frames))
    report = Report()
    t = time.monotonic()
    await asyncio.gather(*(_drive(url.rstrip("/"), corpus[i::connections], i == 0, report, i, check_seconds)
                           for i in range(connections)))
    report.seconds = time.monotonic() - t
    return report


def codec(data: str | bytes) -> None:
    """What a session does with a text frame before any state changes: parse it, then the event's own checks.
    Raises ProtocolError for a frame that is refused, and nothing else."""
    from stemme.streaming import protocol as p

    event = p.parse_text(data)
    t = event["type"]
    if t == "session.update":
        p.SessionConfig().apply(p.field_of(event, "session", dict), event.get("event_id"))
    elif t == "response.create":
        p.parse_response(event)
    elif t == "input_audio_buffer.append":
        p.decode_audio(event)
    elif t == "conversation.item.create":
        p.validate_item(event)


def codec_timing(frames: int, seed: int) -> dict[str, dict[str, float]]:
    """Milliseconds the codec spends on each text frame of the corpus, by kind: median, p95 and max. This
    work runs on the server's event loop, so its worst case bounds what one message can stall."""
    from stemme.streaming.protocol import ProtocolError

    times: dict[str, list[float]] = {}
    for f in Corpus(seed).frames(frames):
        if isinstance(f.data, bytes):
            continue
        t = time.perf_counter()
        try:
            codec(f.data)
        except ProtocolError:
            pass
        times.setdefault(f.kind, []).append((time.perf_counter() - t) * 1000)
    out = {}
    for kind, ms in sorted(times.items()):
        ms.sort()
        out[kind] = {"n": len(ms), "median": round(ms[len(ms) // 2], 3),
                     "p95": round(ms[int(len(ms) * 0.95)], 3), "max": round(ms[-1], 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8000")
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="run the barrage N times; print seconds median and p95")
    p.add_argument("--dump", type=int, default=0, help="print the first N frames instead of sending them")
    p.add_argument("--codec-timing", action="store_true", help="time the codec on each frame (no server)")
    args = p.parse_args(argv)
    if args.dump:
        for f in Corpus(args.seed).frames(args.dump):
            shown = f.data if isinstance(f.data, str) else f"<{len(f.data)} bytes>"
            print(f.kind, shown[:200] + ("…" if len(shown) > 200 else ""))
        return 0
    if args.codec_timing:
        print(json.dumps(codec_timing(args.frames, args.seed), indent=1))
        return 0
    failed, seconds = False, []
    for _ in range(args.repeat):
        report = asyncio.run(barrage(args.url, frames=args.frames, seed=args.seed, connections=args.connections))
        print(json.dumps(report.to_json(), indent=1))
        failed |= bool(report.closes or report.wedged)
        seconds.append(report.seconds)
    if args.repeat > 1:
        seconds.sort()
        print(json.dumps({"runs": len(seconds), "seconds_median": seconds[len(seconds) // 2],
                          "seconds_p95": seconds[min(len(seconds) - 1, int(len(seconds) * 0.95))]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
