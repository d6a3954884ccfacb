"""DeepSeek-V4 chat format (ENCODING.md): prompt encoding, completion parsing, streaming parsing.

``encode_chat(messages, thinking=...)`` renders OpenAI-style message dicts to the prompt text of the official
encoder (ENCODING.md §2); tokenize it with ``dsv4_jax.tokenizer`` (it already starts with the BOS text).
``parse_completion(text, thinking=...)`` turns sampled text (decoded with special tokens kept, EOS included)
into an assistant message (ENCODING.md §3.1); ``CompletionParser`` does the same incrementally (§3.2).

Reasoning modes (ENCODING.md §2.5): ``"none"`` = Non-think (official ``thinking_mode="chat"``), ``"high"`` =
Think High (``"thinking"``, effort None or "high"), ``"max"`` = Think Max (``"thinking"``, effort "max").

On a completion the official parser accepts, the parser returns the same message, with ``errors == []`` when
the completion ends with EOS. It reports errors, and differs, only where the official result is accidental
(tests/test_chat_official.py states each case): a missing EOS, a completion cut inside a tool-call block (only
closed invokes are calls), a ``string="false"`` value that is not JSON (kept as a JSON string), an EOS inside
a tool call (the completion ends at the first EOS). Where the official parser raises, this one still returns a
message and lists the problems in ``errors``; no character is lost: what cannot be parsed as reasoning or as a
tool call is returned verbatim in ``content``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK, THINK_END, USER

THINKING_MODES = ("none", "high", "max")
ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")

# ENCODING.md §2.5: inserted right after BOS in Think Max. The model was trained on this exact text
# (476 characters, ending with a blank line).
THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# ENCODING.md §2.6, with {SCHEMAS} replaced by one JSON object per tool, one per line.
TOOLS_TEMPLATE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing "
    'a "<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
    "</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{SCHEMAS}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

# ENCODING.md §4.
RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

# DSML tags as the official parser matches them (ENCODING.md §3.1): the block opener without its ">", tag
# closers without theirs, and a parameter value read up to "/｜DSML｜parameter" (so it ends with the "<").
TOOL_CALLS_OPEN = f"<{DSML}tool_calls"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"/{DSML}parameter"


class ChatFormatError(ValueError):
    """An unknown reasoning mode or a malformed message list; the message names the problem."""


_MODE_ALIASES = {None: "none", False: "none", True: "high", "chat": "none", "thinking": "high", "xhigh": "max"}


def reasoning_mode(thinking: Any) -> str:
    """``thinking`` as one of :data:`THINKING_MODES`. Also taken: the official encoder's ``thinking_mode`` names
    (``"chat"`` = none, ``"thinking"`` = high), a bool or None (off / high), and the API's ``"xhigh"`` (= max,
    ENCODING.md §2.5)."""
    if isinstance(thinking, str) and thinking in THINKING_MODES:
        return thinking
    mode = _MODE_ALIASES.get(thinking) if thinking is None or isinstance(thinking, (bool, str)) else None
    if mode is None:
        raise ChatFormatError(f"unknown reasoning mode {thinking!r}: expected one of {THINKING_MODES} "
                              "(or 'chat' / 'thinking', True / False / None, 'xhigh')")
    return mode


def _is_thinking(thinking: Any) -> bool:
    return reasoning_mode(thinking) != "none"


def _json(value: Any) -> str:
    """JSON as the official encoder writes it (ENCODING.md §8.4): ``", "`` and ``": "`` separators, key order
    kept, non-ASCII kept raw."""
    return json.dumps(value, ensure_ascii=False)


@dataclasses.dataclass
class _Turn:
    """One rendered turn: a message, or consecutive user/tool messages merged into one user turn (§2.2)."""

    role: str
    msg: Mapping[str, Any]  # the source message; {} for a user turn opened by a tool result
    src: list[int]  # indices, in the full message list, of the messages it was built from
    blocks: list[tuple[str, str, Any]] | None = None  # user turns: (kind, text, tool_call_id)


def _text(m: Mapping[str, Any], i: int, *, optional: bool) -> str:
    c = m.get("content")
    if c is None and optional:
        return ""
    if not isinstance(c, str):
        raise ChatFormatError(f"message {i} ({m['role']}): content must be a string, got {type(c).__name__}")
    return c


def _tool_result_text(m: Mapping[str, Any], i: int) -> str:
    """ENCODING.md §2.3: list-valued tool content is flattened, text parts joined by a blank line. A message
    without ``content`` is an empty result, as in the official encoder (``msg.get("content", "")``)."""
    c = m.get("content", "")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, Mapping) and isinstance(p.get("text", ""), str) for p in c):
        return "\n\n".join(p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
                           for p in c)
    raise ChatFormatError(f"message {i} (tool): content must be a string or a list of content parts "
                          "({'type': 'text', 'text': str}, ...)")


def _validate(messages: Sequence[Mapping[str, Any]], what: str) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"{what} must be a list of message dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"{what}[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{what}[{i}]: unknown role {role!r}, expected one of {ROLES}")
        task = m.get("task")
        if task is not None and (not isinstance(task, str) or task not in TASK_TOKENS):
            raise ChatFormatError(f"{what}[{i}]: unknown task {task!r}, expected one of {tuple(TASK_TOKENS)}")
        if m.get("tools") and role not in ("system", "developer"):
            raise ChatFormatError(f"{what}[{i}]: tools are only rendered on a system or developer message, "
                                  f"not on a {role} message")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatFormatError(f"{what}[{i}]: reasoning_content must be a string, got "
                                  f"{type(reasoning).__name__}")
        if not _is_key(m.get("tool_call_id")):
            raise ChatFormatError(f"{what}[{i}]: tool_call_id must be a string (or another hashable id), got "
                                  f"{type(m.get('tool_call_id')).__name__}")
        calls = m.get("tool_calls")
        if calls is not None and (isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence)):
            raise ChatFormatError(f"{what}[{i}]: tool_calls must be a list of calls, got "
                                  f"{type(calls).__name__}")
        if calls and role != "assistant":
            raise ChatFormatError(f"{what}[{i}]: only assistant messages carry tool_calls")
        for j, c in enumerate(calls or ()):
            fn = c.get("function") if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ChatFormatError(f"{what}[{i}].tool_calls[{j}]: expected {{'type': 'function', "
                                      "'function': {'name': str, 'arguments': str | dict}}")
            if not isinstance(fn.get("arguments"), (str, Mapping)):
                raise ChatFormatError(f"{what}[{i}].tool_calls[{j}]: arguments must be a JSON string or dict")
            if not (_is_key(c.get("id")) and _is_key(fn.get("id"))):
                raise ChatFormatError(f"{what}[{i}].tool_calls[{j}]: a call's id must be a string (or another "
                                      "hashable id)")


def _is_key(value: Any) -> bool:
    """Whether ``value`` can be an id that tool results are matched by (absent, or hashable)."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _merge(full: list[Mapping[str, Any]]) -> list[_Turn]:
    """ENCODING.md §2.2 step 1: tool results and user messages fold into user turns made of blocks."""
    turns: list[_Turn] = []
    for i, m in enumerate(full):
        role = m["role"]
        prev = turns[-1] if turns else None
        if role == "tool":
            block = ("tool_result", _tool_result_text(m, i), m.get("tool_call_id", ""))
            if prev is not None and prev.blocks is not None:
                prev.blocks.append(block)
                prev.src.append(i)
            else:
                turns.append(_Turn("user", {}, [i], [block]))
        elif role == "user":
            # The official encoder reads msg.get("content", ""): no content is "", content None an error.
            block = ("text", _text(m, i, optional=False) if "content" in m else "", None)
            if prev is not None and prev.blocks is not None and not prev.msg.get("task"):
                if m.get("task"):
                    # The official encoder would fold this message into the previous turn and lose its task.
                    raise ChatFormatError(f"message {i}: a user message with a task cannot directly follow a "
                                          "user or tool message (it would be merged and its task dropped)")
                prev.blocks.append(block)
                prev.src.append(i)
            else:
                turns.append(_Turn("user", m, [i], [block]))
        else:
            turns.append(_Turn(role, m, [i]))
    return turns


def _sort_tool_results(turns: list[_Turn]) -> None:
    """ENCODING.md §2.2 step 2: tool results follow the order of the latest assistant tool calls before them
    (unknown ids rank first, the sort is stable, text blocks keep their slots). As in the official encoder, a
    call's id is ``id`` or else ``function.id``, calls without one are not ranked, and a repeated id ranks at
    its last call."""
    order: dict[Any, int] = {}
    for t in turns:
        if t.role == "assistant" and t.msg.get("tool_calls"):
            order = {cid: k for k, c in enumerate(t.msg["tool_calls"])
                     if (cid := c.get("id") or c["function"].get("id", ""))}
        elif t.blocks is not None:
            slots = [k for k, b in enumerate(t.blocks) if b[0] == "tool_result"]
            ranked = sorted((t.blocks[k] for k in slots), key=lambda b: order.get(b[2], 0))
            for k, b in zip(slots, ranked):
                t.blocks[k] = b


def _tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    try:
        schemas = "\n".join(_json(t["function"]) for t in tools)
    except (KeyError, TypeError) as e:
        raise ChatFormatError("tools must be OpenAI dicts {'type': 'function', 'function': {...}}") from e
    return TOOLS_TEMPLATE.replace("{SCHEMAS}", schemas)


def _header_extras(m: Mapping[str, Any]) -> str:
    """Tools and response format appended to a system or developer message (ENCODING.md §2.3, §4)."""
    out = ""
    if m.get("tools"):
        out += "\n\n" + _tools_block(m["tools"])
    if m.get("response_format"):
        try:
            fmt = _json(m["response_format"])
        except (TypeError, ValueError) as e:
            raise ChatFormatError(f"response_format must be JSON-serialisable: {e}") from e
        out += "\n\n" + RESPONSE_FORMAT_HEADER + fmt
    return out


def _parameters(arguments: str | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Top-level (name, value) pairs of a call's arguments (ENCODING.md §2.7). Text that is not JSON becomes
    one string parameter ``arguments`` holding it, as in the official encoder; JSON that is not an object is an
    error there (it has no ``.items()``) and here."""
    if isinstance(arguments, Mapping):
        return list(arguments.items())
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):  # what the official encoder's `except Exception` can meet here
        return [("arguments", arguments)]
    if not isinstance(parsed, dict):
        raise ChatFormatError(f"tool-call arguments must be a JSON object, got {type(parsed).__name__}: "
                              f"{arguments[:80]!r}")
    return list(parsed.items())


def _render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block of an assistant turn (ENCODING.md §2.7), without the blank line before it. String values
    are written raw with ``string="true"``, all others as JSON with ``string="false"``."""
    invokes = []
    for c in tool_calls:
        fn = c["function"]
        params = [
            f'{PARAM_OPEN} name="{k}" string="true">{v}<{PARAM_CLOSE}>' if isinstance(v, str)
            else f'{PARAM_OPEN} name="{k}" string="false">{_json(v)}<{PARAM_CLOSE}>'
            for k, v in _parameters(fn["arguments"])
        ]
        invokes.append(f'{INVOKE_OPEN} name="{fn["name"]}">\n' + "\n".join(params) + f"\n{INVOKE_CLOSE}>")
    return f"{TOOL_CALLS_OPEN}>\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_CLOSE}"


def _with_tools(full: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> tuple[list[dict], bool]:
    """Attach request-level ``tools`` to the first message if it is a system prompt, else to a new empty
    system message in front: the layout of official fixture 1 (ENCODING.md §6.2, SGLang column). Returns the
    list and whether a message was inserted."""
    if full and full[0]["role"] == "system":
        if full[0].get("tools"):
            raise ChatFormatError("tools given both as an argument and on the first system message")
        full[0] = {**full[0], "tools": list(tools)}
        return full, False
    return [{"role": "system", "content": "", "tools": list(tools)}, *full], True


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    thinking: str = "none",
    tools: Sequence[Mapping[str, Any]] | None = None,
    context: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
) -> str:
    """Prompt text of a conversation, byte-identical to the official ``encode_messages`` (ENCODING.md §2).

    messages: OpenAI-style dicts with roles system, user, assistant, tool, developer, latest_reminder and keys
      ``content``, ``reasoning_content``, ``tool_calls`` (``function.arguments`` a JSON string or a dict),
      ``tool_call_id``, ``tools`` and ``response_format`` (system/developer), ``task``, ``wo_eos``.
    thinking: "none" (Non-think), "high" (Think High) or "max" (Think Max), ENCODING.md §2.5 (aliases: see
      :func:`reasoning_mode`).
    tools: request-level tools, attached as in the official fixtures (see ``_with_tools``).
    context: messages already in the KV cache: not rendered (no BOS, no Think-Max prefix), but the merging and
      reasoning-retention decisions see them (ENCODING.md §2.8). They are checked as ``messages`` are, so a
      malformed context message is refused even though the official encoder, which never renders it, passes it.
    drop_thinking: in thinking modes, drop the reasoning of assistant turns before the last user turn, unless
      tools are defined anywhere (ENCODING.md §2.9).

    There is no add-generation-prompt flag (ENCODING.md §2.4): a list ending with a user or tool message ends
    with the generation prompt ``<｜Assistant｜><think>`` (thinking) or ``<｜Assistant｜></think>``; a list
    ending with an assistant message ends with that turn's EOS, or mid-turn with ``wo_eos`` (prefill).
    Returns the prompt text; ``Tokenizer.encode`` of it starts with BOS id 0 unless ``context`` is given.
    """
    thinking = reasoning_mode(thinking)
    think = thinking != "none"
    context = [] if context is None else context
    _validate(context, "context")
    _validate(messages, "messages")
    if not messages:
        raise ChatFormatError("messages is empty: nothing to render")
    full = [dict(m) for m in context] + [dict(m) for m in messages]
    n_ctx = len(context)
    if tools:
        full, inserted = _with_tools(full, tools)
        if inserted and context:
            n_ctx += 1
    turns = _merge(full)
    _sort_tool_results(turns)

    # ENCODING.md §2.2 steps 3-4: tools anywhere force keeping all reasoning. Otherwise, in thinking modes,
    # developer messages before the last user turn are deleted, and so is earlier reasoning (at render time).
    drop = drop_thinking and not any(m.get("tools") for m in full)
    last_user = max((k for k, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)
    if think and drop:
        turns = [t for k, t in enumerate(turns) if not (k < last_user and t.role == "developer")]
        last_user = max((k for k, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)

    out = []
    if n_ctx == 0:
        out.append(BOS)
        if thinking == "max":
            out.append(THINK_MAX_PREFIX)
    for k, t in enumerate(turns):
        if min(t.src) < n_ctx <= max(t.src):
            raise ChatFormatError("the last context message and the first new message merge into one user "
                                  "turn; end the context with an assistant message")
        if t.src[0] < n_ctx:
            continue
        m = t.msg
        if t.role == "system":
            out.append(_text(m, t.src[0], optional=True) + _header_extras(m))
        elif t.role == "developer":
            if not _text(m, t.src[0], optional=True):
                raise ChatFormatError(f"message {t.src[0]} (developer): content must be non-empty")
            out.append(USER + m["content"] + _header_extras(m))
        elif t.role == "user":
            out.append(USER + "\n\n".join(text if kind == "text" else f"<tool_result>{text}</tool_result>"
                                          for kind, text, _ in t.blocks))
        elif t.role == "latest_reminder":
            out.append(LATEST_REMINDER + _text(m, t.src[0], optional=False))
        else:
            # ENCODING.md §2.3: the opening <think> was written by the preceding user turn's transition; the
            # answer to a task has no think part at all.
            after_task = k > 0 and turns[k - 1].msg.get("task")
            if think and not after_task and (not drop or k > last_user):
                out.append((m.get("reasoning_content") or "") + THINK_END)
            out.append(_text(m, t.src[0], optional=True))
            if m.get("tool_calls"):
                out.append("\n\n" + _render_tool_calls(m["tool_calls"]))
            if not m.get("wo_eos"):
                out.append(EOS)

        # ENCODING.md §2.4: a transition comes only before an assistant or latest_reminder turn or at the end.
        if k + 1 < len(turns) and turns[k + 1].role not in ("assistant", "latest_reminder"):
            continue
        task = m.get("task")
        if task:  # ENCODING.md §2.8
            # As in the official encoder, "action" opens the answer on any role, with <think> in the thinking
            # modes even before the last user turn.
            prefix = ASSISTANT + (THINK if think else THINK_END) if task == "action" else ""
            out.append(prefix + TASK_TOKENS[task])
        elif t.role in ("user", "developer"):
            out.append(ASSISTANT + (THINK if think and (not drop or k >= last_user) else THINK_END))
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One output of the streaming parser: ``kind`` "reasoning" or "content" with a ``text`` delta, or
    "tool_call" with a complete ``tool_call`` (OpenAI format, no id), number ``index`` in ``tool_calls``."""

    kind: str
    text: str = ""
    index: int = -1
    tool_call: dict | None = None


@dataclasses.dataclass
class _Block:
    """Parse of a DSML tool-call block ``t`` (text starting at ``<｜DSML｜tool_calls``)."""

    calls: list[dict]
    errors: list[tuple[int, str]]  # (offset in t, message)
    status: str  # "closed", "open" (may still grow) or "failed"
    end: int = 0  # closed: offset just past the closing tag; failed: offset of the unparsed rest


# ENCODING.md §3.1. Python's `$` also accepts one trailing "\n": the blank line of a zero-argument invoke. As in
# the official parser, names may span lines (DOTALL), so that any name the encoder writes reads back.
_HEADER = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
_PARAM = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)
# Tolerated deviations (reported in errors): other whitespace between attributes and tags.
_HEADER_LAX = re.compile(r'^\s*name="(.*?)"\s*>\s*$')
_PARAM_LAX = re.compile(r'^\s+name="(.*?)"\s+string="(true|false)"\s*>(.*?)<$', re.DOTALL)
_SEP_LAX = re.compile(r">\s*")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _first(t: str, markers: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """(offset, marker) of the earliest marker in ``t[start:]``, or None."""
    hits = [(i, mk) for mk in markers if (i := t.find(mk, start)) >= 0]
    return min(hits) if hits else None


def _parse_block(t: str, final: bool) -> _Block:
    """Tool calls of a DSML block, read like the official parser does (ENCODING.md §3.1).

    Stops at the first malformed or cut-off invoke: the complete invokes before it are returned, the rest is
    unparsed (``status="failed"``, ``end`` = its offset; 0 when no call was parsed). With ``final=False`` a
    block that may still grow gives ``status="open"``. An invoke is decided once its closing tag is seen, so
    the calls of a prefix of a block are a prefix of the calls of the block (streaming relies on it).
    """
    calls: list[dict] = []
    errors: list[tuple[int, str]] = []

    def fail(at: int, msg: str) -> _Block:
        errors.append((at, msg))
        if not calls:
            return _Block(calls, errors, "failed", 0)
        # After a parsed call, the ">" and whitespace closing it belong to it.
        skip = _SEP_LAX.match(t, at)
        return _Block(calls, errors, "failed", skip.end() if skip else at)

    def cut(at: int, msg: str) -> _Block:
        return fail(at, msg) if final else _Block(calls, errors, "open")

    def separator(pos: int, end: int, where: str) -> bool:
        """Whether t[pos:end], between two tags, is the official ">\\n" (or tolerated whitespace)."""
        sep = t[pos:end]
        if sep == ">\n":
            return True
        if _SEP_LAX.fullmatch(sep):
            errors.append((pos, f"{where}: expected '>' and one newline, got {sep!r}"))
            return True
        return False

    pos = len(TOOL_CALLS_OPEN)
    while True:
        hit = _first(t, (INVOKE_OPEN, TOOL_CALLS_CLOSE), pos)
        if hit is None:
            if final and calls and (pos == len(t) or _SEP_LAX.fullmatch(t, pos)):
                errors.append((len(t), f"tool-call block cut off: missing {TOOL_CALLS_CLOSE}"))
                return _Block(calls, errors, "failed", len(t))
            return cut(pos, "tool-call block cut off before an invoke or its end")
        at, marker = hit
        if not separator(pos, at, "tool-call block"):
            return fail(pos, f"unexpected text {t[pos:at]!r} in tool-call block")
        if marker == TOOL_CALLS_CLOSE:
            return _Block(calls, errors, "closed", at + len(TOOL_CALLS_CLOSE))

        start, pos = at, at + len(INVOKE_OPEN)
        hit = _first(t, (PARAM_OPEN, INVOKE_CLOSE), pos)
        if hit is None:
            return cut(start, "tool call cut off in its header")
        header = t[pos:hit[0]]
        m = _HEADER.match(header)
        if m is None:
            m = _HEADER_LAX.match(header)
            if m is None:
                return fail(start, f"invoke header format error: {header!r}")
            errors.append((pos, f"invoke header not in the official layout: {header!r}"))
        name = m.group(1)
        params: dict[str, str] = {}
        while hit[1] == PARAM_OPEN:
            pos = hit[0] + len(PARAM_OPEN)
            end = t.find(PARAM_CLOSE, pos)
            if end < 0:
                return cut(start, f"tool call {name!r} cut off in a parameter")
            body = t[pos:end]
            pm = _PARAM.match(body)
            if pm is None:
                pm = _PARAM_LAX.match(body)
                if pm is None:
                    return fail(start, f"parameter format error in tool call {name!r}: {body[:80]!r}")
                errors.append((pos, f"parameter of tool call {name!r} not in the official layout"))
            key, is_string, value = pm.groups()
            if key in params:
                return fail(start, f"duplicate parameter name {key!r} in tool call {name!r}")
            if is_string == "true":
                params[key] = _json(value)
            else:
                try:
                    json.loads(value, parse_constant=_reject_constant)
                    params[key] = value  # pasted verbatim, as the official parser does
                except (ValueError, RecursionError):
                    # The official parser pastes it anyway and returns invalid JSON; keep it as a string.
                    msg = (f"parameter {key!r} of tool call {name!r} is marked string=\"false\" but is not "
                           f"JSON: {value[:80]!r}; kept as a string")
                    errors.append((pos, msg))
                    params[key] = _json(value)
            pos = end + len(PARAM_CLOSE)
            hit = _first(t, (PARAM_OPEN, INVOKE_CLOSE), pos)
            if hit is None:
                return cut(start, f"tool call {name!r} cut off")
            if not separator(pos, hit[0], f"tool call {name!r}"):
                return fail(start, f"unexpected text {t[pos:hit[0]]!r} in tool call {name!r}")
        arguments = "{" + ", ".join(f"{_json(k)}: {v}" for k, v in params.items()) + "}"
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
        pos = hit[0] + len(INVOKE_CLOSE)


class CompletionParser:
    """Streaming parser of one completion: ``feed`` text deltas, then ``finish``.

    ``feed(delta) -> list[StreamEvent]`` emits reasoning and content text as soon as it cannot be the start of
    a marker (``</think>``, a tool-call block, EOS), and each tool call once its invoke is closed.
    ``finish() -> (events, message)`` flushes the rest and returns the message ``parse_completion`` gives for
    the whole text, whatever the split into deltas (ENCODING.md §3.2). ``done`` turns true at EOS.
    """

    def __init__(self, *, thinking: str = "none"):
        self.thinking = _is_thinking(thinking)
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[dict] = []
        self.done = False
        self._state = "reasoning" if self.thinking else "content"  # then "tools", then "eos"
        self._buf = ""  # text received and not yet classified
        self._at = 0  # offset of _buf[0] in the completion
        self._errors: list[tuple[int, str]] = []
        self._content_at = 0  # offset of the content proper (before a tool block), for the stray-token check
        self._content_len = 0
        self._block_sep = ""  # the blank line before the tool-call block ("" if it was missing)
        self._block_at = 0  # offset of the tool-call block
        self._invoke_scan = 0
        self._eos_scan = 0
        self._finished = False

    def feed(self, delta: str) -> list[StreamEvent]:
        """Events made certain by ``delta``."""
        if self._finished:
            raise ValueError("CompletionParser.feed called after finish")
        self._buf += delta
        events: list[StreamEvent] = []
        self._advance(events, final=False)
        return events

    def finish(self) -> tuple[list[StreamEvent], dict]:
        """The remaining events and the parsed message (see ``parse_completion``)."""
        if self._finished:
            raise ValueError("CompletionParser.finish called twice")
        self._finished = True
        events: list[StreamEvent] = []
        self._advance(events, final=True)
        # ENCODING.md §3.1 step 4: reasoning and content must not hold control tokens (kept, but reported).
        checked = [(self.content[:self._content_len], self._content_at, "content")]
        if self.thinking:
            checked.insert(0, (self.reasoning, 0, "reasoning"))
        for text, offset, kind in checked:
            for tok in (BOS, EOS, THINK, THINK_END, DSML):
                if (i := text.find(tok)) >= 0:
                    self._errors.append((offset + i, f"unexpected {tok!r} in {kind}"))
        if not self.done:
            self._errors.append((self._at, "missing EOS: the completion was cut off"))
        self._errors.sort(key=lambda e: e[0])  # stable: the same order for every split of the text
        return events, {
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning,
            "tool_calls": list(self.tool_calls),
            "errors": [f"{msg} (at char {at})" for at, msg in self._errors],
        }

    def _emit(self, events: list[StreamEvent], kind: str, text: str) -> None:
        if text:
            if kind == "reasoning":
                self.reasoning += text
            else:
                self.content += text
            events.append(StreamEvent(kind, text))

    def _take(self, n: int) -> str:
        out, self._buf = self._buf[:n], self._buf[n:]
        self._at += n
        return out

    def _advance(self, events: list[StreamEvent], final: bool) -> None:
        while True:
            if self._state in ("reasoning", "content"):
                if not self._scan_text(events, final):
                    return
            elif self._state == "tools":
                if not self._scan_block(events, final):
                    return
            else:
                # After EOS, where generation stops: any text is kept, verbatim, in content.
                if final and self._buf:
                    self._errors.append((self._at, "text after EOS"))
                    self._emit(events, "content", self._take(len(self._buf)))
                return

    def _scan_text(self, events: list[StreamEvent], final: bool) -> bool:
        """Reasoning or content up to the next marker. Returns whether the state changed."""
        kind = self._state
        markers = ("\n\n" + TOOL_CALLS_OPEN, TOOL_CALLS_OPEN, EOS)
        if kind == "reasoning":
            markers = (THINK_END, *markers)
        hit = _first(self._buf, markers, 0)
        # ENCODING.md §3.2: text that may be the start of a marker waits for the next delta.
        hold = len(self._buf)
        for i in range(max(0, len(self._buf) - max(map(len, markers)) + 1), len(self._buf)):
            if any(mk.startswith(self._buf[i:]) for mk in markers):
                hold = i
                break
        if hit is None or (not final and hold < hit[0]):
            self._emit_text(events, kind, len(self._buf) if final else hold)
            if final and kind == "reasoning":
                self._errors.append((self._at, f"missing {THINK_END}"))
            return False
        at, marker = hit
        self._emit_text(events, kind, at)
        if marker == THINK_END:
            self._take(len(marker))
            self._state = "content"
            self._content_at = self._at
        elif marker == EOS:
            if kind == "reasoning":
                self._errors.append((self._at, f"missing {THINK_END}"))
            self._take(len(marker))
            self.done = True
            self._state = "eos"
        else:
            if kind == "reasoning":
                # vLLM's choice (ENCODING.md §6.2): reasoning ends where the tool calls start.
                self._errors.append((self._at, f"missing {THINK_END} before the tool calls"))
            if marker == TOOL_CALLS_OPEN:
                self._errors.append((self._at, "tool-call block not preceded by a blank line"))
            self._block_sep = self._take(len(marker) - len(TOOL_CALLS_OPEN))
            self._block_at = self._at
            self._state = "tools"
        return True

    def _emit_text(self, events: list[StreamEvent], kind: str, n: int) -> None:
        self._emit(events, kind, self._take(n))
        if kind == "content":
            self._content_len = len(self.content)

    def _scan_block(self, events: list[StreamEvent], final: bool) -> bool:
        """The tool-call block, up to EOS. Returns whether the state changed."""
        eos = self._buf.find(EOS, self._eos_scan)
        self._eos_scan = max(0, len(self._buf) - len(EOS) + 1)
        if eos < 0 and not final:
            if self._buf.find(INVOKE_CLOSE, self._invoke_scan) >= 0:
                self._emit_calls(events, _parse_block(self._buf, final=False).calls)
            self._invoke_scan = max(0, len(self._buf) - len(INVOKE_CLOSE) + 1)
            return False
        text = self._buf if eos < 0 else self._buf[:eos]
        block = _parse_block(text, final=True)
        self._emit_calls(events, block.calls)
        self._errors += [(self._block_at + at, msg) for at, msg in block.errors]
        if block.status == "failed":
            # Nothing is dropped: the unparsed rest goes, verbatim, to content (the whole block, blank line
            # included, when no call could be parsed).
            self._emit(events, "content", (self._block_sep if block.end == 0 else "") + text[block.end:])
        elif block.end < len(text):
            self._errors.append((self._block_at + block.end, "unexpected text after the tool calls"))
            self._emit(events, "content", text[block.end:])
        self._take(len(text))
        if eos >= 0:
            self._take(len(EOS))
            self.done = True
        self._state = "eos"
        return True

    def _emit_calls(self, events: list[StreamEvent], calls: list[dict]) -> None:
        for k in range(len(self.tool_calls), len(calls)):
            self.tool_calls.append(calls[k])
            events.append(StreamEvent("tool_call", index=k, tool_call=calls[k]))


def parse_completion(text: str, *, thinking: str = "none") -> dict:
    """Parse a completion sampled after an ``encode_chat`` prompt (ENCODING.md §3.1).

    text: the completion decoded with special tokens kept, normally ending with EOS.
    thinking: the mode of the prompt ("high" and "max": the completion starts inside the reasoning).
    Returns ``{"role": "assistant", "content": str, "reasoning_content": str, "tool_calls": [{"type":
    "function", "function": {"name": str, "arguments": str (a JSON object)}}], "errors": [str]}``.
    ``errors`` is empty exactly for well-formed completions; otherwise it lists each problem with its offset
    (missing ``</think>`` or EOS, cut-off or malformed tool calls, ``string="false"`` values that are not
    JSON, stray control tokens, text after the tool calls or after EOS), and unparsed text is in ``content``.
    """
    parser = CompletionParser(thinking=thinking)
    parser.feed(text)
    return parser.finish()[1]
