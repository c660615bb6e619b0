"""The server: Starlette on uvicorn, one port. ``/v1/realtime`` speaks the Realtime API over a WebSocket (uvicorn's
websockets-sansio implementation: the ``websockets`` protocol code); ``/healthz`` and ``/readyz`` (HTTP/1.0 too, as
load balancers send them), ``/metrics``, ``/v1/voices``, the browser page, and the REST routes of
``streaming/rest.py`` when that module is there. The server is thin: it adapts a WebSocket to a Session (messages
in, a send callback, close). Models load once, after the port opens, and are shared by all sessions. SIGTERM, or
``await server.drain()``, drains (docs/protocol.md): /readyz 503 while the port listens, new sessions and new turns
refused, responses in progress finish within the grace period, then every session is closed with 1001."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from stemme.streaming.metrics import Metrics
from stemme.streaming.protocol import MAX_TEXT_MESSAGE, encode_event, new_id
from stemme.streaming.session import Session
from stemme.voice import languages
from stemme.voice.llm import Conversation, GenerationOptions
from stemme.voice.pipeline import Stages, stages_for
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request as WsRequest

from stemme.config import EngineConfig
from stemme.engines import Engines
from stemme.errors import ConfigError, StemmeError
from stemme.logsafe import clip

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"
"""The browser page and its assets, served by this server itself (no CDN: works air-gapped)."""
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".json": "application/json", ".png": "image/png",
          ".svg": "image/svg+xml", ".ico": "image/x-icon"}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:"}

LLM_PROBE_S = 5.0
"""How often a remote language model is asked whether it answers (GET /models), for /readyz."""

WS_MAX_SIZE = 16 << 20
"""Frames up to this size reach the session, which answers oversized ones with an error event; beyond it
the connection is closed with 1009."""

CLOSE_FLUSH_S = 5.0
"""Before a close frame, what is queued for the client gets this long to be written."""
CANCEL_WAIT_S = 5.0
"""At the end of a drain, responses cancelled at the deadline get this long to send their response.done."""
ENGINE_JOIN_S = 10.0
"""On stop, the engines' worker threads get this long (all together) to end, so none outlives the interpreter."""
SHUTDOWN_AFTER_DRAIN_S = CANCEL_WAIT_S + 2 * CLOSE_FLUSH_S + CLOSE_FLUSH_S + ENGINE_JOIN_S
"""The most a stop can take after the drain's grace period: cancelled responses, the closes' flush, uvicorn's
graceful shutdown, the engine threads. Kubernetes' terminationGracePeriodSeconds must cover preStop + the grace
period + this."""

TRANSPORT_EXT = "stemme.transport"
"""The ASGI extension of this server's WebSocket protocol (``_WebSocketProtocol``)."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """When set, clients must send ``Authorization: Bearer <key>`` (or ``?api_key=`` / the
    ``openai-insecure-api-key.<key>`` subprotocol, for browsers)."""
    warmup: bool = True
    """Run each engine once before accepting sessions, so the first user does not pay for it."""
    max_sessions: int = 32
    """Sessions beyond this get an error event ``server_busy`` and a close with 1013 (try again later)."""
    idle_timeout_s: float = 300.0
    """A session that sends nothing for this long, with no response in progress, is closed (1000)."""
    max_session_s: float = 3600.0
    """Longest session; then it is closed (1000) after an error event ``session_expired``."""
    max_turn_s: float = 30.0
    """Longest user utterance; the VAD ends the turn there."""
    max_outbound_bytes: int = 8 << 20
    """Bytes queued for a client that does not read; beyond, its session is cancelled at once and it is sent a
    close frame (1008), so a slow reader cannot grow the server's memory or keep the engines busy."""
    slow_reader_abort_s: float = 20.0
    """A close frame queued behind data the client does not read: if the client has not answered it after this
    long, the TCP connection is aborted (nothing stays queued for it)."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed besides the server's own and localhost, e.g. ``https://app.example.org``."""
    metrics_key: str | None = None
    """A second key that opens /metrics only (for a Prometheus scraper); with api_key set, /metrics and
    /v1/voices need a key. /healthz and /readyz stay open for load balancers."""
    shutdown_grace_s: float = 30.0
    """Drain (SIGTERM): responses in progress get this long to finish, then are cancelled; then every session is
    closed with 1001 (``--drain-grace``, STEMME_DRAIN_GRACE_S)."""
    ssl_certfile: str | None = None
    """PEM certificate (chain): with ``ssl_keyfile``, the port serves https and wss."""
    ssl_keyfile: str | None = None
    """PEM private key of ``ssl_certfile``."""


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warm_up(engines: Engines, batching: bool = False) -> None:
    t = time.perf_counter()
    engines.load_all()
    engines.asr.transcribe(np.zeros(16000, np.float32))
    try:
        _warm_llm(engines)
    except StemmeError as e:
        if not getattr(engines.llm, "remote", False):
            raise
        logger.warning("remote language model not warmed up: %s", e)  # /readyz reports it until it answers
    reg = engines.tts.registry
    warmed: set[str] = set()
    for lang in engines.config.languages or languages.SUPPORTED:  # every language: warm the tested ones' voices
        try:
            v = reg.resolve(lang)
        except Exception:  # noqa: BLE001 - a missing voice is reported when it is needed
            continue
        if v.engine not in warmed:
            engines.tts.synthesize("Hello.", v)
            warmed.add(v.engine)
        if batching and engines.tts.batch_key(v) is not None and v.name not in warmed:
            engines.tts.synthesize_batch(["Hello.", "Hi."], v)  # prepares the voice's batch graph once
            warmed.add(v.name)
    logger.info("engines warmed up in %.1fs", time.perf_counter() - t)


def _warm_llm(engines: Engines) -> None:
    """One short answer, which also computes the shared cache of Stemme's fixed prompt start (instructions
    and example turns) of each language that has examples, so that no user's first turn pays for it."""
    from stemme.voice.llm import FEWSHOT

    remote = getattr(engines.llm, "remote", False)  # a remote model keeps no shared cache of ours
    for lang in dict.fromkeys(["en", *(FEWSHOT if Conversation().fewshot and not remote else ())]):
        conv = Conversation()
        conv.add("user", "Hi")
        opts = GenerationOptions(max_new_tokens=2 if lang == "en" else 1, shared_prefix=conv.shared_prefix(lang))
        for _ in engines.llm.stream(conv.messages(lang), opts):
            pass


class _WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with one ASGI extension, ``stemme.transport``: ``close(code, reason,
    abort_after)`` queues a close frame at once, even behind data the client has not read (uvicorn's own close
    waits until the client reads), and aborts the TCP connection if the client has not answered it in time."""

    def handle_connect(self, event: WsRequest) -> None:
        super().handle_connect(event)
        scope: Any = getattr(self, "scope", None)  # set when the handshake goes on to the application
        if scope is not None:
            scope["extensions"][TRANSPORT_EXT] = {"close": self.close_now}

    def close_now(self, code: int, reason: str, abort_after: float) -> None:
        if not self.close_sent and not self.transport.is_closing():
            with contextlib.suppress(InvalidState):  # the client's close frame came first
                self.conn.send_close(code, reason)
                self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            if self.read_paused:  # read the client's answer to the close frame
                self.read_paused = False
                self.transport.resume_reading()
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(abort_after, self._abort)

    def _abort(self) -> None:
        self.close_timer = None
        if not self.disconnected:
            self.logger.debug("aborting a connection whose client did not answer the close frame")
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a reset, so the kernel drops what it still holds for the client at once
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def shutdown(self) -> None:
        """The server stops: a connection still waiting for a client that does not read is aborted (uvicorn's
        own shutdown would close it gracefully, which waits for that client)."""
        if self.close_sent and not self.disconnected and self.transport.get_write_buffer_size() > 0:
            self.stop_keepalive()
            self._abort()
        else:
            super().shutdown()


def _subprotocol(offered: list[str]) -> str | None:
    return "realtime" if "realtime" in offered else (offered[0] if offered else None)


def _peek(text: str) -> tuple[str | None, str | None]:
    """(type, event_id) of a client message, None where it has none (the session reports malformed ones, and
    refuses one over the codec's size limit without parsing it)."""
    if len(text) > MAX_TEXT_MESSAGE:
        return None, None
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(event, dict):
        return None, None
    etype, eid = event.get("type"), event.get("event_id")
    return (etype if isinstance(etype, str) else None), (eid if isinstance(eid, str) else None)


TURN_EVENTS = ("response.create", "input_audio_buffer.commit")
"""Client events that start a turn; during a drain they are refused (``server_shutting_down``)."""


class Connection:
    """One accepted WebSocket adapted to a Session: the session's events go through a byte-bounded queue to a
    writer task; a client that stops reading is cut off (its session cancelled at once, its transport aborted if
    it does not answer the close frame). During a drain, no new turn reaches the session."""

    def __init__(self, server: StemmeServer, ws: WebSocket) -> None:
        self.server = server
        self.ws = ws
        self.config = server.config
        self.session: Session | None = None
        self.queued = 0
        """Bytes (characters of text) waiting for the writer."""
        self.slow = False
        self.in_speech = False
        """The session's VAD is inside an utterance (speech_started seen, speech_stopped not yet)."""
        self.audio_refused = False
        """During a drain, this utterance was refused: its audio no longer reaches the session."""
        self.finished = asyncio.Event()
        self._queue: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write())
        self._session_closed = False
        self._background: set[asyncio.Task] = set()

    # -- out ----------------------------------------------------------------------------------------------
    def send(self, item: dict[str, Any] | bytes) -> None:
        """The session's send callback (never blocks)."""
        try:
            data = item if isinstance(item, bytes) else encode_event(item)
        except (TypeError, ValueError):  # a bug in an event: logged and skipped, never fatal
            logger.exception("session=%s could not encode an event", self.session.id if self.session else "-")
            return
        self._enqueue(data)
        if isinstance(item, dict):
            self._observe(item)

    def _enqueue(self, data: str | bytes) -> None:
        if self.slow:
            return
        self.queued += len(data)
        if self.queued > self.config.max_outbound_bytes:
            self.slow = True
            self._in_background(self._cut_off())
            return
        self._queue.put_nowait(data)

    async def _write(self) -> None:
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):  # the client is gone
            while (item := await self._queue.get()) is not None:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_text(item)
                self.queued -= len(item)

    async def _cut_off(self) -> None:
        sid = self.session.id if self.session else "-"
        logger.warning("session=%s client too slow: over %d bytes queued; cancelling its work and closing", sid,
                       self.config.max_outbound_bytes)
        self.server.metrics.sessions_rejected.labels("client_too_slow").inc()
        await self._close_session()
        self._writer.cancel()
        while not self._queue.empty():
            self._queue.get_nowait()
        self.queued = 0
        self._close_frame(1008, "client too slow to read")

    def _close_frame(self, code: int, reason: str) -> None:
        ext = self.ws.scope.get("extensions", {}).get(TRANSPORT_EXT)
        if ext is not None:
            ext["close"](code, reason, self.config.slow_reader_abort_s)
        else:  # another ASGI server (a test client): its own close, bounded
            self._in_background(self._bounded_close(code, reason))

    def _in_background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _bounded_close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), self.config.slow_reader_abort_s)

    async def close(self, code: int, reason: str) -> None:
        """What is queued goes out first (for at most CLOSE_FLUSH_S), then the close frame."""
        self._queue.put_nowait(None)
        if not self._writer.done():
            await asyncio.wait({self._writer}, timeout=CLOSE_FLUSH_S)
            self._writer.cancel()
        self._close_frame(code, reason)

    async def refuse(self, code: str, message: str, close_code: int, reason: str) -> None:
        self.server.metrics.sessions_rejected.labels(code).inc()
        self.send({"type": "error", "event_id": new_id("event"), "error": {
            "type": "invalid_request_error" if code == "invalid_api_key" else "server_error", "code": code,
            "message": message}})
        await self.close(close_code, reason)

    # -- the session ----------------------------------------------------------------------------------------
    async def run(self) -> None:
        query = self.ws.query_params
        server = self.server
        session = self.session = Session(
            server.engines, server.stages, self.send, binary_audio=query.get("audio") == "binary",
            beta_names=query.get("event_names") == "beta", metrics=server.metrics,
            max_turn_seconds=self.config.max_turn_s)
        server.sessions.add(session)
        server.connections.add(self)
        server.metrics.sessions_total.inc()
        client = self.ws.client
        logger.info("session=%s connected from %s (binary=%s)", session.id, client.host if client else "?",
                    session.binary_audio)
        close: tuple[int, str] | None = None
        try:
            await session.start()
            close = await self._receive(session)
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            await self._end(session, close)

    async def _receive(self, session: Session) -> tuple[int, str] | None:
        """Messages into the session until the client leaves (None) or a limit closes it (code, reason)."""
        cfg = self.config
        started = last_seen = time.monotonic()
        while True:
            now = time.monotonic()
            left = cfg.max_session_s - (now - started)
            if left <= 0:
                session.error_event("session_expired", f"session reached its maximum of {cfg.max_session_s:.0f} s")
                return 1000, "session expired"
            idle = cfg.idle_timeout_s - (now - last_seen)
            if idle <= 0:
                if session.response is None:
                    session.error_event("idle_timeout", f"no input for {cfg.idle_timeout_s:.0f} s")
                    return 1000, "idle timeout"
                last_seen, idle = now, cfg.idle_timeout_s  # the server is still answering: not idle
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=min(idle, left))
            except asyncio.TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                return None
            last_seen = time.monotonic()
            text, data = message.get("text"), message.get("bytes")
            if self.server.draining and self._refused_in_drain(session, text):
                continue
            if text is not None:
                await session.handle_text(text)
            elif data is not None:
                await session.handle_binary(data)

    async def _close_session(self) -> None:
        if self.session is not None and not self._session_closed:
            self._session_closed = True
            await self.session.close()

    async def _end(self, session: Session, close: tuple[int, str] | None) -> None:
        await self._close_session()
        self.server.sessions.discard(session)
        self.server.connections.discard(self)
        if close is not None:
            await self.close(*close)
        else:  # the client left, or the server closed (drain, slow reader): nothing more to write
            self._writer.cancel()
        logger.info("session=%s closed after %d turns", session.id, session.turns)
        self.finished.set()

    @property
    def busy(self) -> bool:
        """A turn or response of this session is in progress."""
        s = self.session
        return s is not None and not self._session_closed and (s.response is not None or s.active_tasks > 0)

    # -- drain ----------------------------------------------------------------------------------------------
    def on_drain(self, grace_ms: int) -> None:
        """The server drains: tell the client; an utterance in progress will not become a turn."""
        if self.session is None:
            return
        self.session.send({"type": "stemme.draining", "event_id": new_id("event"), "grace_ms": grace_ms})
        if self.in_speech:
            self._refuse_audio_turn()

    def _refused_in_drain(self, session: Session, text: str | None) -> bool:
        """During a drain no new turn starts: response.create and input_audio_buffer.commit are refused, and so is
        audio once speech starts (the VAD would make it a turn). True when the message does not reach the session."""
        etype, eid = _peek(text) if text is not None else ("input_audio_buffer.append", None)
        if etype in TURN_EVENTS:
            self._refuse_turn(eid)
            return True
        if etype == "input_audio_buffer.append":
            return self.audio_refused
        return False

    def _observe(self, event: dict[str, Any]) -> None:
        """Follow the session's VAD in what it sends; during a drain, speech that starts is a turn refused."""
        etype = event.get("type")
        if etype == "input_audio_buffer.speech_started":
            self.in_speech = True
            if self.server.draining:
                self._refuse_audio_turn()
        elif etype == "input_audio_buffer.speech_stopped":
            self.in_speech = False

    def _refuse_audio_turn(self) -> None:
        if self.session is not None:
            self.session.core.turns_refused = True  # speech that ends in audio already sent makes no turn
        if not self.audio_refused:
            self.audio_refused = True
            self._refuse_turn(None)

    def _refuse_turn(self, eid: str | None) -> None:
        metrics = self.server.metrics
        metrics.turns.labels("refused_draining").inc()
        metrics.errors.labels("server_shutting_down").inc()
        logger.info("session=%s turn refused: draining", self.session.id if self.session else "-")
        if self.session is not None:
            self.session.send({"type": "error", "event_id": new_id("event"), "error": {
                "type": "server_error", "code": "server_shutting_down", "event_id": eid,
                "message": "the server is shutting down and starts no new turn: reconnect and send it again"}})


class StemmeServer:
    def __init__(self, engines: Engines, config: ServerConfig | None = None, *, stages: Stages | None = None) -> None:
        self.engines = engines
        self.config = config or ServerConfig()
        self.stages = stages or stages_for(engines.config)
        self.sessions: set[Session] = set()
        self.connections: set[Connection] = set()
        self.ready = False
        """The models are loaded (and warmed up)."""
        self.draining = False
        self.llm_down: str | None = None
        """Why the remote language model does not answer (its last probe); None when it does, or is local."""
        self.rest_in_progress: Callable[[], int] = lambda: 0
        """REST requests being served (streaming/rest.py sets it); a drain waits for them too."""
        self.metrics = Metrics()
        self.stages.asr.on_batch = self.metrics.batch_size.labels("asr").observe
        self.stages.llm.on_batch = self.metrics.batch_size.labels("llm").observe
        self.app = Starlette(routes=self._routes())
        self._uvicorn: uvicorn.Server | None = None
        self._ticker: asyncio.Task | None = None
        self._loading: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None
        self._drain: asyncio.Task | None = None
        self._assets = {p.name for p in WEB_DIR.iterdir() if p.is_file()} if WEB_DIR.is_dir() else set()

    # -- routes ---------------------------------------------------------------------------------------------
    def _routes(self) -> list[BaseRoute]:
        return [
            WebSocketRoute("/v1/realtime", self.realtime), WebSocketRoute("/realtime", self.realtime),
            Route("/healthz", self.healthz), Route("/readyz", self.readyz),
            Route("/metrics", self.metrics_page), Route("/v1/voices", self.voices_page),
            Route("/", self.page), Route("/index.html", self.page), Route("/static/{name}", self.static),
            *self._rest_routes(),
            WebSocketRoute("/{path:path}", self._no_websocket),
        ]

    def _rest_routes(self) -> list[BaseRoute]:
        """The OpenAI REST endpoints of ``streaming/rest.py``, when that module is there."""
        try:
            from stemme.streaming import rest
        except ModuleNotFoundError as e:
            if e.name != "stemme.streaming.rest":
                raise
            return []
        return list(rest.rest_routes(self))

    # -- HTTP -----------------------------------------------------------------------------------------------
    @staticmethod
    def _text(status: int, body: str | bytes, ctype: str = "text/plain; charset=utf-8") -> Response:
        return Response(body, status, headers=_HEADERS, media_type=ctype)

    async def healthz(self, request: Request) -> Response:
        return self._text(200, "ok\n")

    async def readyz(self, request: Request) -> Response:
        if self.draining:
            return self._text(503, json.dumps({"status": "draining"}), "application/json")
        if self.ready and self.llm_down:
            return self._text(503, f"not ready: language model unreachable: {self.llm_down}\n")
        return self._text(200, "ready\n") if self.ready else self._text(503, "not ready\n")

    async def metrics_page(self, request: Request) -> Response:
        if not self._key_ok(request, self.config.api_key, self.config.metrics_key):
            return self._unauthorised()
        return self._text(200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8")

    async def voices_page(self, request: Request) -> Response:
        if not self._key_ok(request, self.config.api_key):
            return self._unauthorised()
        voices = await asyncio.to_thread(self.voices)  # may wait for the speech engine to load: off the loop
        return self._text(200, json.dumps(voices, ensure_ascii=False), "application/json")

    async def page(self, request: Request) -> Response:
        return self._file(WEB_DIR / "index.html")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._assets:
            return self._text(404, "not found\n")
        return self._file(WEB_DIR / name)

    def _file(self, path: Path) -> Response:
        return self._text(200, path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"))

    def _unauthorised(self) -> Response:
        response = self._text(401, "missing or invalid API key: send 'Authorization: Bearer <key>'\n")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def _metrics(self) -> bytes:
        m = self.metrics
        m.sessions_active.set(len(self.sessions))
        m.ready.set(1 if self.ready and not self.llm_down and not self.draining else 0)
        m.draining.set(1 if self.draining else 0)
        m.outbound_bytes.set(sum(c.queued for c in self.connections))
        for name in ("vad", "asr", "llm", "tts"):
            m.queue_depth.labels(name).set(self.stages.depth(name))
            m.model_loaded.labels(name).set(1 if name in self.engines.loaded else 0)
        cache = getattr(self.engines.llm, "prefix_cache", None) if "llm" in self.engines.loaded else None
        if cache is not None:
            m.prefix_cache_bytes.set(cache.size_bytes)
            m.prefix_cache_hits.set(cache.hits)
        return m.render()

    def voices(self) -> dict[str, Any]:
        """Languages and voices this server can speak, for pickers."""
        reg = self.engines.tts.registry
        order = self.engines.config.languages or tuple(dict.fromkeys((*languages.EUROPEAN, *languages.WHISPER)))
        langs = [lang for lang in order if reg.for_language(lang)]
        voices = [{"name": v.name, "language": v.language, "engine": v.engine, "description": v.description,
                   "default": i == 0} for lang in langs for i, v in enumerate(reg.for_language(lang))]
        return {"languages": [{"code": code, "name": languages.NATIVE.get(code, languages.name(code))}
                              for code in langs], "voices": voices}

    @staticmethod
    def _key_ok(conn: HTTPConnection, *keys: str | None) -> bool:
        """The request offers one of ``keys`` (Authorization: Bearer, ?api_key=, or for browsers the
        ``openai-insecure-api-key.<key>`` subprotocol); open when no key is set."""
        wanted = [k for k in keys if k]
        if not wanted:
            return True
        offered: list[str] = []
        auth = conn.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        offered += conn.query_params.getlist("api_key")
        for p in conn.headers.get("Sec-WebSocket-Protocol", "").split(","):
            if p.strip().startswith("openai-insecure-api-key."):
                offered.append(p.strip()[len("openai-insecure-api-key."):])
        return any(hmac.compare_digest(o.encode(), k.encode()) for o in offered for k in wanted)

    def _origin_ok(self, conn: HTTPConnection) -> bool:
        """A browser's WebSocket is accepted from the server's own origin (the page it serves), from localhost,
        or from an origin on the allow-list; any other web page (``Origin: null`` included) is refused, so a
        page the user visits cannot drive a local server. Clients that send no Origin (devices, SDKs) pass."""
        origin = conn.headers.get("Origin")
        if origin is None or origin in self.config.allowed_origins:
            return True
        parts = urlparse(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        return parts.netloc == conn.headers.get("Host", "") or parts.hostname in ("localhost", "127.0.0.1", "::1")

    # -- WebSocket ------------------------------------------------------------------------------------------
    async def realtime(self, ws: WebSocket) -> None:
        if not self._origin_ok(ws):
            logger.info("refused a WebSocket from origin %s", clip(ws.headers.get("Origin", "")))
            await ws.send_denial_response(
                self._text(403, "this origin may not use the service (see --allowed-origins)\n"))
            return
        await ws.accept(subprotocol=_subprotocol(list(ws.scope.get("subprotocols", []))))
        conn = Connection(self, ws)
        refusal = self._refusal(ws)
        if refusal is not None:
            await conn.refuse(*refusal)
        else:
            await conn.run()

    def _refusal(self, ws: WebSocket) -> tuple[str, str, int, str] | None:
        """Why a new session is refused: (error code, message, close code, close reason), or None."""
        if not self._key_ok(ws, self.config.api_key):
            return ("invalid_api_key", "missing or invalid API key: send 'Authorization: Bearer <key>'", 1008,
                    "invalid or missing API key")
        if self.draining:
            return ("server_shutting_down", "the server is shutting down: connect again (another replica)", 1013,
                    "server shutting down")
        if not self.ready:
            return "server_not_ready", "the server is starting; try again shortly", 1013, "server not ready"
        if len(self.sessions) >= self.config.max_sessions:
            return ("server_busy", f"the server is busy ({self.config.max_sessions} sessions); try again later",
                    1013, "server busy")
        return None

    async def _no_websocket(self, ws: WebSocket) -> None:
        await ws.send_denial_response(self._text(404, "no WebSocket endpoint here; use /v1/realtime\n"))

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.config.warmup:
                await loop.run_in_executor(None, warm_up, self.engines,
                                           self.stages.options.tts_batching.max_batch > 1)
            else:
                await loop.run_in_executor(None, self.engines.load_all)
        except Exception:
            logger.exception("loading the models failed")
            raise
        if getattr(getattr(self.engines, "llm", None), "remote", False):
            self.llm_down = await loop.run_in_executor(None, self.engines.llm.probe)
            if self.llm_down:
                logger.warning("language model unreachable: %s", self.llm_down)
            self._probe = asyncio.create_task(self._probe_llm())
        self.ready = True
        logger.info("ready: models loaded")

    async def _probe_llm(self) -> None:
        """Keep ``llm_down`` current for /readyz: a cheap request every few seconds, off the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LLM_PROBE_S)
            down = await loop.run_in_executor(None, self.engines.llm.probe)
            if down and down != self.llm_down:
                logger.warning("language model unreachable: %s", down)
            elif self.llm_down and not down:
                logger.info("language model reachable again")
            self.llm_down = down

    def _uvicorn_config(self) -> uvicorn.Config:
        cfg = self.config
        if bool(cfg.ssl_certfile) != bool(cfg.ssl_keyfile):
            raise ConfigError("TLS needs both a certificate and its key (--ssl-certfile and --ssl-keyfile)")
        return uvicorn.Config(
            self.app, host=cfg.host, port=cfg.port, http="h11", ws=_WebSocketProtocol, lifespan="off",
            ws_max_size=WS_MAX_SIZE, ws_ping_interval=20, ws_ping_timeout=20, log_config=None, access_log=False,
            server_header=False, timeout_graceful_shutdown=int(CLOSE_FLUSH_S), ssl_certfile=cfg.ssl_certfile,
            ssl_keyfile=cfg.ssl_keyfile)

    async def start(self, *, wait_ready: bool = True) -> None:
        """Open the port at once (``/healthz``, ``/readyz``, ``/metrics`` answer while models load), then
        load and warm up the models; sessions are accepted once ``ready``."""
        if not self.config.api_key and not _is_loopback(self.config.host):
            logger.warning("listening on %s without an API key: anyone who reaches this address can use the "
                           "assistant; set --api-key or STEMME_API_KEY", self.config.host)
        # uvicorn logs every WebSocket's path with its query string (where a browser's key may be) at INFO
        logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
        config = self._uvicorn_config()
        config.load()
        server = self._uvicorn = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit:  # uvicorn's answer to a port it cannot bind (logged by uvicorn)
            raise StemmeError(f"cannot listen on {self.config.host}:{self.config.port}") from None
        self._ticker = asyncio.create_task(server.main_loop())  # uvicorn's clock (Date headers)
        self._loading = asyncio.create_task(self._load())
        if wait_ready:
            await self._loading

    @property
    def port(self) -> int:
        assert self._uvicorn is not None, "start() first"
        return int(self._uvicorn.servers[0].sockets[0].getsockname()[1])

    async def drain(self) -> None:
        """Drain, at once: /readyz answers 503 while the port keeps listening, sessions get ``stemme.draining``,
        new sessions and new turns are refused (``server_shutting_down``), responses in progress finish within
        ``shutdown_grace_s`` (then are cancelled with that reason), then every session is closed with 1001.
        A second call waits for the first."""
        if self._drain is None:
            self._drain = asyncio.create_task(self._run_drain())
        await asyncio.shield(self._drain)

    async def _run_drain(self) -> None:
        grace = self.config.shutdown_grace_s
        self.draining = True
        self.metrics.draining.set(1)
        self.metrics.ready.set(0)
        conns = list(self.connections)
        logger.warning("draining: %d sessions; responses in progress get %.0f s", len(conns), grace)
        for c in conns:
            c.on_drain(int(grace * 1000))
        await _until(lambda: not any(c.busy for c in conns) and not self.rest_in_progress(), grace)
        late = [c.session for c in conns if c.busy and c.session is not None and c.session.response is not None]
        for session in late:
            logger.warning("session=%s response still running at the drain's deadline: cancelled", session.id)
            await session.cancel_response("server_shutting_down")
        if late:
            await _until(lambda: all(s.response is None for s in late), CANCEL_WAIT_S)
        conns = list(self.connections)
        await asyncio.gather(*(c.close(1001, "server shutting down") for c in conns))
        await _until(lambda: all(c.finished.is_set() for c in conns), CLOSE_FLUSH_S)
        logger.info("drained")

    async def stop(self) -> None:
        """Drain, close the port, stop the engines' workers and wait for their threads."""
        await self.drain()
        for task in (self._loading, self._probe):
            if task is not None and not task.done():
                task.cancel()
        if self._uvicorn is not None and self._ticker is not None:
            self._uvicorn.should_exit = True
            await self._ticker
            await self._uvicorn.shutdown()
        self.stages.shutdown()


async def _until(done: Any, seconds: float) -> bool:
    """Wait until ``done()`` or ``seconds`` have passed; whether it is done."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _join_engine_threads(seconds: float) -> None:
    """The engines' worker threads (named ``stemme-…``) end once their stages are shut down: wait for them, so
    that none is still inside a native library when the interpreter exits (the process's last server only)."""
    deadline = time.monotonic() + seconds
    for t in threading.enumerate():
        if t.name.startswith("stemme-") and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.warning("engine thread %s still running at exit", t.name)


async def run_server(engines: Engines, config: ServerConfig, *, wyoming: str | None = None,
                     wyoming_opts: dict[str, Any] | None = None) -> None:
    """Serve until SIGINT/SIGTERM: the WebSocket, REST and page port, and Wyoming beside it when ``wyoming`` is
    a URI; both front doors share the engines and one worker per stage."""
    server = StemmeServer(engines, config)
    await server.start(wait_ready=False)
    ws, http = ("wss", "https") if config.ssl_certfile else ("ws", "http")
    print(f"Stemme listening on {ws}://{config.host}:{server.port}/v1/realtime (page: {http}://{config.host}:"
          f"{server.port}/); loading models…", flush=True)
    door = None
    if wyoming:
        from stemme.streaming.wyoming import start_wyoming

        door = await start_wyoming(engines, wyoming, stages=server.stages, **(wyoming_opts or {}))
        print(f"Stemme serving Wyoming on {wyoming}", flush=True)
    await until_signalled()
    await server.drain()  # the WebSocket sessions and REST requests in progress finish; Wyoming still serves
    if door is not None:
        await door.stop()
    await server.stop()
    await asyncio.get_running_loop().run_in_executor(None, _join_engine_threads, ENGINE_JOIN_S)


async def until_signalled() -> None:
    """Return once the process gets SIGINT or SIGTERM (then the caller drains and stops)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def add_serve_parser(sub: Any, engine_args: Any, make_config: Any) -> None:
    env = os.environ.get
    s = sub.add_parser("serve", help="run the real-time voice server")
    s.add_argument("--host", default=env("STEMME_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(env("STEMME_PORT", "8000")))
    s.add_argument("--api-key", default=env("STEMME_API_KEY") or None)
    s.add_argument("--allowed-origins", default=env("STEMME_ALLOWED_ORIGINS", ""),
                   help="comma-separated browser origins allowed besides the server's own and localhost")
    s.add_argument("--metrics-key", default=env("STEMME_METRICS_KEY") or None,
                   help="a key that opens /metrics only (also STEMME_METRICS_KEY)")
    s.add_argument("--no-warmup", action="store_true")
    s.add_argument("--max-sessions", type=int, default=int(env("STEMME_MAX_SESSIONS", "32")))
    s.add_argument("--idle-timeout", type=float, default=float(env("STEMME_IDLE_TIMEOUT", "300")))
    s.add_argument("--max-session-seconds", type=float, default=float(env("STEMME_MAX_SESSION_SECONDS", "3600")))
    s.add_argument("--drain-grace", "--drain-seconds", dest="drain_grace", type=float,
                   default=float(env("STEMME_DRAIN_GRACE_S") or env("STEMME_DRAIN_SECONDS") or "30"),
                   help="on SIGTERM, seconds responses in progress get to finish (also STEMME_DRAIN_GRACE_S)")
    s.add_argument("--ssl-certfile", default=env("STEMME_SSL_CERTFILE") or None,
                   help="PEM certificate: serve https and wss (with --ssl-keyfile; also STEMME_SSL_CERTFILE)")
    s.add_argument("--ssl-keyfile", default=env("STEMME_SSL_KEYFILE") or None,
                   help="PEM private key of --ssl-certfile (also STEMME_SSL_KEYFILE)")
    s.add_argument("--self-signed", action="store_true", default=env("STEMME_SELF_SIGNED") == "1",
                   help="serve https/wss with a self-signed certificate made once and kept in STEMME_HOME/tls "
                        "(LAN demos: browsers allow the microphone only on https or localhost)")
    s.add_argument("--self-signed-host", action="append", default=[], metavar="NAME",
                   help="a name or address the self-signed certificate must also cover (repeatable)")
    from stemme.streaming.wyoming import add_wyoming_arguments

    add_wyoming_arguments(s)
    engine_args(s)

    def cmd(args: argparse.Namespace) -> int:
        cfg: EngineConfig = make_config(args)
        if args.log_level.upper() == "WARNING":
            logging.getLogger().setLevel(logging.INFO)
        from stemme.streaming.wyoming import wyoming_options

        asyncio.run(run_server(Engines(cfg), server_config(args), wyoming=args.wyoming,
                               wyoming_opts=wyoming_options(args)))
        return 0

    s.set_defaults(func=cmd)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The serve command's ServerConfig."""
    if getattr(args, "self_signed", False) and not args.ssl_certfile:
        from stemme.models.packs import stemme_home

        from stemme.tls import self_signed

        wanted = [h for h in (args.host, *args.self_signed_host) if h not in ("0.0.0.0", "::", "")]
        files = self_signed(stemme_home(), wanted)
        args.ssl_certfile, args.ssl_keyfile = str(files.certfile), str(files.keyfile)
    return ServerConfig(
        args.host, args.port, args.api_key, warmup=not args.no_warmup, max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout, max_session_s=args.max_session_seconds, metrics_key=args.metrics_key,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        shutdown_grace_s=args.drain_grace, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
