"""A language model behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp's server,
Ollama, TGI, ``transformers serve``), streamed with server-sent events over httpx2: the transport of the
official openai SDK, already in Stemme's dependency tree, with its own SSE parser (docs/remote-llm.md says why
not the SDK itself).

The request is plain chat-completions: the history and the tool definitions pass through as they are. Retries
happen only before the first token; once a token is out, a failure ends the answer with an error. Cancelling
(the ``cancel`` event, or closing the generator) closes the HTTP stream at once, so the server stops
generating. The API key goes into the Authorization header only, never into a message or a log line."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2 as httpx
from stemme.voice.llm import GenerationOptions, ToolCall

from stemme.errors import ConfigError, StemmeError

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 502, 503, 504})
"""Answers worth a retry before the first token: overloaded, or restarting behind a proxy."""


class LlmUnavailableError(StemmeError):
    """The language model endpoint cannot be reached (refused, timed out, overloaded or restarting)."""

    code = "llm_unavailable"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        """A quick failure (refused, reset, HTTP 429/502/503/504) that a retry may get past; a timeout is not
        retried, it has already cost its whole wait."""


class LlmError(StemmeError):
    """The endpoint answered, but not with a usable stream (bad request, wrong key or model, broken stream)."""

    code = "llm_error"


def safe_url(url: str) -> str:
    """The URL without user, password or query: fit for a message or a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class _Partial:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Joins the ``delta.tool_calls`` fragments of a stream into complete calls. Servers send a call either
    whole in one delta (transformers serve, Ollama) or as a name followed by argument pieces (vLLM, OpenAI),
    each fragment tagged with the call's ``index``."""

    def __init__(self) -> None:
        self._calls: dict[int, _Partial] = {}

    def add(self, fragments: list[dict[str, Any]]) -> None:
        for pos, frag in enumerate(fragments):
            index = frag.get("index")
            part = self._calls.setdefault(index if isinstance(index, int) else pos, _Partial())
            part.id = frag.get("id") or part.id
            fn = frag.get("function") or {}
            part.name += fn.get("name") or ""
            args = fn.get("arguments")
            if args is not None:
                part.arguments.append(args if isinstance(args, str) else json.dumps(args))

    def calls(self) -> list[ToolCall]:
        """The complete calls, in index order (an empty argument text becomes ``{}``)."""
        out = []
        for _, part in sorted(self._calls.items()):
            args = "".join(part.arguments) or "{}"
            out.append(ToolCall(part.name, args, part.id) if part.id else ToolCall(part.name, args))
        self._calls.clear()
        return out


def parse_chunk(data: str, tools: ToolCallAssembler) -> tuple[str, bool]:
    """One SSE ``data`` payload: returns (text to speak, finished). Tool-call fragments go to ``tools``."""
    if data.strip() == "[DONE]":
        return "", True
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise LlmError("the language model endpoint sent a malformed stream event") from e
    if not isinstance(obj, dict):
        raise LlmError("the language model endpoint sent a malformed stream event")
    if obj.get("error"):
        err = obj["error"]
        detail = err.get("message") if isinstance(err, dict) else err
        raise LlmError(f"the language model endpoint failed mid-answer: {str(detail)[:200]}")
    text, finished = "", False
    for choice in obj.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or {}
        text += delta.get("content") or ""  # reasoning_content (thinking models) is not spoken
        if delta.get("tool_calls"):
            tools.add(delta["tool_calls"])
        finished = finished or bool(choice.get("finish_reason"))
    return text, finished


class _CancelWatch:
    """One thread per engine that shuts down the socket of a stream whose ``cancel`` is set, so that a read
    blocked on the network (a long prompt, a stalled server) ends at once instead of at the next token."""

    def __init__(self, interval: float = 0.02) -> None:
        self._interval = interval
        self._cond = threading.Condition()
        self._watched: dict[int, tuple[threading.Event, socket.socket]] = {}
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, cancel: threading.Event, sock: socket.socket | None) -> Iterator[None]:
        if sock is None:
            yield
            return
        key = id(sock)
        with self._cond:
            self._watched[key] = (cancel, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stemme-llm-cancel", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._watched.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._watched))
                fired = [k for k, (cancel, _) in self._watched.items() if cancel.is_set()]
                socks = [self._watched.pop(k)[1] for k in fired]
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            time.sleep(self._interval)


def _socket_of(response: httpx.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return sock if isinstance(sock, socket.socket) else None


def _tls_context(url: str) -> ssl.SSLContext | bool:
    if urlsplit(url).scheme != "https":
        return True  # unused
    try:
        return httpx.create_ssl_context()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the CA certificates for {safe_url(url)} (SSL_CERT_FILE, SSL_CERT_DIR): "
                          f"{_reason(e)}") from None


def _reason(e: Exception) -> str:
    return (str(e) or type(e).__name__)[:160]


class RemoteChat:
    """A ChatEngine streaming from an OpenAI-compatible endpoint. ``url`` is the API base (``http://vllm:8000/v1``);
    ``model`` the remote model's name (None: the first one the endpoint lists under ``/models``)."""

    remote = True
    """Its streams run on their own threads (voice/pipeline.py), outside the local scheduler's round and its
    wait for speech synthesis: the model does not use this machine's CPU, and a read blocked on the network
    must not hold up other sessions."""
    device = "remote"

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 connect_timeout: float = 3.0, read_timeout: float = 30.0, retries: int = 2,
                 backoff: float = 0.2) -> None:
        self.url = safe_url(url.rstrip("/"))
        self.name = f"openai-compatible {self.url}"
        self.model = model
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.backoff = backoff
        self._key = api_key or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env=False: no proxy variables, no .netrc credentials, the endpoint is reached directly; TLS is
        # checked against the system's CAs, or SSL_CERT_FILE / SSL_CERT_DIR (an in-house CA)
        self._client = httpx.Client(base_url=url.rstrip("/") + "/", headers=headers, trust_env=False,
                                    verify=_tls_context(url),
                                    timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout))
        self._watch = _CancelWatch()

    def forget(self, conversation: str) -> None:
        """Nothing is kept per conversation here (the remote server manages its own cache)."""

    def close(self) -> None:
        self._client.close()

    def stream(self, messages: list[dict[str, Any]], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[str | ToolCall]:
        options = options or GenerationOptions()
        cancel = cancel or threading.Event()
        body = self._body(messages, options)
        for attempt in range(self.retries + 1):
            started = False
            try:
                with contextlib.closing(self._attempt(body, cancel)) as pieces:
                    for piece in pieces:
                        started = True
                        yield piece
                return
            except LlmUnavailableError as e:
                if started or not e.retryable or attempt == self.retries or cancel.is_set():
                    raise
                delay = self.backoff * 2 ** attempt
                logger.warning("language model: %s; retry %d of %d in %.1f s", e, attempt + 1, self.retries, delay)
                if cancel.wait(delay):
                    return

    def probe(self) -> str | None:
        """None when the endpoint answers ``GET /models`` within the connect timeout, else why not (for
        ``/readyz``). Learns the model's name when none was configured."""
        try:
            r = self._client.get("models", timeout=self.connect_timeout)
        except httpx.TimeoutException:
            return f"no answer from {self.url} within {self.connect_timeout:g} s"
        except httpx.TransportError as e:
            return f"cannot reach {self.url}: {_reason(e)}"
        if r.status_code in (401, 403):
            return f"{self.url} refused the API key (HTTP {r.status_code})"
        if r.status_code >= 500:
            return f"{self.url} answered HTTP {r.status_code}"
        if self.model is None and r.status_code == 200:
            self.model = self._first_model(r)
        return None

    # -- internals ------------------------------------------------------------------------------------------
    def _body(self, messages: list[dict[str, Any]], o: GenerationOptions) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._model_name(), "messages": messages, "stream": True,
                                "max_tokens": o.max_new_tokens, "temperature": o.temperature}
        if o.tools:
            body["tools"] = o.tools
            if o.tool_choice is not None:
                body["tool_choice"] = o.tool_choice
        return body

    def _model_name(self) -> str:
        if self.model is None:
            with self._errors(threading.Event()):
                r = self._client.get("models", timeout=self.connect_timeout)
            if r.status_code != 200:
                raise self._status_error(r)
            self.model = self._first_model(r)
        if self.model is None:
            raise LlmError(f"{self.url} lists no model; set STEMME_LLM_MODEL")
        return self.model

    @staticmethod
    def _first_model(r: httpx.Response) -> str | None:
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, AttributeError):
            return str(r.json()["data"][0]["id"])
        return None

    def _attempt(self, body: dict[str, Any], cancel: threading.Event) -> Generator[str | ToolCall, None, None]:
        """One request: its pieces, then its complete tool calls."""
        request = self._client.build_request("POST", "chat/completions", json=body)
        with self._errors(cancel):
            response = self._client.send(request, stream=True)
            try:
                if response.status_code >= 400:
                    raise self._status_error(response)
                with self._watch.watch(cancel, _socket_of(response)):
                    yield from self._events(response, cancel)
            finally:
                response.close()

    def _events(self, response: httpx.Response, cancel: threading.Event) -> Iterator[str | ToolCall]:
        tools = ToolCallAssembler()
        complete = False
        for sse in httpx.EventSource(response):
            if cancel.is_set():
                return
            text, finished = parse_chunk(sse.data, tools)
            if text:
                yield text
            if finished:
                complete = True
                yield from tools.calls()
        if not complete and not cancel.is_set():  # neither a finish_reason nor [DONE]: the answer was cut
            raise LlmUnavailableError(f"the language model at {self.url} ended its stream mid-answer",
                                      retryable=True)

    @contextlib.contextmanager
    def _errors(self, cancel: threading.Event) -> Iterator[None]:
        """httpx's failures as Stemme's; after a cancel, the closed stream's failure just ends the answer."""
        try:
            yield
        except httpx.SSEError as e:
            raise LlmError(f"{self.url} did not answer with an event stream") from e
        except (httpx.ConnectTimeout, httpx.PoolTimeout):
            raise LlmUnavailableError(f"no connection to the language model at {self.url} within "
                                      f"{self.connect_timeout:g} s") from None
        except httpx.TimeoutException:
            if cancel.is_set():
                return
            raise LlmUnavailableError(f"the language model at {self.url} sent nothing for "
                                      f"{self.read_timeout:g} s") from None
        except httpx.TransportError as e:
            if cancel.is_set():
                return
            raise LlmUnavailableError(f"cannot reach the language model at {self.url}: {_reason(e)}",
                                      retryable=True) from None

    def _status_error(self, response: httpx.Response) -> StemmeError:
        code = response.status_code
        if code in (401, 403):
            return LlmError(f"the language model at {self.url} refused the API key (HTTP {code})")
        detail = self._detail(response)
        if code in RETRY_STATUS:
            return LlmUnavailableError(f"the language model at {self.url} is unavailable (HTTP {code}){detail}",
                                       retryable=True)
        return LlmError(f"the language model at {self.url} rejected the request (HTTP {code}){detail}")

    def _detail(self, response: httpx.Response) -> str:
        """The server's error message, short, with the API key masked should the server echo it."""
        try:
            raw = response.read()[:2000].decode("utf-8", "replace")
        except httpx.HTTPError:
            return ""
        try:
            obj = json.loads(raw)
            err = obj.get("error", obj.get("detail", raw)) if isinstance(obj, dict) else raw
            text = str(err.get("message", err) if isinstance(err, dict) else err)
        except json.JSONDecodeError:
            text = raw
        if self._key:
            text = text.replace(self._key, "***")
        text = " ".join(text.split())[:200]
        return f": {text}" if text else ""
