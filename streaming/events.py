"""The Realtime API's events as typed values: what a client may send (parsed and checked by the codec in
``protocol.py`` before any state changes) and what the server sends (built as values, encoded by the codec).
No sockets, no asyncio, no JSON here.

A server event's wire fields are its dataclass fields, in order, under its ``TYPE``; ``payload()`` gives them
(an event whose wire form differs, such as base64 audio, overrides it).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, ClassVar

JsonObject = dict[str, Any]
"""A JSON object as it goes on the wire (items, the session, a response)."""


# -- client events ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResponseOverrides:
    """The ``response`` object of ``response.create``, checked: what this one response does differently from
    the session's configuration (None: the session's value)."""

    output_modalities: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    voice: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The overrides that are set, under their API names."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ClientEvent:
    """A client event, checked by the codec (types, ranges, sizes); what depends on the session's state (an
    item that must exist, a response in progress) is checked by its handler before anything changes."""

    event_id: str | None


@dataclass(frozen=True)
class SessionUpdate(ClientEvent):
    session: JsonObject
    """The update, applied as a whole or not at all (SessionConfig.apply checks every field on a copy)."""


@dataclass(frozen=True)
class AudioAppend(ClientEvent):
    audio: bytes
    """Audio in the session's input format (decoded from base64, or a binary frame)."""


@dataclass(frozen=True)
class AudioCommit(ClientEvent):
    pass


@dataclass(frozen=True)
class AudioClear(ClientEvent):
    pass


@dataclass(frozen=True)
class ItemCreate(ClientEvent):
    item: JsonObject
    """A normalised copy with an id: a message, a function_call or a function_call_output."""
    previous_item_id: str | None


@dataclass(frozen=True)
class ItemRetrieve(ClientEvent):
    item_id: str


@dataclass(frozen=True)
class ItemDelete(ClientEvent):
    item_id: str


@dataclass(frozen=True)
class ItemTruncate(ClientEvent):
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass(frozen=True)
class ResponseCreate(ClientEvent):
    overrides: ResponseOverrides


@dataclass(frozen=True)
class ResponseCancel(ClientEvent):
    pass


@dataclass(frozen=True)
class OutputAudioClear(ClientEvent):
    pass


# -- server events ---------------------------------------------------------------------------------------------
@dataclass
class ServerEvent:
    TYPE: ClassVar[str] = ""

    def payload(self) -> JsonObject:
        """The event's wire fields in order (shallow: items and objects are sent as they are now). A dataclass
        without slots holds exactly its fields in ``__dict__``, in order; copying it is several times faster
        than ``dataclasses.fields``, and this runs for every event sent."""
        return self.__dict__.copy()


@dataclass
class SessionCreated(ServerEvent):
    TYPE = "session.created"
    session: JsonObject


@dataclass
class SessionUpdated(ServerEvent):
    TYPE = "session.updated"
    session: JsonObject


@dataclass
class InputAudioBufferCleared(ServerEvent):
    TYPE = "input_audio_buffer.cleared"


@dataclass
class InputAudioBufferCommitted(ServerEvent):
    TYPE = "input_audio_buffer.committed"
    previous_item_id: str | None
    item_id: str


@dataclass
class InputSpeechStarted(ServerEvent):
    TYPE = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


@dataclass
class InputSpeechStopped(ServerEvent):
    TYPE = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


@dataclass
class ItemAdded(ServerEvent):
    TYPE = "conversation.item.added"
    previous_item_id: str | None
    item: JsonObject


@dataclass
class ItemDone(ServerEvent):
    TYPE = "conversation.item.done"
    previous_item_id: str | None
    item: JsonObject


@dataclass
class ItemRetrieved(ServerEvent):
    TYPE = "conversation.item.retrieved"
    item: JsonObject


@dataclass
class ItemDeleted(ServerEvent):
    TYPE = "conversation.item.deleted"
    item_id: str


@dataclass
class ItemTruncated(ServerEvent):
    TYPE = "conversation.item.truncated"
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass
class TranscriptionDelta(ServerEvent):
    TYPE = "conversation.item.input_audio_transcription.delta"
    item_id: str
    content_index: int
    delta: str


@dataclass
class TranscriptionCompleted(ServerEvent):
    TYPE = "conversation.item.input_audio_transcription.completed"
    item_id: str
    content_index: int
    transcript: str
    usage: JsonObject
    stemme: JsonObject
    """Stemme's extension: detected language, its probability, ASR milliseconds."""


@dataclass
class TranscriptionFailed(ServerEvent):
    TYPE = "conversation.item.input_audio_transcription.failed"
    item_id: str
    content_index: int
    error: JsonObject


@dataclass
class OutputAudioBufferCleared(ServerEvent):
    TYPE = "output_audio_buffer.cleared"
    response_id: str | None


@dataclass
class ResponseCreated(ServerEvent):
    TYPE = "response.created"
    response: JsonObject


@dataclass
class ResponseDone(ServerEvent):
    TYPE = "response.done"
    response: JsonObject
    stemme: JsonObject
    """Stemme's extension: the turn's latency report."""


@dataclass
class OutputItemAdded(ServerEvent):
    TYPE = "response.output_item.added"
    response_id: str
    output_index: int
    item: JsonObject


@dataclass
class OutputItemDone(ServerEvent):
    TYPE = "response.output_item.done"
    response_id: str
    output_index: int
    item: JsonObject


@dataclass
class ContentEvent(ServerEvent):
    """An event about one content part of a response's output item."""

    response_id: str
    item_id: str
    output_index: int
    content_index: int


@dataclass
class ContentPartAdded(ContentEvent):
    TYPE = "response.content_part.added"
    part: JsonObject


@dataclass
class ContentPartDone(ContentEvent):
    TYPE = "response.content_part.done"
    part: JsonObject


@dataclass
class OutputAudioDelta(ContentEvent):
    TYPE = "response.output_audio.delta"
    audio: bytes
    """24 kHz PCM16; base64 on the wire (``delta``)."""

    def payload(self) -> JsonObject:
        out = super().payload()
        out["delta"] = base64.b64encode(out.pop("audio")).decode()
        return out


@dataclass
class OutputAudioDone(ContentEvent):
    TYPE = "response.output_audio.done"


@dataclass
class OutputAudioTranscriptDelta(ContentEvent):
    TYPE = "response.output_audio_transcript.delta"
    delta: str


@dataclass
class OutputAudioTranscriptDone(ContentEvent):
    TYPE = "response.output_audio_transcript.done"
    transcript: str


@dataclass
class OutputTextDelta(ContentEvent):
    TYPE = "response.output_text.delta"
    delta: str


@dataclass
class OutputTextDone(ContentEvent):
    TYPE = "response.output_text.done"
    text: str


@dataclass
class FunctionCallArgumentsDelta(ServerEvent):
    TYPE = "response.function_call_arguments.delta"
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


@dataclass
class FunctionCallArgumentsDone(ServerEvent):
    TYPE = "response.function_call_arguments.done"
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


@dataclass
class Error(ServerEvent):
    TYPE = "error"
    error: JsonObject
    """type, code, message, param, event_id (the client event it answers)."""


@dataclass
class Draining(ServerEvent):
    TYPE = "stemme.draining"
    grace_ms: int
    """How long responses in progress may still run before the session is closed (1001)."""
