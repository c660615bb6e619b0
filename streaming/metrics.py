"""Prometheus metrics of the server (``GET /metrics``). One registry per server instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)

STAGE_KEYS = {
    "end_of_turn": "end_of_turn_ms", "asr": "asr_ms", "llm_first_token": "llm_first_token_ms",
    "tts_first_audio": "tts_first_audio_ms", "voice_to_voice": "voice_to_voice_ms",
}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions_active = Gauge("stemme_sessions_active", "Sessions connected now", registry=r)
        self.sessions_total = Counter("stemme_sessions", "Sessions accepted", registry=r)
        self.sessions_rejected = Counter("stemme_sessions_rejected", "Sessions refused", ["reason"], registry=r)
        self.turns = Counter("stemme_turns", "Responses finished (and turns refused while draining)", ["status"],
                             registry=r)
        self.errors = Counter("stemme_errors", "Error events sent to clients", ["code"], registry=r)
        self.stage_seconds = Histogram("stemme_stage_seconds", "Per-turn latency of each stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.queue_depth = Gauge("stemme_queue_depth", "Jobs waiting for a stage worker", ["stage"], registry=r)
        self.batch_size = Histogram("stemme_batch_size", "Requests of different sessions served by one engine call",
                                    ["stage"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.prefix_cache_bytes = Gauge("stemme_llm_prefix_cache_bytes",
                                        "Key/value caches kept for the next turn of conversations", registry=r)
        self.prefix_cache_hits = Gauge("stemme_llm_prefix_cache_hits", "Turns whose prompt start was cached",
                                       registry=r)
        self.outbound_bytes = Gauge("stemme_outbound_queued_bytes", "Bytes queued to slow clients", registry=r)
        self.model_loaded = Gauge("stemme_model_loaded", "1 when the engine is loaded", ["engine"], registry=r)
        self.ready = Gauge("stemme_ready", "1 when the server accepts sessions", registry=r)
        self.draining = Gauge("stemme_draining", "1 while the server drains (SIGTERM): no new sessions or turns",
                              registry=r)
        self.turns.labels("refused_draining")  # shown at 0: a new turn refused during a drain

    def observe_turn(self, status: str, report: dict) -> None:
        self.turns.labels(status).inc()
        for stage, key in STAGE_KEYS.items():
            v = report.get(key)
            if isinstance(v, (int, float)):
                self.stage_seconds.labels(stage).observe(v / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
