"""Function calling in the Realtime protocol, sans-I/O: the session's ``tools`` and ``tool_choice``, the
``function_call`` and ``function_call_output`` conversation items, and their rendering as chat-completions
messages for the language model.

Realtime declares a tool flat (``{"type": "function", "name", "description", "parameters"}``); chat-completions
nests it under ``function``. A call the model makes becomes a ``function_call`` item (``call_id``, ``name``,
``arguments`` as JSON text); the client runs it and answers with a ``function_call_output`` item (``call_id``,
``output``) followed by ``response.create``, and the model continues with the result.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from stemme.voice.llm import ToolCall

MAX_TOOLS = 64
MAX_TOOL_JSON = 32 * 1024
"""Bytes of one tool's JSON (its description and parameter schema)."""
MAX_OUTPUT_CHARS = 16 * 1024
"""Characters of one function_call_output (it goes into the prompt)."""
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _item_id() -> str:
    return f"item_{secrets.token_hex(10)}"


class ToolError(ValueError):
    """A malformed tool, tool_choice or function item; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """Check ``tools``; return them in the Realtime shape."""
    if not isinstance(value, list):
        raise ToolError("tools must be a list", "tools")
    if len(value) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools", "tools")
    out = []
    for i, tool in enumerate(value):
        out.append(_tool(tool, f"tools[{i}]"))
    if len({t["name"] for t in out}) != len(out):
        raise ToolError("tool names must be unique", "tools")
    return out


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ToolError("a tool must be an object of type 'function'", param)
    nested = tool.get("function")
    fn: dict[str, Any] = nested if isinstance(nested, dict) else tool  # the chat shape is accepted too
    name, desc, params = fn.get("name"), fn.get("description", ""), fn.get("parameters", {"type": "object"})
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError("a tool name is 1-64 letters, digits, '_' or '-'", f"{param}.name")
    if not isinstance(desc, str):
        raise ToolError("description must be a string", f"{param}.description")
    if not isinstance(params, dict):
        raise ToolError("parameters must be a JSON schema object", f"{param}.parameters")
    out = {"type": "function", "name": name, "description": desc, "parameters": params}
    if len(json.dumps(out, ensure_ascii=False).encode()) > MAX_TOOL_JSON:
        raise ToolError(f"a tool's JSON is limited to {MAX_TOOL_JSON} bytes", param)
    return out


def parse_tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    """``auto``, ``none``, ``required``, or ``{"type": "function", "name": …}`` naming a declared tool."""
    if value in ("auto", "none", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name", (value.get("function") or {}).get("name")
                         if isinstance(value.get("function"), dict) else None)
        if isinstance(name, str) and any(t["name"] == name for t in tools):
            return {"type": "function", "name": name}
        raise ToolError("tool_choice names no declared tool", "tool_choice.name")
    raise ToolError("tool_choice must be auto, none, required or {'type': 'function', 'name': …}", "tool_choice")


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The tools in the chat-completions shape, or None."""
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}}
            for t in tools] or None


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def function_item(item: dict[str, Any]) -> dict[str, Any]:
    """Check a client's ``function_call`` or ``function_call_output`` item; return a normalised copy."""
    item_id = item.get("id") if isinstance(item.get("id"), str) else _item_id()
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= 128:
        raise ToolError("call_id must be a string of 1-128 characters", "item.call_id")
    if item["type"] == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str) or len(output) > MAX_OUTPUT_CHARS:
            raise ToolError(f"output must be a string of at most {MAX_OUTPUT_CHARS} characters", "item.output")
        return {"id": item_id, "object": "realtime.item", "type": "function_call_output", "call_id": call_id,
                "output": output, "status": "completed"}
    name, arguments = item.get("name"), item.get("arguments", "{}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError("name must be a tool name", "item.name")
    if not isinstance(arguments, str) or len(arguments) > MAX_OUTPUT_CHARS:
        raise ToolError("arguments must be JSON text", "item.arguments")
    return call_item(ToolCall(name=name, arguments=arguments, id=call_id), item_id=item_id)


def call_item(call: ToolCall, *, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    """The ``function_call`` conversation item of a call."""
    return {"id": item_id or _item_id(), "object": "realtime.item", "type": "function_call",
            "status": status, "call_id": call.id, "name": call.name, "arguments": call.arguments}


def chat_message(item: dict[str, Any]) -> dict[str, Any] | None:
    """A function item as a chat-completions message (None for other items)."""
    if item.get("type") == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": [{
            "id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}]}
    if item.get("type") == "function_call_output":
        return {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
    return None
