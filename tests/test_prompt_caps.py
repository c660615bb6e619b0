"""Prompt and resource caps (issue #12, finding 4): huge instructions are refused before they reach the shared
language model, a prompt over the token cap fails only its own response, history is trimmed to a budget, and
response.create is rate-limited per session. Socket-free sessions over the real engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from stemme.streaming.protocol import ProtocolError
from stemme.streaming.session import RESPONSES_PER_MINUTE, Session
from stemme.voice.llm import Conversation
from stemme.voice.pipeline import Stages

from tests.conftest import timeout


async def _until(sent: list, kind: str, after: int = 0) -> dict:
    async with asyncio.timeout(timeout(180)):
        while True:
            for e in sent[after:]:
                if isinstance(e, dict) and e.get("type") == kind:
                    return e
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _session(engines) -> AsyncIterator[tuple[Session, list, Stages]]:
    sent: list = []
    stages = Stages()
    s = Session(engines, stages, sent.append)
    try:
        await s.start()
        yield s, sent, stages
    finally:
        await s.close()
        stages.shutdown()


async def test_huge_instructions_are_refused_before_the_model(engines) -> None:
    async with _session(engines) as (s, sent, stages):
        big = "x" * 1_000_000
        await s.handle_text(json.dumps({"type": "session.update", "session": {"instructions": big}}))
        assert sent[-1]["type"] == "error" and sent[-1]["error"]["param"] == "session.instructions"
        await s.handle_text(json.dumps({"type": "response.create", "response": {"instructions": "y" * 64_000}}))
        assert sent[-1]["type"] == "error" and sent[-1]["error"]["param"] == "response.instructions"
        assert stages.llm.depth == 0 and s.response is None  # nothing reached the shared model
        assert s.config.instructions is None


async def test_prompt_over_the_token_cap_fails_only_its_response(engines) -> None:
    async with _session(engines) as (s, sent, _):
        await s.handle_text(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        long = " ".join(f"rule{i} says nothing." for i in range(2500))[:15_900]  # under the characters cap
        await s.handle_text(json.dumps({"type": "response.create", "response": {"instructions": long}}))
        done = await _until(sent, "response.done")
        assert done["response"]["status"] == "failed"
        assert done["response"]["status_details"]["error"]["code"] == "prompt_too_long"
        assert any(e.get("type") == "error" and e["error"]["code"] == "prompt_too_long" for e in sent)
        n = len(sent)
        await s.handle_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}}))
        await s.handle_text(json.dumps({"type": "response.create"}))
        assert (await _until(sent, "response.done", n))["response"]["status"] == "completed"


def test_history_is_trimmed_to_its_budget() -> None:
    conv = Conversation(max_chars=1000)
    for i in range(6):
        conv.add("user", f"question {i} " + "y" * 300)
        conv.add("assistant", f"answer {i}")
    window = conv.window()
    assert sum(len(t["content"]) for t in window) <= 1000
    assert window[0]["role"] == "user" and window[-1]["content"] == "answer 5"


async def test_response_create_is_rate_limited(engines) -> None:
    s = Session(engines, Stages(), [].append)
    for _ in range(RESPONSES_PER_MINUTE):
        s._rate_limit(None)
    with pytest.raises(ProtocolError) as e:
        s._rate_limit(None)
    assert e.value.code == "rate_limit_exceeded"
    s.stages.shutdown()
