"""One exception tree for Stemme. Each error carries a one-line message fit for a user."""

from __future__ import annotations


class StemmeError(Exception):
    """Base of every error Stemme raises on purpose."""

    code: str = "stemme_error"


class PackError(StemmeError):
    """A model pack is missing, incomplete or corrupted. The message names the package and the fix."""

    code = "model_pack_error"


class ModelLoadError(StemmeError):
    """A model file exists but its engine could not load it."""

    code = "model_load_error"


class ConfigError(StemmeError):
    """A configuration value is invalid."""

    code = "invalid_config"


class AudioFormatError(StemmeError):
    """Audio is not in a supported format."""

    code = "invalid_audio"


class VoiceNotFoundError(StemmeError):
    """No voice is available for the requested language or name."""

    code = "voice_not_found"


class WorkCancelled(StemmeError):
    """Work was cancelled on purpose (barge-in, response.cancel, disconnect). Named so that it never shadows
    ``asyncio.CancelledError``."""

    code = "cancelled"


class PromptTooLongError(StemmeError):
    """A prompt longer than the language model may take (EngineConfig.llm_max_prompt_tokens)."""

    code = "prompt_too_long"


class ProtocolError(StemmeError):
    """A client request that cannot be honoured (malformed, invalid, or not possible in the session's state);
    a front door turns it into its protocol's error event (Realtime: ``error``) and the session goes on.
    ``code`` and ``param`` name what was wrong, ``event_id`` the client event it answers."""

    def __init__(self, message: str, *, code: str = "invalid_request_error", param: str | None = None,
                 event_id: str | None = None, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.event_id = event_id
        self.error_type = error_type
