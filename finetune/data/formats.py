"""Row formats: turn one raw row (any supported shape, renamed columns) into its canonical form.

Canonical forms, by format:
  messages, sharegpt, alpaca -> {"messages": [{"role", "content", ...}, ...]} (+ "tools": [...] when given)
  prompt_completion          -> {"prompt", "completion"} (two strings or two message lists)
  preference                 -> {"prompt", "chosen", "rejected"} (all strings or all message lists)
  text                       -> {"text"}

Everything wrong with a row raises `BadRow` with a short reason (the audit groups rows by it) and
a detail that says how to fix it (shown next to the row's file and line).
"""

from __future__ import annotations

from typing import Any

from finetune.recipe.schema import FORMAT_FIELDS, DatasetSpec

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_call": "assistant"}
OPTIONAL_FIELDS = {"system", "input", "tools"}
CHAT_FORMATS = ("messages", "sharegpt", "alpaca")


class BadRow(Exception):
    """A row that does not fit its format: `reason` groups it in the audit, `detail` explains it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def to_canonical(raw: Any, spec: DatasetSpec) -> dict[str, Any]:
    """The canonical form of one raw row of `spec.format` (see the module docstring)."""
    if not isinstance(raw, dict):
        raise BadRow("not a JSON object", f"each row must be a JSON object, found {type(raw).__name__}")
    fields = {field: _field(raw, field, spec) for field in FORMAT_FIELDS[spec.format]}
    return CONVERTERS[spec.format](fields, spec)


def _field(raw: dict, field: str, spec: DatasetSpec) -> Any:
    column = spec.columns.get(field, field)
    value = raw.get(column)
    if value is None and field not in OPTIONAL_FIELDS:
        renamed = f" (the '{field}' field of format {spec.format})" if column != field else ""
        hint = f"; if it has another name, map it with columns: {{{field}: <column>}}" if column == field else ""
        raise BadRow(
            f"missing field '{column}'",
            f"missing field '{column}'{renamed}; the row has {', '.join(map(repr, sorted(raw))) or 'no fields'}" + hint,
        )
    return value


def _messages(fields: dict, spec: DatasetSpec) -> dict:
    messages = _with_system(_chat(fields["messages"], "messages", spec), fields["system"])
    return _with_tools({"messages": messages}, fields["tools"], spec)


def _sharegpt(fields: dict, spec: DatasetSpec) -> dict:
    turns = _maybe_json(fields["conversations"])
    if isinstance(turns, list):
        turns = [_from_value(turn) for turn in turns]
    messages = _with_system(_chat(turns, "conversations", spec), fields["system"])
    return _with_tools({"messages": messages}, fields["tools"], spec)


def _with_tools(row: dict, tools: Any, spec: DatasetSpec) -> dict:
    """The row's tool schemas (OpenAI style), given to the chat template as `tools`."""
    tools = _maybe_json(tools)
    if tools is None or tools == [] or tools == "[]":
        return row
    column = spec.columns.get("tools", "tools")
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise BadRow("wrong type", f"'{column}' must be a list of tool schemas ({{type: function, function: {{name, "
                                   "description, parameters}}}})")
    return {**row, "tools": tools}


def _from_value(turn: Any) -> Any:
    if isinstance(turn, dict) and "from" in turn and "role" not in turn:
        return {"role": turn["from"], "content": turn.get("value")}
    return turn


def _alpaca(fields: dict, spec: DatasetSpec) -> dict:
    instruction, extra, output = fields["instruction"], fields["input"], fields["output"]
    name = spec.columns.get
    for field, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if value is not None and not isinstance(value, str):
            raise BadRow("wrong type", f"'{name(field, field)}' must be a string, found {type(value).__name__}")
    if not instruction.strip():
        raise BadRow("empty instruction", f"'{name('instruction', 'instruction')}' is empty")
    if not output.strip():
        raise BadRow("empty assistant turn", f"'{name('output', 'output')}' is empty, so nothing is trained")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": _with_system(messages, fields["system"])}


def _prompt_completion(fields: dict, spec: DatasetSpec) -> dict:
    prompt, completion = _maybe_json(fields["prompt"]), _maybe_json(fields["completion"])
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise BadRow("empty assistant turn", "'completion' is empty, so nothing is trained")
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt = _chat(prompt, "prompt", spec, need_assistant=False)
        return {"prompt": prompt, "completion": _chat(completion, "completion", spec)}
    raise BadRow("wrong type", "'prompt' and 'completion' must both be strings or both be lists of messages")


def _preference(fields: dict, spec: DatasetSpec) -> dict:
    values = {key: _maybe_json(fields[key]) for key in ("prompt", "chosen", "rejected")}
    if all(isinstance(v, str) for v in values.values()):
        for key in ("chosen", "rejected"):
            if not values[key].strip():
                raise BadRow("empty assistant turn", f"'{key}' is empty")
        return values
    if all(isinstance(v, list) for v in values.values()):
        return {
            "prompt": _chat(values["prompt"], "prompt", spec, need_assistant=False),
            "chosen": _chat(values["chosen"], "chosen", spec),
            "rejected": _chat(values["rejected"], "rejected", spec),
        }
    raise BadRow("wrong type", "'prompt', 'chosen' and 'rejected' must all be strings or all be lists of messages")


def _text(fields: dict, spec: DatasetSpec) -> dict:
    text, column = fields["text"], spec.columns.get("text", "text")
    if not isinstance(text, str):
        raise BadRow("wrong type", f"'{column}' must be a string, found {type(text).__name__}")
    if not text.strip():
        raise BadRow("empty text", "the text is empty")
    return {"text": text}


CONVERTERS = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "preference": _preference,
    "text": _text,
}


def _maybe_json(value: Any) -> Any:
    """Columns of CSV or Parquet files often hold a message list as JSON text: decode it."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        from finetune.data.sources import parse_json_row

        try:
            return parse_json_row(value)
        except BadRow as bad:
            if bad.reason == "malformed JSON":
                return value  # plain text that happens to start like JSON
            raise
    return value


def _chat(messages: Any, key: str, spec: DatasetSpec, *, need_assistant: bool = True) -> list[dict]:
    """Check a list of messages and map its role names; return {role, content, ...} dicts."""
    messages = _maybe_json(messages)
    if not isinstance(messages, list) or not messages:
        raise BadRow("wrong type", f"'{key}' must be a non-empty list of {{role, content}} objects")
    known = {**(SHAREGPT_ROLES if spec.format == "sharegpt" else {r: r for r in ROLES}), **spec.roles}
    out = [_message(message, f"{key}[{i}]", known, spec) for i, message in enumerate(messages)]
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise BadRow("no assistant turn", f"'{key}' has no assistant turn, so nothing would be trained")
    return out


def _message(message: Any, where: str, known: dict[str, str], spec: DatasetSpec) -> dict:
    """One checked message: a known role; text content, except an assistant turn that only calls tools."""
    if not isinstance(message, dict) or "role" not in message or not ("content" in message or "tool_calls" in message):
        fields = "'from' and 'value'" if spec.format == "sharegpt" else "'role' and 'content'"
        raise BadRow("wrong type", f"{where} must be an object with {fields}")
    role = known.get(message["role"]) if isinstance(message["role"], str) else None
    if role is None:
        raise BadRow(
            "unknown role",
            f"{where} has role {message['role']!r}; known roles: {', '.join(known)}. Map it to the role it plays "
            f"with roles: {{{message['role']}: ROLE}}: tool for tool or function results (never trained), "
            "assistant for the model's own replies (trained), user or system",
        )
    content, calls = message.get("content"), _tool_calls(message.get("tool_calls"), where)
    if not isinstance(content, str) and not (content is None and calls):
        raise BadRow("wrong type", f"{where}.content must be a string, found {type(content).__name__}")
    if calls and role != "assistant":
        raise BadRow("wrong type", f"{where} has tool_calls but role '{role}'; only assistant turns call tools")
    if role == "assistant" and not (content or "").strip() and not calls:
        raise BadRow("empty assistant turn", f"{where} is an empty assistant turn (no text, no tool_calls)")
    extra = {k: v for k, v in message.items() if k not in ("role", "content", "from", "value") and v is not None}
    return {**extra, "role": role, "content": content}


def _tool_calls(calls: Any, where: str) -> list:
    """An assistant turn's tool calls: [{type: function, function: {name, arguments}}] (or [{name, arguments}])."""
    if calls is None:
        return []
    calls = _maybe_json(calls)
    names = [(call.get("function") or call).get("name") if isinstance(call, dict) else None
             for call in (calls if isinstance(calls, list) else [None])]
    if not isinstance(calls, list) or not all(isinstance(name, str) and name for name in names):
        raise BadRow("wrong type", f"{where}.tool_calls must be a list of {{type: function, function: {{name, "
                                   "arguments}}}} objects, each with a function name")
    return calls


def _with_system(messages: list[dict], system: Any) -> list[dict]:
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    if not isinstance(system, str):
        raise BadRow("wrong type", f"'system' must be a string, found {type(system).__name__}")
    if messages[0]["role"] == "system":
        raise BadRow("two system prompts", "the row has a 'system' field and also starts with a system message")
    return [{"role": "system", "content": system}, *messages]
