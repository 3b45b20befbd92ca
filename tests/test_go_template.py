"""Go templates (common/go_template.py): each construct of the subset rendered as Go's
text/template renders it, what is refused and where, the limits a hostile template meets, and
real Ollama templates rendered to the exact prompts Ollama renders for them."""

from __future__ import annotations

import copy
import datetime
import time

import pytest

from common.go_template import HINT, TemplateError, parse
from common.go_values import JsonMap
from common.ollama_templates import message_values, tool_values
from common.protocol import ChatMessage
from common.tool_calls import ToolCall

DATA = {"S": "héllo <&>", "E": "", "L": ["a", "b", "c"], "M": {"b": "2", "a": "1"}, "T": True, "F": False, "N": None,
        "Msgs": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}],
        "Nested": {"A": {"B": "deep"}}}


def render(template: str, **data: object) -> str:
    return parse(template).render(data or DATA)


def refusal(template: str, **data: object) -> str:
    """The message of the TemplateError that parsing or rendering ``template`` raises."""
    with pytest.raises(TemplateError) as error:
        render(template, **data)
    assert error.value.args[0].endswith(HINT)  # every refusal says what to do instead
    return error.value.args[0]


# ---------------------------------------------------------------- text, trim markers, comments

def test_trim_markers_eat_all_adjacent_whitespace_including_newlines() -> None:
    assert render("a  \n {{- .S -}} \n  b") == "ahéllo <&>b"
    assert render("{{ .E }}\n\n  x\n{{- .E }}") == "\n\n  x"
    assert render("{{ .S -}}\n\n{{ .S }}") == "héllo <&>héllo <&>"


def test_a_trim_marker_needs_a_space_beside_it() -> None:
    assert render("{{- 3 -}} {{- -3 -}} x {{-3}} {{ 3 -}} y") == "3-3x -3 3y"  # {{-3}} is minus three
    assert "bad number syntax" in refusal("{{ .S-}}")


def test_comments_render_nothing_and_take_trim_markers() -> None:
    assert render("a {{- /* one\ntwo */ -}} b {{/* c */}} c") == "ab  c"
    assert "unclosed comment" in refusal("{{/* open }}")
    assert "comment ends before closing delimiter" in refusal("{{/* a */ .S }}")


# ---------------------------------------------------------------- printing values

def test_values_print_as_go_prints_them() -> None:
    template = "{{ .S }}|{{ .E }}|{{ .L }}|{{ .M }}|{{ .T }}|{{ .N }}|{{ .Missing }}|{{ .Nested.A.B }}|{{ .Nested }}"
    assert render(template) == "héllo <&>||[a b c]|map[a:1 b:2]|true|<no value>|<no value>|deep|map[A:map[B:deep]]"
    assert render("{{ .Msgs }}") == "[map[Content:hi Role:user] map[Content:yo Role:assistant]]"


def test_numbers_print_as_go_prints_them() -> None:
    assert render("{{ 1.0 }} {{ 2.5e10 }} {{ 1e-7 }} {{ 100000.0 }} {{ 1000000.0 }} {{ 0.000123 }} {{ -0.5 }} "
                  "{{ 0x1F }} {{ 0755 }} {{ 1_000 }} {{ 'a' }} {{ -3 }} {{ +4 }} {{ .5 }}") == (
        "1 2.5e+10 1e-07 100000 1e+06 0.000123 -0.5 31 493 1000 97 -3 4 0.5")
    assert render("{{ .X }} {{ .Y }}", X=1.5, Y=2.0) == "1.5 2"


def test_string_literals_take_go_escapes_and_raw_strings_none() -> None:
    assert render('{{ `raw\\n "s"` }}|{{ "\\u00e9\\x41\\101\\t" }}') == 'raw\\n "s"|éAA\t'
    assert "invalid escape" in refusal('{{ "\\q" }}')
    assert "unterminated quoted string" in refusal('{{ "abc }}')


def test_a_missing_key_is_nil_and_a_field_of_nil_is_nil() -> None:
    """Our data may leave empty fields out, so a missing key reads as Go's nil (as a missing
    map key does in Go) and so does anything under it; Go would fail on a struct."""
    assert render("[{{ .Missing.Deeper }}]{{ if .Missing.Deeper }}yes{{ else }}no{{ end }}") == "[<no value>]no"


def test_a_field_of_a_list_or_string_is_an_error() -> None:
    assert "can't evaluate field X in type []interface {}" in refusal("{{ .L.X }}")
    assert "can't evaluate field X in type string" in refusal("{{ .S.X }}")


# ---------------------------------------------------------------- variables and scoping

def test_variables_declare_assign_and_scope_to_their_end() -> None:
    # the assignment inside range changes the outer $x; $y lives only in the body
    assert render("{{ $x := 1 }}{{ range .L }}{{ $x = . }}{{ $y := . }}{{ $y }}{{ end }}{{ $x }}") == "abcc"
    assert "undefined variable $y" in refusal("{{ range .L }}{{ $y := . }}{{ end }}{{ $y }}")
    # a declaration in a body shadows until its end, then the outer variable shows again
    assert render('{{ $x := "out" }}{{ range .L }}{{ $x := . }}{{ $x }}{{ end }}{{ $x }}|'
                  '{{ $y := 1 }}{{ if .T }}{{ $y := 2 }}{{ $y }}{{ end }}{{ $y }}') == "abcout|21"
    assert "undefined variable $z" in refusal("{{ $z = 1 }}")


def test_dollar_is_the_data_everywhere() -> None:
    assert render("{{ range .L }}{{ $.E }}[{{ len $.L }}]{{ end }}") == "[3][3][3]"
    assert render("{{ with .Nested }}{{ .A.B }}/{{ $.Nested.A.B }}{{ end }}") == "deep/deep"


def test_a_variable_declared_in_an_if_lasts_to_its_end_else_included() -> None:
    assert render("{{ if $v := .E }}a{{ else }}[{{ $v }}]{{ end }}") == "[]"
    assert render("{{ with $x := .S }}{{ $x }}={{ . }}{{ end }}") == "héllo <&>=héllo <&>"


# ---------------------------------------------------------------- control structures

def test_else_if_chains_take_the_first_true_arm() -> None:
    template = "{{ if .A }}a{{ else if .B }}b{{ else if .C }}c{{ else }}d{{ end }}"
    assert [render(template, A=a, B=b, C=c) for a, b, c in [(1, 1, 1), (0, 1, 1), (0, "", [1]), (0, "", [])]] == [
        "a", "b", "c", "d"]


def test_with_moves_dot_and_else_keeps_it() -> None:
    assert render("{{ with .M }}{{ .a }}{{ end }}|{{ with .E }}no{{ else }}{{ .S }}{{ end }}") == "1|héllo <&>"


def test_else_with_moves_dot_to_its_own_value() -> None:
    assert render("{{ with .E }}x{{ else with .S }}[{{ . }}]{{ else }}y{{ end }}") == "[héllo <&>]"
    assert render("{{ with .E }}x{{ else with .N }}z{{ else }}{{ .T }}{{ end }}") == "true"


def test_range_over_lists_with_index_and_element() -> None:
    assert render("{{- range $i, $m := .Msgs }}{{ $i }}={{ $m.Role }}:{{ .Content }};{{ end }}") == (
        "0=user:hi;1=assistant:yo;")
    assert render("{{ range $e := .L }}{{ $e }}{{ end }}|{{ range .L }}{{ . }}{{ end }}") == "abc|abc"


def test_range_over_maps_goes_in_key_order() -> None:
    assert render("{{ range $k, $v := .M }}{{ $k }}->{{ $v }},{{ end }}|{{ range $v := .M }}{{ $v }}{{ end }}") == (
        "a->1,b->2,|12")


def test_range_else_runs_when_there_is_nothing_to_range_over() -> None:
    assert render("{{ range .N }}x{{ else }}nil{{ end }}|{{ range .Missing }}{{ else }}missing{{ end }}"
                  "|{{ range .E }}{{ else }}empty{{ end }}", N=None, E=[]) == "nil|missing|empty"
    assert render("{{ range .L }}{{ else }}no{{ end }}") == ""


def test_range_over_an_int_counts_and_over_a_string_fails() -> None:
    assert render("{{ range 3 }}{{ . }}{{ end }}") == "012"
    assert "range can't iterate over héllo" in refusal("{{ range .S }}x{{ end }}")


def test_break_and_continue_leave_the_innermost_range() -> None:
    assert render('{{ range .L }}{{ if eq . "b" }}{{ continue }}{{ end }}{{ . }}{{ end }}') == "ac"
    assert render('{{ range .L }}{{ range $.L }}{{ if eq . "b" }}{{ break }}{{ end }}{{ . }}{{ end }};{{ end }}') == (
        "a;a;a;")
    assert "{{break}} outside {{range}}" in refusal("{{ if .T }}{{ break }}{{ end }}")


def test_truth_is_gos() -> None:
    values = {"f": False, "zero": 0, "zf": 0.0, "nil": None, "s": "", "l": [], "m": {}, "t": True, "one": 1, "x": "x",
              "l1": [0], "m1": {"k": None}}
    template = "".join(f"{{{{ if .{k} }}}}{k} {{{{ end }}}}" for k in values)
    assert render(template, **values) == "t one x l1 m1 "


# ---------------------------------------------------------------- pipelines and functions

def test_pipes_pass_the_value_as_the_last_argument() -> None:
    assert render('{{ .S | len }}|{{ "abc" | printf "%s-%s" "x" }}|{{ 1 | eq 1 }}|{{ (index .Msgs 0).Role }}') == (
        "10|x-abc|true|user")
    assert "only a function can take a piped value" in refusal('{{ .S | "a" }}')


def test_and_or_short_circuit_and_return_the_deciding_value() -> None:
    assert render('{{ and 1 0 2 }} {{ and 1 2 }} {{ or 0 "" .L }} [{{ or 0 "" }}] {{ not .E }} {{ not .L }}') == (
        "0 2 [a b c] [] true false")
    # the index out of range is never evaluated
    assert render("{{ and false (index .L 10) }}|{{ or true (index .L 10) }}") == "false|true"


def test_eq_compares_with_each_of_the_others() -> None:
    assert render('{{ eq 1 2 3 1 }} {{ eq "a" "b" }} {{ eq .S "x" .S }} {{ eq .N nil }} {{ eq .Missing "x" }}') == (
        "true false true true false")
    template = '{{ if eq .Role "system" "user" }}in{{ else }}out{{ end }}'
    assert [render(template, Role=role) for role in ("user", "system", "tool")] == ["in", "in", "out"]


def test_comparisons_follow_gos_types() -> None:
    assert render('{{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt "b" "a" }} {{ ge 1.5 2.5 }}') == (
        "true true true true false")
    assert "incompatible types for comparison" in refusal("{{ eq 1 1.0 }}")
    assert "incompatible types for comparison" in refusal('{{ lt 1 "a" }}')
    assert "invalid type for comparison" in refusal("{{ lt true false }}")
    assert "non-comparable type" in refusal("{{ eq .L .L }}")


def test_len_index_and_slice() -> None:
    assert render('{{ len .S }} {{ len .L }} {{ len .M }} {{ index .L 1 }} {{ index .M "a" }} {{ index .M "no" }} '
                  '{{ index .S 1 }} {{ slice .S 1 3 }} {{ slice .L 1 }} {{ slice .L 0 2 3 }} {{ slice .L }}') == (
        "10 3 2 b 1 <no value> 195 é [b c] [a b] [a b c]")  # strings count and index bytes, as in Go
    assert render("{{ index .X 1 0 }}", X=[["a"], ["b", "c"]]) == "b"
    assert "len of nil pointer" in refusal("{{ len .N }}")
    assert "len of type int" in refusal("{{ len 3 }}")
    assert "index out of range: 5" in refusal("{{ index .L 5 }}")
    assert "index of untyped nil" in refusal("{{ index .N 1 }}")
    assert "invalid slice index: 2 > 1" in refusal("{{ slice .L 2 1 }}")
    assert "cannot 3-index slice a string" in refusal("{{ slice .S 0 1 2 }}")


def test_print_and_println_space_as_go_does() -> None:
    assert render('{{ print 1 2 "a" 3 4 nil true 1.5 }}|{{ println 1 "a" nil }}|{{ print .L .M }}') == (
        "1 2a3 4 <nil> true 1.5|1 a <nil>\n|[a b c] map[a:1 b:2]")


def test_printf_verbs() -> None:
    assert render('{{ printf "%s|%v|%d|%q|%f|%.2f|%5s|%-5s|%05d|%.1s|%%" .S .L 42 .Q 3.25 2.345 "ab" "ab" -42 "xyz" }}',
                  S="s", L=["a", "b"], Q="it's \"q\"\n\t\x01") == (
        's|[a b]|42|"it\'s \\"q\\"\\n\\t\\x01"|3.250000|2.35|   ab|ab   |-0042|x|%')
    assert render('{{ printf "%v %.3v %v" 3.14159 3.14159 1e21 }}|{{ printf "%*d|%-*d|" 4 7 3 8 }}') == (
        "3.14159 3.14 1e+21|   7|8  |")


def test_printf_notes_wrong_arguments_as_go_does() -> None:
    assert render('{{ printf "%s %d %f %q %v" 1 "x" 2 true nil }}|{{ printf "%s|%d" }}|{{ printf "a" 1 "b" }}'
                  '|{{ printf "%d" .L }}') == (
        "%!s(int=1) %!d(string=x) %!f(int=2) %!q(bool=true) <nil>|%!s(MISSING)|%!d(MISSING)"
        "|a%!(EXTRA int=1, string=b)|[%!d(string=a) %!d(string=b) %!d(string=c)]")


def test_printf_refuses_verbs_outside_the_subset_when_parsing() -> None:
    message = refusal('{{ printf "%x" 255 }}')
    assert "printf '%x' is not supported" in message and "template:1:4:" in message


def test_html_js_and_urlquery_escape() -> None:
    assert render('{{ html .S }}|{{ html "\'\\"" 1 }}|{{ js .Q }}|{{ urlquery .U }}|{{ urlquery 1 2 }}',
                  S="héllo <&>", Q="it's \"q\"\n", U="a b&c=d/é?") == (
        "héllo &lt;&amp;&gt;|&#39;&#34;1|it\\'s \\\"q\\\"\\u000A|a+b%26c%3Dd%2F%C3%A9%3F|1+2")


def test_json_is_compact_and_escapes_like_go() -> None:
    data = {"M": {"b": "<2>", "a": [1, 2.0, None, True, "&"]}, "F": 1e21, "G": 1e-7, "H": 2.5}
    assert render("{{ json .M }}|{{ json .F }}|{{ json .G }}|{{ json .H }}|{{ json .N }}|{{ json .S }}",
                  S="\u2028\x01", **data) == (
        '{"b":"\\u003c2\\u003e","a":[1,2,null,true,"\\u0026"]}|1e+21|1e-7|2.5|null|"\\u2028\\u0001"')
    assert render("[{{ json .X }}]", X=float("nan")) == "[]"  # Ollama's json drops the marshalling error


def test_json_keeps_the_order_of_the_map_given() -> None:
    """Go sorts a map's keys; our maps are ordered, and the order given is the one the client
    wrote (and Ollama keeps a tool's own order), so json keeps it."""
    assert render("{{ json .M }}", M={"z": 1, "a": 2}) == '{"z":1,"a":2}'


def test_current_date_is_todays_in_go_layout() -> None:
    today = datetime.date.today()
    assert render("{{ currentDate }}|{{ yesterdayDate }}") in {
        f"{day.isoformat()}|{(day - datetime.timedelta(days=1)).isoformat()}"
        for day in (today, today + datetime.timedelta(days=1))}  # the test may cross midnight


# ---------------------------------------------------------------- refusals, with where and why

def test_an_unclosed_action_says_where() -> None:
    assert refusal("hello\n  {{ .S ").startswith("template:2:3: unclosed action; ")


def test_an_unknown_function_is_named() -> None:
    assert refusal("{{ .S }}\n{{ foo .S }}").startswith('template:2:4: function "foo" is not defined; ')
    assert 'function "toTypeScriptType" is not supported' in refusal("{{ toTypeScriptType .S }}")


@pytest.mark.parametrize("template", ['x\n{{ define "t" }}{{ end }}', 'x\n{{ template "t" }}',
                                      'x\n{{ block "t" . }}{{ end }}'])
def test_named_templates_are_refused(template: str) -> None:
    word = template.split()[2]
    assert refusal(template).startswith(f"template:2:1: {{{{{word}}}}} is not supported")


def test_method_calls_and_arguments_to_values_are_refused() -> None:
    assert "method calls with arguments are not supported" in refusal("{{ .S .L }}")
    assert "can't give an argument to a non-function" in refusal('{{ "a" "b" }}')
    assert "nil is not a command" in refusal("{{ nil }}")


def test_structure_errors() -> None:
    assert "unexpected EOF: {{if}} has no {{end}}" in refusal("{{ if .S }}x")
    assert "unexpected {{end}}" in refusal("x{{ end }}")
    assert "unexpected {{else}}" in refusal("{{ else }}")
    assert "{{else if}} is only allowed after {{if}}" in refusal("{{ range .L }}{{ else if .T }}{{ end }}")
    assert "wrong number of args for not: want 1 got 2" in refusal("{{ not 1 2 }}")
    assert "missing value for command" in refusal("{{ }}")
    assert "unclosed left paren" in refusal("{{ (len .L }}")


def test_a_runtime_error_says_where() -> None:
    assert refusal("{{ range .L }}\n  {{ len $.N }}{{ end }}").startswith(
        "template:2:6: error calling len: len of nil pointer; ")


# ---------------------------------------------------------------- limits

def test_a_template_over_64_kib_is_refused() -> None:
    parse("x" * 65536)
    assert "over 64 KiB" in refusal("x" * 65537)


def test_nesting_is_bounded() -> None:
    parse("{{ if 1 }}" * 50 + "{{ end }}" * 50)
    assert "nesting deeper than 50 levels" in refusal("{{ if 1 }}" * 51 + "{{ end }}" * 51)
    assert "nesting deeper than 50 levels" in refusal("{{ " + "(" * 60 + "1" + ")" * 60 + " }}")


def test_long_else_if_chains_are_not_nesting() -> None:
    template = "".join(f"{{{{ {'if' if i == 0 else 'else if'} eq .N {i} }}}}{i}" for i in range(300)) + "{{ end }}"
    assert parse(template).render({"N": 299}) == "299"


def test_output_is_bounded() -> None:
    big = "x" * (1 << 20)
    assert "over 4 MiB" in refusal("{{ range .L }}{{ . }}{{ end }}", L=[big] * 5)
    assert "over 4 MiB" in refusal('{{ $x := .S }}{{ range .L }}{{ $x = printf "%s%s" $x $x }}{{ end }}',
                                   S="x" * 1024, L=list(range(30)))
    assert "over 4 MiB" in refusal("{{ print .S .S .S .S .S }}", S=big)
    assert "too large" in refusal('{{ printf "%*d" 1000000000 1 }}')


def test_work_is_bounded() -> None:
    started = time.monotonic()
    message = refusal("{{ range .L }}{{ range $.L }}{{ range $.L }}{{ range $.L }}{{ end }}{{ end }}{{ end }}{{ end }}",
                      L=list(range(200)))
    assert "steps" in message and time.monotonic() - started < 10
    # a quadratic idiom over a huge list pays for the copies it makes
    assert "steps" in refusal("{{ range $i, $_ := .L }}{{ len (slice $.L $i) }}{{ end }}", L=list(range(50000)))


def test_deeply_nested_data_fails_cleanly() -> None:
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    assert "nested too deeply" in refusal("{{ .D }}", D=deep)


# ---------------------------------------------------------------- data: messages and tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]}}}}}


def test_tool_call_arguments_print_as_json() -> None:
    messages = message_values([ChatMessage(role="assistant", tool_calls=[
        ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris", "days": 2})])])
    template = ("{{ range .Messages }}{{ range .ToolCalls }}{{ .ID }} {{ .Function.Name }} {{ .Function.Arguments }}"
                "{{ range $k, $v := .Function.Arguments }} {{ $k }}={{ $v }}{{ end }}{{ end }}{{ end }}")
    assert parse(template).render({"Messages": messages}) == (
        'call_1 get_weather {"city":"Paris","days":2} city=Paris days=2')


def test_messages_carry_every_field_go_would() -> None:
    (value,) = message_values([{"role": "tool", "content": "22", "tool_name": "get_weather"}])
    assert value == {"Role": "tool", "Content": "22", "Thinking": "", "Images": [], "ToolCalls": [],
                     "ToolName": "get_weather", "ToolCallID": ""}


def test_tools_print_as_ollamas_json_and_read_by_go_names() -> None:
    tool = copy.deepcopy(WEATHER)
    tool["function"]["strict"] = True  # a key Ollama does not know
    tool["function"]["parameters"]["properties"]["unit"] = {"type": ["string", "null"], "default": "celsius"}
    template = ("{{ range .Tools }}{{ . }}\n{{ .Function }}\n{{ .Function.Name }}:"
                "{{ range $name, $p := .Function.Parameters.Properties }} {{ $name }}={{ $p.Type }}{{ end }}{{ end }}\n"
                "{{ .Tools }}")
    tools = tool_values([tool])
    function = ('{"name":"get_weather","description":"Get the current weather","parameters":{"type":"object",'
                '"required":["city"],"properties":{"city":{"type":"string","description":"The city, e.g. Paris"},'
                '"unit":{"type":["string","null"]}}}}')
    assert parse(template).render({"Tools": tools}) == (
        f'{{"type":"function","function":{function}}}\n{function}\n'
        f'get_weather: city=string unit=[string null]\n[{{"type":"function","function":{function}}}]')


def test_a_json_map_prints_its_json_form() -> None:
    value = JsonMap({"Name": "x"}, {"name": "x"})
    assert parse("{{ . }} {{ .Name }} {{ json . }} {{ printf \"%s|%v\" . . }}").render(value) == (
        '{"name":"x"} x {"name":"x"} {"name":"x"}|{"name":"x"}')


def test_identifiers_name_the_fields_and_variables_read() -> None:
    template = parse("{{ range $i, $m := .Messages }}{{ $m.Role }}{{ $.Tools }}{{ end }}{{ .Response }}")
    assert template.identifiers == {"messages", "$m", "role", "$", "tools", "response"}


# ---------------------------------------------------------------- real templates

# Templates from Ollama's repository (template/*.gotmpl), with the prompts Ollama's own tests expect
# for three conversations (template/testdata/<name>/<conversation>).
OLLAMA_TEMPLATES = {
    "alpaca": r"""{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}
{{- if not $system }}{{ $system = .Content }}
{{- else }}{{ $system = printf "%s\n\n%s" $system .Content }}
{{- end }}
{{- else if eq .Role "user" }}
{{- if $system }}{{ $system }}

{{ $system = "" }}
{{- end }}### Instruction:
{{ .Content }}

{{ else if eq .Role "assistant" }}### Response:
{{ .Content }}

{{ end }}
{{- end }}### Response:
""",
    "gemma3-instruct": r"""{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{- if and (eq $i 1) $.System }}
{{ $.System }}
{{ end }}
{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- end }}
""",
    "llama2-chat": r"""{{- $system := "" }}[INST] {{ range .Messages }}
{{- if eq .Role "system" }}
{{- if not $system }}{{ $system = .Content }}
{{- else }}{{ $system = printf "%s\n\n%s" $system .Content }}
{{- end }}
{{- else if eq .Role "user" }}<<SYS>>
{{- if $system }}
{{ $system }}
{{ $system = "" }}
{{- end }}<</SYS>>

{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s><s>[INST] {{ end }}
{{- end }}""",
    "falcon-instruct": r"""{{- range .Messages }}
{{- if eq .Role "system" }}System: {{ .Content }}
{{ continue }}
{{- else if eq .Role "user" }}User:
{{- else if eq .Role "assistant" }}Falcon:
{{- end }}
{{ .Content }}
{{ end }}Falcon:
""",
}
OLLAMA_EXPECTED = {
    ("alpaca", "user"): (
        "### Instruction:\n"
        "Hello, how are you?\n"
        "\n"
        "### Response:\n"
    ),
    ("alpaca", "user-assistant-user"): (
        "### Instruction:\n"
        "Hello, how are you?\n"
        "\n"
        "### Response:\n"
        "I'm doing great. How can I help you today?\n"
        "\n"
        "### Instruction:\n"
        "I'd like to show off how chat templating works!\n"
        "\n"
        "### Response:\n"
    ),
    ("alpaca", "system-user-assistant-user"): (
        "You are a helpful assistant.\n"
        "\n"
        "### Instruction:\n"
        "Hello, how are you?\n"
        "\n"
        "### Response:\n"
        "I'm doing great. How can I help you today?\n"
        "\n"
        "### Instruction:\n"
        "I'd like to show off how chat templating works!\n"
        "\n"
        "### Response:\n"
    ),
    ("gemma3-instruct", "user"): (
        "<start_of_turn>user\n"
        "Hello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
        "\n"
    ),
    ("gemma3-instruct", "user-assistant-user"): (
        "<start_of_turn>user\n"
        "Hello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
        "I'm doing great. How can I help you today?<end_of_turn>\n"
        "<start_of_turn>user\n"
        "I'd like to show off how chat templating works!<end_of_turn>\n"
        "<start_of_turn>model\n"
        "\n"
    ),
    ("gemma3-instruct", "system-user-assistant-user"): (
        "<start_of_turn>user\n"
        "You are a helpful assistant.\n"
        "\n"
        "Hello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
        "I'm doing great. How can I help you today?<end_of_turn>\n"
        "<start_of_turn>user\n"
        "I'd like to show off how chat templating works!<end_of_turn>\n"
        "<start_of_turn>model\n"
        "\n"
    ),
    ("llama2-chat", "user"): (
        "[INST] <<SYS>><</SYS>>\n"
        "\n"
        "Hello, how are you? [/INST]"
    ),
    ("llama2-chat", "user-assistant-user"): (
        "[INST] <<SYS>><</SYS>>\n"
        "\n"
        "Hello, how are you? [/INST] I'm doing great. How can I help you today?</s><s>[INST] <<SYS>><</SYS>>\n"
        "\n"
        "I'd like to show off how chat templating works! [/INST]"
    ),
    ("llama2-chat", "system-user-assistant-user"): (
        "[INST] <<SYS>>\n"
        "You are a helpful assistant.\n"
        "<</SYS>>\n"
        "\n"
        "Hello, how are you? [/INST] I'm doing great. How can I help you today?</s><s>[INST] <<SYS>><</SYS>>\n"
        "\n"
        "I'd like to show off how chat templating works! [/INST]"
    ),
    ("falcon-instruct", "user"): (
        "User:\n"
        "Hello, how are you?\n"
        "Falcon:\n"
    ),
    ("falcon-instruct", "user-assistant-user"): (
        "User:\n"
        "Hello, how are you?\n"
        "Falcon:\n"
        "I'm doing great. How can I help you today?\n"
        "User:\n"
        "I'd like to show off how chat templating works!\n"
        "Falcon:\n"
    ),
    ("falcon-instruct", "system-user-assistant-user"): (
        "System: You are a helpful assistant.\n"
        "User:\n"
        "Hello, how are you?\n"
        "Falcon:\n"
        "I'm doing great. How can I help you today?\n"
        "User:\n"
        "I'd like to show off how chat templating works!\n"
        "Falcon:\n"
    ),
}

# Templates of models in Ollama's library, as `ollama show --template` prints them.
LLAMA32 = r"""<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023

{{ if .System }}{{ .System }}
{{- end }}
{{- if .Tools }}When you receive a tool call response, use the output to format an answer to the orginal user question.

You are a helpful assistant with tool calling capabilities.
{{- end }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>
{{- if and $.Tools $last }}

Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.

{{ range $.Tools }}
{{- . }}
{{ end }}
{{ .Content }}<|eot_id|>
{{- else }}

{{ .Content }}<|eot_id|>
{{- end }}{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>
{{- if .ToolCalls }}
{{ range .ToolCalls }}
{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}

{{ .Content }}
{{- end }}{{ if not $last }}<|eot_id|>{{ end }}
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}"""

QWEN25 = r"""{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

QWEN3 = r"""{{- $lastUserIdx := -1 -}}
{{- range $idx, $msg := .Messages -}}
{{- if eq $msg.Role "user" }}{{ $lastUserIdx = $idx }}{{ end -}}
{{- end }}
{{- if or .System .Tools }}<|im_start|>system
{{ if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end -}}
<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}
{{- if and $.IsThinkSet (eq $i $lastUserIdx) }}
   {{- if $.Think -}}
      {{- " "}}/think
   {{- else -}}
      {{- " "}}/no_think
   {{- end -}}
{{- end }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if (and $.IsThinkSet (and .Thinking (or $last (gt $i $lastUserIdx)))) -}}
<think>{{ .Thinking }}</think>
{{ end -}}
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) -}}
<think>

</think>

{{ end -}}
{{ end }}
{{- end }}"""

MISTRAL = r"""{{- if .Messages }}
{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}
{{- if and (eq (len (slice $.Messages $index)) 1) $.Tools }}[AVAILABLE_TOOLS] {{ $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{- end }}]
{{- end }}</s>
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}} [/TOOL_RESULTS]
{{- end }}
{{- end }}
{{- else }}[INST] {{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }}[/INST]
{{- end }} {{ .Response }}
{{- if .Response }}</s>
{{- end }}"""

LLAMA32_TOOLS = (
    "<|start_header_id|>system<|end_header_id|>\n"
    "\n"
    "Cutting Knowledge Date: December 2023\n"
    "\n"
    "You are a helpful assistant.When you receive a tool call response, use the output to format an answer to the orginal user question.\n"
    "\n"
    "You are a helpful assistant with tool calling capabilities.<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
    "\n"
    "What's the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
    "\n"
    "{\"name\": \"get_weather\", \"parameters\": {\"city\":\"Paris\",\"unit\":\"celsius\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n"
    "\n"
    "{\"temperature\": 22}<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
    "\n"
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n"
    "\n"
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}. Do not use variables.\n"
    "\n"
    "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"Get the current weather\",\"parameters\":{\"type\":\"object\",\"required\":[\"city\"],\"properties\":{\"city\":{\"type\":\"string\",\"description\":\"The city, e.g. Paris\"},\"unit\":{\"type\":\"string\",\"description\":\"Temperature unit\",\"enum\":[\"celsius\",\"fahrenheit\"]}}}}}\n"
    "\n"
    "Thanks! And <tomorrow> & after?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
    "\n"
)

QWEN25_TOOLS = (
    "<|im_start|>system\n"
    "You are a helpful assistant.\n"
    "\n"
    "# Tools\n"
    "\n"
    "You may call one or more functions to assist with the user query.\n"
    "\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n"
    "{\"type\": \"function\", \"function\": {\"name\":\"get_weather\",\"description\":\"Get the current weather\",\"parameters\":{\"type\":\"object\",\"required\":[\"city\"],\"properties\":{\"city\":{\"type\":\"string\",\"description\":\"The city, e.g. Paris\"},\"unit\":{\"type\":\"string\",\"description\":\"Temperature unit\",\"enum\":[\"celsius\",\"fahrenheit\"]}}}}}\n"
    "</tools>\n"
    "\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n"
    "What's the weather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<tool_call>\n"
    "{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\",\"unit\":\"celsius\"}}\n"
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n"
    "<tool_response>\n"
    "{\"temperature\": 22}\n"
    "</tool_response><|im_end|>\n"
    "<|im_start|>user\n"
    "Thanks! And <tomorrow> & after?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

MISTRAL_TOOLS = (
    "[INST] What's the weather in Paris?[/INST][TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\",\"unit\":\"celsius\"}}]</s>[TOOL_RESULTS] {\"content\": {\"temperature\": 22}} [/TOOL_RESULTS][AVAILABLE_TOOLS] [{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"Get the current weather\",\"parameters\":{\"type\":\"object\",\"required\":[\"city\"],\"properties\":{\"city\":{\"type\":\"string\",\"description\":\"The city, e.g. Paris\"},\"unit\":{\"type\":\"string\",\"description\":\"Temperature unit\",\"enum\":[\"celsius\",\"fahrenheit\"]}}}}}][/AVAILABLE_TOOLS][INST] You are a helpful assistant.\n"
    "\n"
    "Thanks! And <tomorrow> & after?[/INST] "
)

QWEN3_NO_THINK = (
    "<|im_start|>user\n"
    "2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
    "4<|im_end|>\n"
    "<|im_start|>user\n"
    "And 3+3? /no_think<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n"
    "\n"
    "</think>\n"
    "\n"
)

QWEN3_THINKING_PREFILL = (
    "<|im_start|>user\n"
    "2+2? /think<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>Easy.</think>\n"
)


def ollama_data(messages: list[dict], tools: list[dict] | None = None, think: bool | None = None) -> dict:
    """The data Ollama gives a template that ranges over .Messages: consecutive messages of one
    role merged (tool results apart), the system messages joined into .System."""
    system, merged = [], []
    for message in messages:
        if message["role"] == "system":
            system.append(message["content"])
        if merged and merged[-1]["role"] == message["role"] != "tool":
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(message)
    return {"System": "\n\n".join(system), "Messages": message_values(merged),
            "Tools": tool_values(tools) if tools else None, "Response": "",
            "Think": bool(think), "ThinkLevel": "", "IsThinkSet": think is not None}


CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "user-assistant-user": [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"}],
}
CONVERSATIONS["system-user-assistant-user"] = [
    {"role": "system", "content": "You are a helpful assistant."}, *CONVERSATIONS["user-assistant-user"]]
TOOL_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
    {"role": "tool", "content": '{"temperature": 22}', "tool_name": "get_weather"},
    {"role": "user", "content": "Thanks! And <tomorrow> & after?"}]
THINK_CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "thinking": "Easy sum."},
              {"role": "user", "content": "And 3+3?"}]


@pytest.mark.parametrize(("name", "conversation"), list(OLLAMA_EXPECTED))
def test_ollamas_templates_render_what_ollama_renders(name: str, conversation: str) -> None:
    rendered = parse(OLLAMA_TEMPLATES[name]).render(ollama_data(CONVERSATIONS[conversation]))
    assert rendered == OLLAMA_EXPECTED[name, conversation]


@pytest.mark.parametrize(("template", "messages", "think", "expected"), [
    pytest.param(LLAMA32, TOOL_CHAT, None, LLAMA32_TOOLS, id="llama3.2-tools"),
    pytest.param(QWEN25, TOOL_CHAT, None, QWEN25_TOOLS, id="qwen2.5-tools"),
    pytest.param(MISTRAL, TOOL_CHAT, None, MISTRAL_TOOLS, id="mistral-tools"),
    pytest.param(QWEN3, THINK_CHAT, False, QWEN3_NO_THINK, id="qwen3-no-think"),
    pytest.param(QWEN3, [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "", "thinking": "Easy."}],
                 True, QWEN3_THINKING_PREFILL, id="qwen3-thinking-prefill"),
])
def test_library_templates_with_tools_and_thinking(template: str, messages: list[dict], think: bool | None,
                                                   expected: str) -> None:
    tools = [WEATHER] if any(m.get("tool_calls") for m in messages) else None
    assert parse(template).render(ollama_data(messages, tools, think)) == expected


def test_a_template_without_messages_renders_the_prompt() -> None:
    """What Ollama renders for /api/generate with a template (and for models whose template has
    no .Messages): .System, .Prompt, .Response; the qwen2.5 template's else branch."""
    data = {"System": "Be brief.", "Prompt": "Hi <there>", "Response": "", "Think": False, "ThinkLevel": "",
            "IsThinkSet": False}
    assert parse(QWEN25).render(data) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <there><|im_end|>\n<|im_start|>assistant\n")


