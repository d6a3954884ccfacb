"""Chat encoding and completion parsing (ENCODING.md §2-§5): the worked examples byte for byte and id for id,
round trips on random conversations, malformed completions, streaming equal to one-shot parsing."""

import json

import numpy as np
import pytest

from dsv4_jax.chat import (THINK_MAX_PREFIX, ChatFormatError, CompletionParser, StreamEvent, encode_chat,
                           parse_completion)
from dsv4_jax.tokenizer import BOS, DSML, EOS, THINK, THINK_END, Detokenizer, load_tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
Q = {"role": "user", "content": "What is 2+2?"}

# ENCODING.md §2.6, pasted verbatim (independent of the copy in dsv4_jax.chat).
TOOLS_TEXT = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{SCHEMAS}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
WEATHER_SCHEMA = ('{"name": "get_weather", "description": "Get weather", "parameters": {"type": "object", '
                  '"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
                  '"required": ["city"]}}')


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def fn(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def msg(content="", reasoning="", calls=(), errors=()):
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": list(calls), "errors": list(errors)}


E5 = [
    {**SYSTEM, "tools": [WEATHER]},
    {"role": "user", "content": "Weather in Paris and Rome for 2 days?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need two calls.", "tool_calls": [
        call("c1", "get_weather", '{"city": "Paris", "days": 2}'),
        call("c2", "get_weather", '{"city": "Rome", "days": 2}')]},
    {"role": "tool", "tool_call_id": "c2", "content": "Rome: 25C"},
    {"role": "tool", "tool_call_id": "c1", "content": "Paris: 18C"},
]
E5_BLOCK = ("\n\n<｜DSML｜tool_calls>\n"
            '<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n"
            '<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n"
            "</｜DSML｜tool_calls>")
E5_TEXT = ("<｜begin▁of▁sentence｜>You are a helpful assistant.\n\n"
           + TOOLS_TEXT.replace("{SCHEMAS}", WEATHER_SCHEMA)
           + "<｜User｜>Weather in Paris and Rome for 2 days?<｜Assistant｜><think>Need two calls.</think>"
           + E5_BLOCK
           + "<｜end▁of▁sentence｜><｜User｜><tool_result>Paris: 18C</tool_result>\n\n"
             "<tool_result>Rome: 25C</tool_result><｜Assistant｜><think>")

E6 = ("Need two calls.</think>\n\n<｜DSML｜tool_calls>\n"
      '<｜DSML｜invoke name="get_weather">\n'
      '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
      '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
      "</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
E6_IDS = [50249, 1234, 10699, 16, 128822, 271, 30, 128825, 72461, 4941, 12548, 1018, 30, 128825, 40148,
          5406, 2329, 1281, 1133, 65, 50219, 3816, 30, 128825, 41523, 2329, 1281, 37399, 4, 3418, 1281,
          11476, 3320, 51119, 1718, 128825, 41523, 1018, 30, 128825, 41523, 2329, 1281, 28026, 4, 3418,
          1281, 19836, 3320, 20, 1718, 128825, 41523, 1018, 1718, 128825, 40148, 5406, 1018, 1718, 128825,
          72461, 4941, 12548, 32, 1]
E1_IDS = [0, 3476, 477, 260, 11502, 22896, 16, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804, 128822]
E3_IDS = [0, 77666, 288, 9504, 482, 28, 65174, 8173, 418, 1119, 102810, 23463, 603, 3476, 74366, 366, 1855,
          15146, 295, 782, 6892, 305, 98919, 107029, 270, 3295, 304, 19727, 270, 4798, 4776, 14, 127468,
          5505, 30181, 288, 782, 14188, 2765, 710, 3283, 20829, 14, 9449, 4599, 14, 305, 101818, 21805, 603,
          2700, 19894, 367, 5085, 798, 782, 5221, 111618, 1699, 14, 76323, 1750, 20368, 3132, 14, 5083,
          9235, 14, 305, 23047, 16915, 304, 5261, 16808, 1119, 20539, 344, 3001, 114867, 339, 3476, 477,
          260, 11502, 22896, 16, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804, 128821]
E4_IDS = [0, 3476, 477, 260, 11502, 22896, 16, 128803, 23166, 128804, 128822, 19923, 3, 1, 128803, 3085,
          344, 223, 21, 12, 22, 33, 128804, 128821]


def user(content, **kw):
    return {"role": "user", "content": content, **kw}


def assistant(content, **kw):
    return {"role": "assistant", "content": content, **kw}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_e1_non_think(tok):
    text = encode_chat([SYSTEM, Q], thinking="none")
    assert text == ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?"
                    "<｜Assistant｜></think>")
    assert tok.encode(text) == E1_IDS


def test_e2_think_high(tok):
    text = encode_chat([SYSTEM, Q], thinking="high")
    assert text == ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?"
                    "<｜Assistant｜><think>")
    assert tok.encode(text) == E1_IDS[:-1] + [128821]
    # GOLD case simple_thinking_on.
    text = encode_chat([{"role": "system", "content": "Be helpful."}, user("Hello")], thinking="high")
    assert tok.encode(text) == [0, 7153, 11502, 16, 128803, 19923, 128804, 128821]


def test_e3_think_max(tok):
    text = encode_chat([SYSTEM, Q], thinking="max")
    assert text == (
        "<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be "
        "very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
        "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
        "scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate "
        "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
        "unchecked.\n\nYou are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>")
    assert tok.encode(text) == E3_IDS
    assert len(THINK_MAX_PREFIX) == 476 and len(tok.encode(THINK_MAX_PREFIX)) == 79
    no_system = encode_chat([user("Hi")], thinking="max")
    assert no_system == BOS + THINK_MAX_PREFIX + "<｜User｜>Hi<｜Assistant｜><think>"
    assert no_system.endswith("unchecked.\n\n<｜User｜>Hi<｜Assistant｜><think>")


def test_e4_earlier_reasoning_dropped_without_tools(tok):
    messages = [SYSTEM, user("Hi"), assistant("Hello!", reasoning_content="Greet back."),
                user("What is 3*4?")]
    head = "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hi<｜Assistant｜>"
    tail = "Hello!<｜end▁of▁sentence｜><｜User｜>What is 3*4?<｜Assistant｜>"
    text = encode_chat(messages, thinking="high")
    assert text == head + "</think>" + tail + "<think>"
    assert tok.encode(text) == E4_IDS
    kept = encode_chat(messages, thinking="high", drop_thinking=False)
    assert kept == head + "<think>Greet back.</think>" + tail + "<think>"
    assert encode_chat(messages, thinking="none") == head + "</think>" + tail + "</think>"


def test_fixture_2_layout():
    """Official fixture 2: the final assistant turn (after the last user turn) keeps its reasoning."""
    messages = [SYSTEM, user("Hello"),
                assistant("Hi there! How can I help you?", reasoning_content="The user said hello. Greet."),
                user("What is the capital of France?"),
                assistant("The capital of France is Paris.",
                          reasoning_content="The user asks about the capital of France. It is Paris.")]
    assert encode_chat(messages, thinking="high") == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>Hi there! "
        "How can I help you?<｜end▁of▁sentence｜><｜User｜>What is the capital of France?"
        "<｜Assistant｜><think>"
        "The user asks about the capital of France. It is Paris.</think>The capital of France is Paris."
        "<｜end▁of▁sentence｜>")


def test_e5_tools_parallel_calls_results_reordered(tok):
    assert encode_chat(E5, thinking="high") == E5_TEXT
    assert encode_chat(E5, thinking="max") == E5_TEXT.replace(BOS, BOS + THINK_MAX_PREFIX)
    chat = E5_TEXT.replace("<think>Need two calls.</think>", "</think>")[:-len(THINK)] + THINK_END
    assert encode_chat(E5, thinking="none") == chat
    more = [*E5, assistant("Paris 18C, Rome 25C.", reasoning_content="Summarize."), user("Thanks")]
    assert encode_chat(more, thinking="high") == E5_TEXT + (
        "Summarize.</think>Paris 18C, Rome 25C.<｜end▁of▁sentence｜><｜User｜>Thanks<｜Assistant｜><think>")
    # Request-level tools land where the fixtures put them; with no system prompt an empty one is added.
    assert encode_chat([SYSTEM, *E5[1:]], thinking="high", tools=[WEATHER]) == E5_TEXT
    empty = encode_chat([user("Hi")], thinking="high", tools=[WEATHER])
    assert empty.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n\nYou have access")
    assert tok.encode(empty)[:5] == [0, 271, 372, 27193, 271]


def test_fixture_1_tail():
    """Official fixture 1's shape: a tool result, then a final answer with its reasoning (tools present)."""
    reasoning = "The user wants to know the weather in Beijing. I should use the get_weather tool."
    answer = "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity."
    messages = [{**SYSTEM, "tools": [WEATHER]}, user("Weather in Beijing?"),
                assistant("", reasoning_content=reasoning,
                          tool_calls=[call("call_1", "get_weather",
                                           '{"location": "Beijing", "unit": "celsius"}')]),
                {"role": "tool", "tool_call_id": "call_1",
                 "content": '{"temperature": 22, "condition": "sunny", "humidity": 45}'},
                assistant(answer, reasoning_content="Got the weather data. Let me format a nice response.")]
    text = encode_chat(messages, thinking="high")
    assert text.endswith(
        '<｜User｜><tool_result>{"temperature": 22, "condition": "sunny", "humidity": 45}</tool_result>'
        "<｜Assistant｜><think>Got the weather data. Let me format a nice response.</think>" + answer + EOS)
    assert (f"<think>{reasoning}</think>\n\n<｜DSML｜tool_calls>\n"
            '<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>\n') in text


def test_e6_parse_tool_call(tok):
    assert tok.encode(E6) == E6_IDS
    assert tok.decode(E6_IDS) == E6
    assert parse_completion(E6, thinking="high") == msg(
        reasoning="Need two calls.", calls=[fn("get_weather", '{"city": "Paris", "days": 2}')])


def test_e7_argument_rendering():
    args = {"s": 'a"b<c>', "n": 1.5, "b": True, "nul": None, "arr": [1, "x"], "obj": {"k": "v"},
            "uni": "日本"}
    lines = ('<｜DSML｜parameter name="s" string="true">a"b<c></｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="n" string="false">1.5</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="b" string="false">true</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="nul" string="false">null</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="arr" string="false">[1, "x"]</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="obj" string="false">{"k": "v"}</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="uni" string="true">日本</｜DSML｜parameter>\n')
    compact = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    for arguments in (args, json.dumps(args), compact):
        text = encode_chat([user("x"), assistant(None, tool_calls=[call("1", "f", arguments)])])
        assert '<｜DSML｜invoke name="f">\n' + lines + "</｜DSML｜invoke>" in text
    assert encode_chat([user("x"), assistant(None, tool_calls=[call("1", "f", "{}")])]) == (
        "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">'
        "\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    text = encode_chat([user("x"), assistant(None, tool_calls=[call("1", "f", "not json")])])
    assert ('<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="arguments" string="true">not json</｜DSML｜parameter>\n') in text


def test_e8_response_format_tasks_reminder():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    text = encode_chat([{"role": "system", "content": "Be terse.", "response_format": schema}, user("Hi")])
    assert text == ("<｜begin▁of▁sentence｜>Be terse.\n\n## Response Format:\n\nYou MUST strictly adhere to "
                    'the following schema to reply:\n{"type": "object", "properties": {"answer": {"type": '
                    '"string"}}}<｜User｜>Hi<｜Assistant｜></think>')
    assert encode_chat([user("Hi", task="query")]) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜query｜>"
    assert encode_chat([user("Hi", task="action")], thinking="high") == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think><｜action｜>")
    fixture_4 = [{"role": "system", "content": "S"},
                 {"role": "latest_reminder", "content": "2024-11-15,上海市,App,中文"},
                 user("热海大滚锅是世界著名温泉吗"), assistant("{long answer}"),
                 user("世界著名温泉有哪些", task="action"), assistant("Search")]
    assert encode_chat(fixture_4) == (
        "<｜begin▁of▁sentence｜>S<｜latest_reminder｜>2024-11-15,上海市,App,中文<｜User｜>"
        "热海大滚锅是世界著名温泉吗<｜Assistant｜></think>{long answer}<｜end▁of▁sentence｜><｜User｜>"
        "世界著名温泉有哪些<｜Assistant｜></think><｜action｜>Search<｜end▁of▁sentence｜>")
    title = [user("Hi"), assistant("Hello!", task="title"), assistant("Greeting")]
    assert encode_chat(title, thinking="high") == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think></think>Hello!<｜end▁of▁sentence｜>"
        "<｜title｜>Greeting<｜end▁of▁sentence｜>")


def test_merging_transitions_and_quirks():
    """ENCODING.md §2.2-§2.4: merged user turns, list-valued tool content, prefill, trailing system text, the
    reminder-after-user quirk, extra keys of a tool's function object."""
    assert encode_chat([user("A"), user("B")]) == (
        "<｜begin▁of▁sentence｜><｜User｜>A\n\nB<｜Assistant｜></think>")
    calls = [user("q"), assistant(None, tool_calls=[call("1", "f", "{}")])]
    result = {"role": "tool", "tool_call_id": "1", "content": "R"}
    assert encode_chat([*calls, result, user("and?")]).endswith(
        "<｜User｜><tool_result>R</tool_result>\n\nand?<｜Assistant｜></think>")
    parts = {**result, "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}
    assert encode_chat([*calls, parts]).endswith(
        "<｜User｜><tool_result>a\n\n[Unsupported image_url]</tool_result><｜Assistant｜></think>")
    assert encode_chat([user("Hi"), assistant("Sure, ", wo_eos=True)]) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Sure, ")
    assert encode_chat([user("Hi"), {"role": "system", "content": "S"}]) == (
        "<｜begin▁of▁sentence｜><｜User｜>HiS")
    assert encode_chat([user("Hi"), {"role": "latest_reminder", "content": "R"}], thinking="high") == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think><｜latest_reminder｜>R")
    strict = {"type": "function", "function": {"name": "f", "parameters": {}, "strict": True}}
    assert '\n{"name": "f", "parameters": {}, "strict": true}\n' in encode_chat([user("x")], tools=[strict])


def test_developer_messages_and_context():
    """Thinking without tools deletes developer messages before the last user turn (chat keeps them);
    context messages are not rendered: no BOS, no Think-Max prefix (ENCODING.md §2.2, §2.8)."""
    convo = [{"role": "developer", "content": "D"}, user("U1"), assistant("A1"), user("U2")]
    assert encode_chat(convo, thinking="high") == (
        "<｜begin▁of▁sentence｜><｜User｜>U1<｜Assistant｜></think>A1<｜end▁of▁sentence｜><｜User｜>U2"
        "<｜Assistant｜><think>")
    assert encode_chat(convo).startswith(
        "<｜begin▁of▁sentence｜><｜User｜>D<｜User｜>U1<｜Assistant｜></think>A1")
    assert encode_chat(convo[:1], thinking="high") == (
        "<｜begin▁of▁sentence｜><｜User｜>D<｜Assistant｜><think>")
    formatted = {"role": "developer", "content": "D", "response_format": {"type": "object"}}
    assert encode_chat([formatted]) == (
        "<｜begin▁of▁sentence｜><｜User｜>D\n\n## Response Format:\n\nYou MUST strictly adhere to the "
        'following schema to reply:\n{"type": "object"}<｜Assistant｜></think>')
    for mode in ("high", "max"):
        assert encode_chat([user("Q2")], thinking=mode, context=[user("Q1"), assistant("A1")]) == (
            "<｜User｜>Q2<｜Assistant｜><think>")


@pytest.mark.parametrize("messages, kwargs, match", [
    ([Q], {"thinking": "low"}, "unknown reasoning mode 'low'"),
    ([Q], {"thinking": "medium"}, "unknown reasoning mode"),
    ([], {}, "messages is empty"),
    (Q, {}, "must be a list of message dicts"),
    (["hi"], {}, r"messages\[0\] must be a dict"),
    ([{"content": "x"}], {}, "unknown role None"),
    ([{"role": "bot", "content": "x"}], {}, "unknown role 'bot'"),
    ([user(None)], {}, r"message 0 \(user\): content must be a string"),
    ([user([{"type": "text", "text": "x"}])], {}, "content must be a string"),
    ([user("x", task="summarize")], {}, "unknown task 'summarize'"),
    ([Q, assistant(None, tool_calls=[{"name": "f"}])], {}, r"messages\[1\].tool_calls\[0\]"),
    ([Q, assistant(None, tool_calls=[call("1", "f", None)])], {}, "arguments must be a JSON string"),
    ([{"role": "developer", "content": ""}], {}, "developer.*non-empty"),
    ([user("x", tools=[WEATHER])], {}, "tools are only rendered on a system"),
    ([{"role": "system", "content": "s", "tools": [{"name": "f"}]}, Q], {}, "OpenAI dicts"),
    ([{**SYSTEM, "tools": [WEATHER]}, Q], {"tools": [WEATHER]}, "tools given both"),
    ([Q, user("x", task="action")], {}, "task cannot directly follow"),
    ([user("more")], {"context": [Q]}, "merge into one user turn"),
    # wrong types the official encoder pastes in as text or trips over: a clear error, not a TypeError
    ([Q, assistant("A", reasoning_content={"a": 1})], {"thinking": "high"}, "reasoning_content must be a string"),
    ([{"role": "tool", "tool_call_id": {}, "content": "r"}], {}, "tool_call_id must be a string"),
    ([user("x", task=["action"])], {}, r"unknown task \['action'\]"),
    ([Q, assistant("A", tool_calls=True)], {}, "tool_calls must be a list of calls, got bool"),
    ([Q, assistant(None, tool_calls=[{**call("1", "f", "{}"), "id": ["1"]}])], {}, "a call's id must be a string"),
    ([Q, {"role": "tool", "content": [{"type": "text", "text": None}]}], {}, "list of content parts"),
    ([{**SYSTEM, "response_format": b"x"}, Q], {}, "response_format must be JSON-serialisable"),
])
def test_malformed_messages_raise(messages, kwargs, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_chat(messages, **kwargs)


def param(name, value, string="true"):
    return f'<{DSML}parameter name="{name}" string="{string}">{value}</{DSML}parameter>'


def block(*invokes, close=True):
    """A DSML tool-call block in the official layout; each invoke is (name, [parameter lines])."""
    body = "\n".join(f'<{DSML}invoke name="{n}">\n' + "\n".join(ps) + f"\n</{DSML}invoke>"
                     for n, ps in invokes)
    return f"\n\n<{DSML}tool_calls>\n{body}" + (f"\n</{DSML}tool_calls>" if close else "")


BLOCK = block(("get_weather", [param("city", "Paris")]))
SWAPPED = BLOCK.replace('name="city" string="true"', 'string="true" name="city"')
DUPLICATE = block(("get_weather", [param("city", "Paris"), param("city", "Rome")]))
PARIS = fn("get_weather", '{"city": "Paris"}')
TWO = block(("a", [param("x", "1", "false")]), ("b", [param("y", "long text")]))
TWO_CUT = TWO[:TWO.index("long text") + len("long te")]
BAD_JSON = block(("f", [param("a", "[1,", "false"), param("b", "NaN", "false")]))
NOISE = f"\n\n<{DSML}tool_calls>\nnoise" + block(("f", []))[len(f"\n\n<{DSML}tool_calls>\n"):]
NOT_JSON = "is marked string=\"false\" but is not JSON"

PARSE_CASES = [
    # The results of the official parser listed in ENCODING.md §3.1; where it raises, errors say why.
    ("Simple arithmetic.</think>2 + 2 = 4." + EOS, "high", msg("2 + 2 = 4.", "Simple arithmetic.")),
    ("</think>Hi" + EOS, "high", msg("Hi")),
    ("</think>Hi" + EOS, "none", msg("</think>Hi", errors=["unexpected '</think>' in content (at char 0)"])),
    ("Hello", "none", msg("Hello", errors=["missing EOS: the completion was cut off (at char 5)"])),
    ("thinking..." + EOS, "max", msg(reasoning="thinking...", errors=["missing </think> (at char 11)"])),
    ("I need the weather." + BLOCK + EOS, "high",
     msg(reasoning="I need the weather.", calls=[PARIS],
         errors=["missing </think> before the tool calls (at char 19)"])),
    ("Let me check." + BLOCK + EOS, "none", msg("Let me check.", calls=[PARIS])),
    ("Let me check." + BLOCK, "none",
     msg("Let me check.", calls=[PARIS], errors=["missing EOS: the completion was cut off (at char 170)"])),
    ("Let me check." + BLOCK + "more" + EOS, "none",
     msg("Let me check.more", calls=[PARIS], errors=["unexpected text after the tool calls (at char 170)"])),
    ("x" + SWAPPED + EOS, "none",
     msg("x" + SWAPPED, errors=[("parameter format error in tool call 'get_weather': "
                                 "' string=\"true\" name=\"city\">Paris<' (at char 22)")])),
    ("x" + DUPLICATE + EOS, "none",
     msg("x" + DUPLICATE,
         errors=["duplicate parameter name 'city' in tool call 'get_weather' (at char 22)"])),
    (block(("f", [param("s", 'a\n"b"\\c\n')])) + EOS, "none",
     msg(calls=[fn("f", '{"s": "a\\n\\"b\\"\\\\c\\n"}')])),
    # Cut-off DSML: the complete invokes are kept, the rest is returned verbatim in content.
    ("ok" + TWO_CUT, "none",
     msg("ok" + TWO_CUT[TWO_CUT.index(f'<{DSML}invoke name="b">'):], calls=[fn("a", '{"x": 1}')],
         errors=["tool call 'b' cut off in a parameter (at char 124)",
                 "missing EOS: the completion was cut off (at char 195)"])),
    ("ok" + BLOCK[:40], "none",
     msg("ok" + BLOCK[:40], errors=["tool call cut off in its header (at char 23)",
                                    "missing EOS: the completion was cut off (at char 42)"])),
    ("ok" + BLOCK[:-20], "none",
     msg("ok", calls=[PARIS], errors=[f"tool-call block cut off: missing </{DSML}tool_calls> (at char 139)",
                                      "missing EOS: the completion was cut off (at char 139)"])),
    # A string="false" value that is not JSON is kept as a string, so that the arguments stay JSON.
    (BAD_JSON + EOS, "none",
     msg(calls=[fn("f", '{"a": "[1,", "b": "NaN"}')],
         errors=[f"parameter 'a' of tool call 'f' {NOT_JSON}: '[1,'; kept as a string (at char 61)",
                 f"parameter 'b' of tool call 'f' {NOT_JSON}: 'NaN'; kept as a string (at char 124)"])),
    # Stray tags stay where they are and are reported.
    ("Sure <think>x</think> done" + EOS, "none",
     msg("Sure <think>x</think> done", errors=["unexpected '<think>' in content (at char 5)",
                                              "unexpected '</think>' in content (at char 13)"])),
    ("<think>r</think>c" + EOS, "high",
     msg("c", "<think>r", errors=["unexpected '<think>' in reasoning (at char 0)"])),
    (f"a</{DSML}invoke>b" + EOS, "none",
     msg(f"a</{DSML}invoke>b", errors=[f"unexpected '{DSML}' in content (at char 3)"])),
    ("a" + BLOCK[2:] + EOS, "none",
     msg("a", calls=[PARIS], errors=["tool-call block not preceded by a blank line (at char 1)"])),
    ("a" + EOS + "junk", "none", msg("ajunk", errors=["text after EOS (at char 20)"])),
    ("r</think>c" + EOS + EOS, "high", msg("c" + EOS, "r", errors=["text after EOS (at char 29)"])),
    ("a" + BLOCK.replace(f'">\n<{DSML}param', f'"> \n  <{DSML}param') + EOS, "none",
     msg("a", calls=[PARIS], errors=[("invoke header not in the official layout: "
                                      "' name=\"get_weather\"> \\n  ' (at char 35)")])),
    (NOISE + EOS, "none", msg(NOISE, errors=["unexpected text '>\\nnoise' in tool-call block (at char 19)"])),
]


@pytest.mark.parametrize("text, thinking, expected", PARSE_CASES)
def test_parse_completion(text, thinking, expected):
    assert parse_completion(text, thinking=thinking) == expected


def test_parse_never_drops_text():
    """No character is lost: without parsed tool calls, reasoning + content is the text minus its markers."""
    for text, thinking, expected in PARSE_CASES:
        if not expected["tool_calls"]:
            plain = text.replace(EOS, "", 1)
            if thinking != "none":
                plain = plain.replace(THINK_END, "", 1)
            assert expected["reasoning_content"] + expected["content"] == plain


def test_parse_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown reasoning mode 'think'"):
        parse_completion("x", thinking="think")


def stream(chunks, thinking):
    """Feed ``chunks`` to a CompletionParser; check that its events add up to its message; return both."""
    p = CompletionParser(thinking=thinking)
    events = [e for c in chunks for e in p.feed(c)]
    tail, message = p.finish()
    events += tail
    assert "".join(e.text for e in events if e.kind == "reasoning") == message["reasoning_content"]
    assert "".join(e.text for e in events if e.kind == "content") == message["content"]
    calls = [(e.index, e.tool_call) for e in events if e.kind == "tool_call"]
    assert calls == list(enumerate(message["tool_calls"]))
    return message, events


STREAM_CASES = [(E6, "high"), ("Hi <b>there</b>.\n\nLet me check." + E5_BLOCK + EOS, "none"),
                *(case[:2] for case in PARSE_CASES)]


@pytest.mark.parametrize("text, thinking", STREAM_CASES)
def test_streaming_equals_one_shot_for_every_split(text, thinking):
    """The streamed message equals parse_completion for every split in two (inside tags too), character by
    character, and for random splits into up to eight chunks."""
    expected = parse_completion(text, thinking=thinking)
    assert stream([text], thinking)[0] == expected
    assert stream(list(text), thinking)[0] == expected
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]], thinking)[0] == expected
    rng = np.random.default_rng(len(text))
    for _ in range(100):
        cuts = sorted(rng.integers(0, len(text) + 1, int(rng.integers(2, 8))).tolist())
        assert stream([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], thinking)[0] == expected


def test_streaming_emits_early():
    """Reasoning is emitted before </think> arrives; a tool call as soon as its invoke closes, before EOS."""
    p = CompletionParser(thinking="high")
    assert p.feed("Need two") == [StreamEvent("reasoning", "Need two")]
    end_of_invoke = E6.index(f"</{DSML}invoke>") + len(f"</{DSML}invoke>")
    events = p.feed(E6[len("Need two"):end_of_invoke])
    call_ = fn("get_weather", '{"city": "Paris", "days": 2}')
    assert events == [StreamEvent("reasoning", " calls."), StreamEvent("tool_call", index=0, tool_call=call_)]
    assert not p.done
    assert p.feed(E6[end_of_invoke:]) == [] and p.done


def test_streaming_holds_back_possible_markers():
    """Text that may start a tool-call block or EOS is held until the next delta decides."""
    p = CompletionParser()
    assert p.feed("a.\n") == [StreamEvent("content", "a.")]
    assert p.feed(f"\n<{DSML[:2]}") == []
    assert p.feed(DSML[2:4]) == []
    assert p.feed("x") == [StreamEvent("content", f"\n\n<{DSML[:4]}x")]
    assert p.feed("<｜end▁of") == []
    assert p.feed("▁sentence｜>") == [] and p.done


FRAGMENTS = ["Hello", "world", " ", "  ", "\n", "\n\n", "\t", "\r\n", "日本語", "毕老师！", "🙂", "naïve",
             '"quoted"', "back\\slash", "<", ">", "</", "<c>", "a < b", "</thinking>", "<think", "｜", "<｜",
             "DSML", "｜DSM",
             '{"k": 1}', "[1, 2]", "```py\nx = 1\n```", "#", "&amp;", "1234567", "end.", 'name="x"', "/"]
FORBIDDEN = (BOS, EOS, THINK, THINK_END, DSML)  # control text no message can carry (ENCODING.md §3.1 step 4)
TOOL_NAMES = ["get_weather", "search", "read_file", "run.python", "calc-v2", "日本_tool"]
PARAM_NAMES = ["city", "days", "q", "path", "x", "opts", "日本", "with space"]


def rand_text(rng, max_pieces=8):
    while True:
        text = "".join(rng.choice(FRAGMENTS) for _ in range(int(rng.integers(0, max_pieces + 1))))
        if not any(f in text for f in FORBIDDEN):
            return text


def rand_value(rng, depth=0):
    kind = int(rng.integers(0, 7 if depth < 2 else 5))
    if kind == 0:
        return rand_text(rng, 4)
    if kind == 1:
        return int(rng.integers(-10**6, 10**6))
    if kind == 2:
        return float(np.round(rng.normal() * 10.0 ** int(rng.integers(-3, 4)), 4))
    if kind == 3:
        return bool(rng.integers(0, 2))
    if kind == 4:
        return None
    if kind == 5:
        return [rand_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(rng.choice(PARAM_NAMES)): rand_value(rng, depth + 1) for _ in range(int(rng.integers(0, 3)))}


def rand_call(rng, k):
    """A tool call whose arguments are a dict or a JSON string in one of two layouts; and the dict."""
    args = {str(rng.choice(PARAM_NAMES)): rand_value(rng) for _ in range(int(rng.integers(0, 4)))}
    form = int(rng.integers(0, 3))
    arguments = args if form == 0 else json.dumps(args, ensure_ascii=form == 1,
                                                  separators=(", ", ": ") if form == 1 else (",", ":"))
    return call(f"call_{k}", str(rng.choice(TOOL_NAMES)), arguments), args


def rand_conversation(rng):
    """A random conversation: optional system prompt and tools (on the system message or request-level),
    user turns, assistant turns with or without reasoning and tool calls, tool results in random order.
    Returns (messages, {assistant index: [argument dicts]}, request-level tools or None)."""
    tools = [{"type": "function", "function": {"name": n, "description": rand_text(rng, 3), "parameters": {}}}
             for n in TOOL_NAMES[:int(rng.integers(0, 4))]]
    messages, args = [], {}
    if rng.random() < 0.7:
        messages.append({"role": "system", "content": rand_text(rng), **({"tools": tools} if tools else {})})
    for _ in range(int(rng.integers(1, 4))):
        messages.append(user(rand_text(rng)))
        while True:
            calls = [rand_call(rng, k) for k in range(int(rng.integers(0, 4)) if rng.random() < 0.5 else 0)]
            turn = assistant(rand_text(rng) if rng.random() < 0.8 else None)
            if rng.random() < 0.8:
                turn["reasoning_content"] = rand_text(rng)
            if calls:
                turn["tool_calls"] = [c for c, _ in calls]
            args[len(messages)] = [a for _, a in calls]
            messages.append(turn)
            if not calls:
                break
            for k in rng.permutation(len(calls)):
                result = rand_text(rng)
                messages.append({"role": "tool", "tool_call_id": calls[k][0]["id"], "content": result})
            if rng.random() < 0.5:
                break
            messages.append(user(rand_text(rng)))
    return messages, args, (tools if tools and messages[0]["role"] != "system" else None)


@pytest.mark.parametrize("thinking", ["none", "high", "max"])
def test_round_trip_random_conversations(tok, thinking):
    """Round trip. For every assistant turn A at index j of a random conversation, the prompt of messages[:j]
    (ending with the generation prompt) is a prefix of the prompt of messages[:j+1], and the rest is exactly
    what the model must sample for A. Parsing that completion, in one go or streamed token by token through
    the detokenizer, returns A as the format carries it: content and reasoning with None read as "", reasoning
    "" in Non-think (the format drops it), each call as {"type": "function", "function": {"name", "arguments":
    json.dumps(args, ensure_ascii=False)}} (key order kept, no id), and no errors. The ids split there too:
    encode(prompt + completion) == encode(prompt) + encode(completion). Texts carry no control tokens
    (FORBIDDEN) and arguments are JSON objects: the encoder's fallback for other arguments is lossy by design
    (see test_e7)."""
    rng = np.random.default_rng({"none": 0, "high": 1, "max": 2}[thinking])
    turns = calls = 0
    for _ in range(25):
        messages, args, tools = rand_conversation(rng)
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = encode_chat(messages[:j], thinking=thinking, tools=tools)
            full = encode_chat(messages[:j + 1], thinking=thinking, tools=tools)
            assert full.startswith(prompt) and prompt.endswith(THINK if thinking != "none" else THINK_END)
            completion = full[len(prompt):]
            reasoning = (m.get("reasoning_content") or "") if thinking != "none" else ""
            expected = msg(m["content"] or "", reasoning,
                           [fn(c["function"]["name"], json.dumps(a, ensure_ascii=False))
                            for c, a in zip(m.get("tool_calls", []), args[j])])
            assert parse_completion(completion, thinking=thinking) == expected
            ids = tok.encode(completion)
            assert tok.encode(full) == tok.encode(prompt) + ids
            detok = Detokenizer(tok)
            assert stream([detok.push(i) for i in ids] + [detok.flush()], thinking)[0] == expected
            turns += 1
            calls += len(expected["tool_calls"])
    assert turns > 50 and calls > 30


SOUP = [THINK_END, THINK, EOS, "\n\n", "\n", f"<{DSML}tool_calls>", f"</{DSML}tool_calls>",
        f'<{DSML}invoke name="f">', f"</{DSML}invoke>", f'<{DSML}parameter name="a" string="true">',
        f'<{DSML}parameter name="b" string="false">', f"</{DSML}parameter>", "x", "1", "[", '"', ">", "<",
        " ", DSML, "</", f"<{DSML}"]


@pytest.mark.parametrize("thinking", ["none", "high"])
def test_parser_on_random_tag_soup(thinking):
    """On random strings of tags and fragments the parser never raises, streaming (random splits) equals
    one-shot parsing, and when no tool-call block was parsed, reasoning + content is the text minus the marker
    that closed the reasoning and minus the first EOS."""
    rng = np.random.default_rng(3 if thinking == "none" else 4)
    for _ in range(1500):
        text = "".join(rng.choice(SOUP) for _ in range(int(rng.integers(0, 25))))
        parsed = parse_completion(text, thinking=thinking)
        cuts = sorted(rng.integers(0, len(text) + 1, 4).tolist())
        assert stream([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], thinking)[0] == parsed
        assert parsed["errors"] or text.endswith(EOS)
        if parsed["tool_calls"] or f"</{DSML}tool_calls>" in text:
            continue
        plain = text
        if thinking != "none":
            ends = [text.find(m) for m in (THINK_END, EOS, f"<{DSML}tool_calls") if m in text]
            if ends and text.find(THINK_END) == min(ends):
                plain = plain.replace(THINK_END, "", 1)
        assert parsed["reasoning_content"] + parsed["content"] == plain.replace(EOS, "", 1)


def test_parser_survives_deeply_nested_json():
    """A string="false" value nested deeper than Python's recursion limit is kept as a string, with an error,
    not raised."""
    deep = "[" * 100_000 + "]" * 100_000
    text = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
            f'<｜DSML｜parameter name="v" string="false">{deep}</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    m = parse_completion(text, thinking="none")
    assert m["tool_calls"][0]["function"]["arguments"] == json.dumps({"v": deep})
    assert any("not JSON" in e for e in m.get("errors", []))
