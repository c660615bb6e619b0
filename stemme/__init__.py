"""Stemme: an on-premise, multilingual, real-time voice assistant.

The data flow is the repository layout: ``voice/`` (mic audio -> VAD -> ASR -> LLM -> TTS -> speaker),
``streaming/`` (the WebSocket protocol and server), ``models/`` (model packs and engine adapters),
``clients/`` (device client, browser page, load tests). They install as ``stemme.voice`` etc.
"""

__version__ = "0.1.0"

from stemme import privacy as _privacy

_privacy.apply()  # before any engine library is imported: no telemetry, no model hub (see stemme/privacy.py)
