"""The WebSocket server: a thin loop around Session. ``/v1/realtime`` speaks the Realtime API;
``/healthz`` answers plain HTTP. Models load once, before the port opens, and are shared by all sessions."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from stemme.streaming.metrics import Metrics
from stemme.streaming.protocol import encode_event, new_id
from stemme.streaming.session import Session
from stemme.voice import languages
from stemme.voice.llm import Conversation, GenerationOptions
from stemme.voice.pipeline import Stages, stages_for
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from stemme.config import EngineConfig
from stemme.engines import Engines
from stemme.errors import StemmeError
from stemme.logsafe import clip

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"
"""The browser page and its assets, served by this server itself (no CDN: works air-gapped)."""
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".json": "application/json", ".png": "image/png",
          ".svg": "image/svg+xml", ".ico": "image/x-icon"}

LLM_PROBE_S = 5.0
"""How often a remote language model is asked whether it answers (GET /models), for /readyz."""

WS_MAX_SIZE = 16 << 20
"""Frames up to this size reach the session, which answers oversized ones with an error event; beyond it
the connection is closed with 1009."""


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
    """Bytes queued for a client that does not read; beyond, it is disconnected (1008), so a slow reader
    cannot grow the server's memory."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed besides the server's own and localhost, e.g. ``https://app.example.org``."""
    metrics_key: str | None = None
    """A second key that opens /metrics only (for a Prometheus scraper); with api_key set, /metrics and
    /v1/voices need a key. /healthz and /readyz stay open for load balancers."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, responses in progress get this long to finish before sessions are closed (1001)."""


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


class StemmeServer:
    def __init__(self, engines: Engines, config: ServerConfig | None = None, *, stages: Stages | None = None) -> None:
        self.engines = engines
        self.config = config or ServerConfig()
        self.stages = stages or stages_for(engines.config)
        self.sessions: set[Session] = set()
        self._connections: dict[Session, ServerConnection] = {}
        self._server: Any = None
        self.ready = False
        self.llm_down: str | None = None
        """Why the remote language model does not answer (its last probe); None when it does, or is local."""
        self._probe: asyncio.Task | None = None
        self.stopping = False
        self.metrics = Metrics()
        self.stages.asr.on_batch = self.metrics.batch_size.labels("asr").observe
        self.stages.llm.on_batch = self.metrics.batch_size.labels("llm").observe
        self._loading: asyncio.Task | None = None
        self._assets = {p.name for p in WEB_DIR.iterdir() if p.is_file()} if WEB_DIR.is_dir() else set()

    # -- HTTP ---------------------------------------------------------------------------------------------
    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlparse(request.path).path
        if path in ("/v1/realtime", "/realtime"):
            if not self._origin_ok(request):
                logger.info("refused a WebSocket from origin %s", clip(request.headers.get("Origin", "")))
                return connection.respond(403, "this origin may not use the service (see --allowed-origins)\n")
            return None
        if path == "/healthz":
            return connection.respond(200, "ok\n")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return connection.respond(404, "no WebSocket endpoint here; use /v1/realtime\n")
        if path in ("/", "/index.html"):
            return self._file(WEB_DIR / "index.html")
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name in self._assets:
                return self._file(WEB_DIR / name)
        if path == "/v1/voices":
            if not self._key_ok(request, self.config.api_key):
                return self._unauthorised()
            return self._json(self.voices())
        if path == "/readyz":
            if self.ready and self.llm_down:
                return connection.respond(503, f"not ready: language model unreachable: {self.llm_down}\n")
            return connection.respond(200 if self.ready else 503, "ready\n" if self.ready else "not ready\n")
        if path == "/metrics":
            if not self._key_ok(request, self.config.api_key, self.config.metrics_key):
                return self._unauthorised()
            return self._response(200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8")
        return connection.respond(404, "not found\n")

    def _file(self, path: Path) -> Response:
        body = path.read_bytes()
        return self._response(200, body, _TYPES.get(path.suffix, "application/octet-stream"))

    def _json(self, obj: Any) -> Response:
        return self._response(200, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    @staticmethod
    def _response(status: int, body: bytes, ctype: str) -> Response:
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
                           ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:")])
        return Response(status, "OK" if status == 200 else "Error", headers, body)

    def _metrics(self) -> bytes:
        m = self.metrics
        m.sessions_active.set(len(self.sessions))
        m.ready.set(1 if self.ready and not self.llm_down else 0)
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

    def _authorised(self, ws: ServerConnection, query: dict[str, list[str]]) -> bool:
        return ws.request is None or self._key_ok(ws.request, self.config.api_key)

    @staticmethod
    def _key_ok(request: Request, *keys: str | None) -> bool:
        """The request offers one of ``keys`` (Authorization: Bearer, ?api_key=, or for browsers the
        ``openai-insecure-api-key.<key>`` subprotocol); open when no key is set."""
        wanted = [k for k in keys if k]
        if not wanted:
            return True
        offered: list[str] = []
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        offered += parse_qs(urlparse(request.path).query).get("api_key", [])
        for p in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            if p.strip().startswith("openai-insecure-api-key."):
                offered.append(p.strip()[len("openai-insecure-api-key."):])
        return any(hmac.compare_digest(o.encode(), k.encode()) for o in offered for k in wanted)

    def _origin_ok(self, request: Request) -> bool:
        """A browser's WebSocket is accepted from the server's own origin (the page it serves), from localhost,
        or from an origin on the allow-list; any other web page (``Origin: null`` included) is refused, so a
        page the user visits cannot drive a local server. Clients that send no Origin (devices, SDKs) pass."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        if origin in self.config.allowed_origins:
            return True
        parts = urlparse(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        return parts.netloc == request.headers.get("Host", "") or parts.hostname in ("localhost", "127.0.0.1", "::1")

    def _unauthorised(self) -> Response:
        response = self._response(401, b"missing or invalid API key: send 'Authorization: Bearer <key>'\n",
                                  "text/plain; charset=utf-8")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @staticmethod
    def select_subprotocol(ws: ServerConnection, offered: Any) -> Any:
        for p in offered:
            if p == "realtime":
                return p
        return offered[0] if offered else None

    # -- WebSocket ----------------------------------------------------------------------------------------
    async def _refuse(self, ws: ServerConnection, code: str, message: str, close_code: int, reason: str) -> None:
        self.metrics.sessions_rejected.labels(code).inc()
        await ws.send(json.dumps({"type": "error", "event_id": new_id("event"), "error": {
            "type": "invalid_request_error" if code == "invalid_api_key" else "server_error", "code": code,
            "message": message}}))
        await ws.close(close_code, reason)

    async def handler(self, ws: ServerConnection) -> None:
        query = parse_qs(urlparse(ws.request.path).query) if ws.request else {}
        if not self._authorised(ws, query):
            await self._refuse(ws, "invalid_api_key", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               1008, "invalid or missing API key")
            return
        if not self.ready or self.stopping:
            await self._refuse(ws, "server_not_ready", "the server is starting or stopping; try again shortly",
                               1013, "server not ready")
            return
        if len(self.sessions) >= self.config.max_sessions:
            await self._refuse(ws, "server_busy", f"the server is busy ({self.config.max_sessions} sessions); "
                               "try again later", 1013, "server busy")
            return
        out: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        queued = [0]
        slow = asyncio.Event()

        def send(item: dict | bytes) -> None:
            try:
                data = item if isinstance(item, bytes) else encode_event(item)
            except (TypeError, ValueError):  # a bug in an event: logged and skipped, never fatal
                logger.exception("session=%s could not encode an event", session.id)
                return
            queued[0] += len(data)
            if queued[0] > self.config.max_outbound_bytes:
                slow.set()
                return
            out.put_nowait(data)

        session = Session(self.engines, self.stages, send, binary_audio=query.get("audio", [""])[0] == "binary",
                          beta_names=query.get("event_names", [""])[0] == "beta", metrics=self.metrics,
                          max_turn_seconds=self.config.max_turn_s)
        self.sessions.add(session)
        self._connections[session] = ws
        self.metrics.sessions_total.inc()
        logger.info("session=%s connected from %s (binary=%s)", session.id, ws.remote_address, session.binary_audio)

        async def writer() -> None:
            while True:
                item = await out.get()
                if item is None:
                    return
                await ws.send(item)
                queued[0] -= len(item)

        async def watchdog() -> None:
            await slow.wait()
            logger.warning("session=%s client too slow: over %d bytes queued; closing", session.id,
                           self.config.max_outbound_bytes)
            await ws.close(1008, "client too slow to read")

        wtask = asyncio.create_task(writer())
        dtask = asyncio.create_task(watchdog())
        started = time.monotonic()
        last_seen = started
        close: tuple[int, str] | None = None
        try:
            await session.start()
            while True:
                now = time.monotonic()
                left = self.config.max_session_s - (now - started)
                wait = min(self.config.idle_timeout_s - (now - last_seen), left)
                if left <= 0:
                    session.error_event("session_expired", f"session reached its maximum of "
                                        f"{self.config.max_session_s:.0f} s")
                    close = (1000, "session expired")
                    break
                if wait <= 0:
                    if session.response is not None:
                        last_seen = now  # the server is still answering: not idle
                        continue
                    session.error_event("idle_timeout", f"no input for {self.config.idle_timeout_s:.0f} s")
                    close = (1000, "idle timeout")
                    break
                try:
                    message = await asyncio.wait_for(ws.recv(), timeout=wait)
                except asyncio.TimeoutError:
                    continue
                last_seen = time.monotonic()
                if isinstance(message, str):
                    await session.handle_text(message)
                else:
                    await session.handle_binary(message)
        except ConnectionClosed:
            pass
        finally:
            await session.close()
            self.sessions.discard(session)
            self._connections.pop(session, None)
            out.put_nowait(None)
            dtask.cancel()
            try:
                await asyncio.wait_for(wtask, timeout=2)
            except (asyncio.TimeoutError, ConnectionClosed, Exception):  # noqa: BLE001 - the peer is gone
                wtask.cancel()
            if close is not None:
                await ws.close(*close)
            logger.info("session=%s closed after %d turns", session.id, session.turns)

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

    async def start(self, *, wait_ready: bool = True) -> None:
        """Open the port at once (``/healthz``, ``/readyz``, ``/metrics`` answer while models load), then
        load and warm up the models; sessions are accepted once ``ready``."""
        if not self.config.api_key and not _is_loopback(self.config.host):
            logger.warning("listening on %s without an API key: anyone who reaches this address can use the "
                           "assistant; set --api-key or STEMME_API_KEY", self.config.host)
        self._server = await serve(self.handler, self.config.host, self.config.port,
                                   process_request=self.process_request, max_size=WS_MAX_SIZE,
                                   select_subprotocol=self.select_subprotocol, ping_interval=20, ping_timeout=20)
        self._loading = asyncio.create_task(self._load())
        if wait_ready:
            await self._loading

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, let responses in progress finish within the grace period,
        then cancel what is left and close every session with 1001."""
        self.ready = False
        self.stopping = True
        if self._server is not None:
            self._server.close(close_connections=False)
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while any(s.response is not None for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session, ws in list(self._connections.items()):
            await session.close()
            await ws.close(1001, "server shutting down")
        if self._server is not None:
            await self._server.wait_closed()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._probe is not None:
            self._probe.cancel()
        self.stages.shutdown()


async def run_server(engines: Engines, config: ServerConfig) -> None:
    server = StemmeServer(engines, config)
    await server.start(wait_ready=False)
    print(f"Stemme listening on ws://{config.host}:{server.port}/v1/realtime (page: http://{config.host}:"
          f"{server.port}/); loading models…", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def add_serve_parser(sub: Any, engine_args: Any, make_config: Any) -> None:
    import os

    s = sub.add_parser("serve", help="run the real-time voice server")
    s.add_argument("--host", default=os.environ.get("STEMME_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(os.environ.get("STEMME_PORT", "8000")))
    s.add_argument("--api-key", default=os.environ.get("STEMME_API_KEY") or None)
    s.add_argument("--allowed-origins", default=os.environ.get("STEMME_ALLOWED_ORIGINS", ""),
                   help="comma-separated browser origins allowed besides the server's own and localhost")
    s.add_argument("--metrics-key", default=os.environ.get("STEMME_METRICS_KEY") or None,
                   help="a key that opens /metrics only (also STEMME_METRICS_KEY)")
    s.add_argument("--no-warmup", action="store_true")
    s.add_argument("--max-sessions", type=int, default=int(os.environ.get("STEMME_MAX_SESSIONS", "32")))
    s.add_argument("--idle-timeout", type=float, default=float(os.environ.get("STEMME_IDLE_TIMEOUT", "300")))
    s.add_argument("--max-session-seconds", type=float,
                   default=float(os.environ.get("STEMME_MAX_SESSION_SECONDS", "3600")))
    engine_args(s)

    def cmd(args: argparse.Namespace) -> int:
        cfg: EngineConfig = make_config(args)
        if args.log_level.upper() == "WARNING":
            logging.getLogger().setLevel(logging.INFO)
        asyncio.run(run_server(Engines(cfg), ServerConfig(
            args.host, args.port, args.api_key, warmup=not args.no_warmup, max_sessions=args.max_sessions,
            idle_timeout_s=args.idle_timeout, max_session_s=args.max_session_seconds, metrics_key=args.metrics_key,
            allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()))))
        return 0

    s.set_defaults(func=cmd)
