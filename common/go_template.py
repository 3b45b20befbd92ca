"""Go's text/template, the subset Ollama's prompt templates use, rendered in Python.

Ollama's ``template`` field on /api/generate and a Modelfile's ``TEMPLATE`` are Go templates.
We render the part of the language those templates use with Go's semantics: trim markers,
variable scoping, truthiness, short-circuit ``and``/``or``, ``eq`` with several operands,
range over maps in key order, and Go's printing (``<no value>``, ``[a b]``, ``map[k:v]``).
Anything else is refused by ``parse`` with a TemplateError that names the construct and where
it is, rather than rendered differently from Go: ``define``, ``template`` and ``block``,
method calls, functions other than those in _FUNCTIONS (``call``, ``toTypeScriptType``), and
printf verbs other than %s %d %v %q %f and %%.

The data is what JSON decodes to (dicts, lists, str, int, float, bool, None) keyed by Go's
field names: ``System``, ``Prompt``, ``Suffix``, ``Response``, ``Messages`` (``Role``,
``Content``, ``Thinking``, ``Images``, ``ToolCalls``, ``ToolName``, ``ToolCallID``), ``Tools``,
``Think``, ``ThinkLevel``, ``IsThinkSet``; ``message_values`` and ``tool_values`` build the
nested ones. Where Go's behaviour depends on Go types we choose:
- a key missing from a dict is nil, and a field of nil is nil (Go would fail on a struct
  field that does not exist), since our dicts may leave empty fields out;
- ``JsonMap`` and ``JsonList`` print as compact JSON, as Ollama's tool types (which have a
  String method) do: ``{{ .Function.Arguments }}`` must print JSON, not ``map[...]``;
- ``json`` keeps a map's own order (Go sorts the keys): the order the client wrote.

Untrusted templates are bounded: at most 64 KiB of text and 50 levels of nesting; rendering
stops at 4 MiB of output (or of any string a function builds) and at a budget of steps.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

MAX_TEXT = 64 * 1024
MAX_DEPTH = 50
MAX_OUTPUT = 4 * 1024 * 1024
MAX_STEPS = 2_000_000  # node visits and range iterations: a conversation of thousands of turns needs far fewer
HINT = "use the model's own template by leaving template out, or send the whole prompt with raw"


class TemplateError(ValueError):
    """A template outside the supported subset, malformed, or failing on its data."""


class JsonMap(dict):
    """A map whose Go value has a String method printing JSON (Ollama's tools and tool-call
    arguments). Fields are looked up by Go name; it prints, and ``json`` encodes it, as
    ``json_value`` (the wire form, lowercase keys), or as itself when that is None."""

    def __init__(self, fields: dict[str, Any], json_value: Any = None) -> None:
        super().__init__(fields)
        self.json_value = self if json_value is None else json_value


class JsonList(list):
    """A list that prints as JSON, as Ollama's ``Tools`` does."""


# ---------------------------------------------------------------- lexer

_NUMBER = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|"
                     r"(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)")
_WORD = re.compile(r"\w+")
_CHAR = re.compile(r"'(\\.[^']*|[^\\'])'")
_SPACE = " \t\r\n"
_KEYWORDS = {"if", "else", "end", "range", "with", "break", "continue", "define", "template", "block"}
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", '"': '"', "'": "'"}


@dataclass(slots=True)
class _Token:
    kind: str  # literal field var ident keyword nil dot declare assign pipe ( ) comma
    value: Any
    at: int  # offset in the source, for messages
    spaced: bool  # whitespace before it: ".A.B" is one chain, ".A .B" two operands


class _Lexer:
    """Splits the source into text pieces and actions (token lists), applying trim markers."""

    def __init__(self, source: str) -> None:
        self.src = source
        self.items: list[tuple[str, Any, int]] = []  # ("text", str, at) or ("action", [tokens], at)

    def error(self, what: str, at: int) -> TemplateError:
        return _error(self.src, what, at)

    def run(self) -> list[tuple[str, Any, int]]:
        src, pos, trim_next = self.src, 0, False
        while True:
            start = src.find("{{", pos)
            text = src[pos:] if start < 0 else src[pos:start]
            if trim_next:
                text = text.lstrip(_SPACE)
            if start >= 0 and src[start + 2:start + 3] == "-" and src[start + 3:start + 4] in tuple(_SPACE):
                text, inner = text.rstrip(_SPACE), start + 4
            else:
                inner = start + 2
            if text:
                self.items.append(("text", text, pos))
            if start < 0:
                return self.items
            if src.startswith("/*", inner):
                pos, trim_next = self._comment(inner, start)
            else:
                pos, trim_next = self._action(inner, start)

    def _close(self, pos: int) -> tuple[int, bool] | None:
        """Where the text resumes and whether to trim it, when ``pos`` is at a closing delimiter."""
        if self.src.startswith("}}", pos):
            return pos + 2, False
        if self.src[pos:pos + 1] in tuple(_SPACE) and self.src.startswith("-}}", pos + 1):
            return pos + 4, True
        return None

    def _comment(self, pos: int, start: int) -> tuple[int, bool]:
        end = self.src.find("*/", pos + 2)
        if end < 0:
            raise self.error("unclosed comment", start)
        closed = self._close(end + 2)
        if closed is None:
            raise self.error("comment ends before closing delimiter", start)
        return closed

    def _action(self, pos: int, start: int) -> tuple[int, bool]:
        src, tokens, spaced = self.src, [], True
        while True:
            if pos >= len(src):
                raise self.error("unclosed action", start)
            closed = self._close(pos)
            if closed is not None:
                self.items.append(("action", tokens, start))
                return closed
            char = src[pos]
            if char in _SPACE:
                pos, spaced = pos + 1, True
                continue
            kind, value, end = self._token(pos)
            tokens.append(_Token(kind, value, pos, spaced))
            pos, spaced = end, False

    def _token(self, pos: int) -> tuple[str, Any, int]:
        src, char = self.src, self.src[pos]
        if src.startswith(":=", pos):
            return "declare", ":=", pos + 2
        if char in "=|(),":
            return {"=": "assign", "|": "pipe", "(": "(", ")": ")", ",": "comma"}[char], char, pos + 1
        if char == '"':
            return self._quoted(pos)
        if char == "`":
            end = src.find("`", pos + 1)
            if end < 0:
                raise self.error("unterminated raw quoted string", pos)
            return "literal", src[pos + 1:end].replace("\r", ""), end + 1
        if char == "'":
            match = _CHAR.match(src, pos)
            char = match and _unquote(match.group(1), lambda what: self.error(what, pos))
            if not char or len(char) != 1:
                raise self.error("malformed character constant", pos)
            return "literal", ord(char), match.end()  # a rune: Go's characters are numbers
        if char == "$":
            match = _WORD.match(src, pos + 1)
            return "var", "$" + (match.group() if match else ""), match.end() if match else pos + 1
        if char == "." and not src[pos + 1:pos + 2].isdigit():
            match = _WORD.match(src, pos + 1)
            return ("field", match.group(), match.end()) if match else ("dot", ".", pos + 1)
        if char.isdigit() or char in "+-.":
            return self._number(pos)
        match = _WORD.match(src, pos)
        if not match:
            raise self.error(f"unexpected {char!r} in action", pos)
        word = match.group()
        if word in ("true", "false"):
            return "literal", word == "true", match.end()
        if word == "nil":
            return "nil", None, match.end()
        return ("keyword" if word in _KEYWORDS else "ident"), word, match.end()

    def _quoted(self, pos: int) -> tuple[str, Any, int]:
        end = pos + 1
        while end < len(self.src) and self.src[end] not in '"\n':
            end += 2 if self.src[end] == "\\" else 1
        if end >= len(self.src) or self.src[end] != '"':
            raise self.error("unterminated quoted string", pos)
        return "literal", _unquote(self.src[pos + 1:end], lambda what: self.error(what, pos)), end + 1

    def _number(self, pos: int) -> tuple[str, Any, int]:
        match = _NUMBER.match(self.src, pos)
        end = match.end() if match else pos
        if not match or end < len(self.src) and (self.src[end].isalnum() or self.src[end] in "._"):
            word = _WORD.match(self.src, end)
            raise self.error(f"bad number syntax: {self.src[pos:word.end() if word else end + 1]!r}", pos)
        text = match.group().replace("_", "")
        if re.fullmatch(r"[+-]?0[0-7]+", text):
            return "literal", int(text, 8), end  # Go's legacy octal
        if not re.match(r"[+-]?0[xX]", text) and any(c in text for c in ".eE"):
            return "literal", float(text), end
        return "literal", int(text, 0), end


def _unquote(body: str, error: Callable[[str], TemplateError]) -> str:
    """Go's escapes: \\n and kin, \\xHH and octal bytes, \\uHHHH, \\UHHHHHHHH."""
    out, i = bytearray(), 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode()
            i += 1
            continue
        code = body[i + 1:i + 2]
        if code in _ESCAPES:
            out += _ESCAPES[code].encode()
            i += 2
        elif code in ("x", "u", "U") or code.isdigit():
            size = {"x": 2, "u": 4, "U": 8}.get(code, 3)
            digits = body[i + 2:i + 2 + size] if not code.isdigit() else body[i + 1:i + 4]
            try:
                number = int(digits, 8 if code.isdigit() else 16)
                if len(digits) != size:
                    raise ValueError
                out += bytes([number]) if code == "x" or code.isdigit() else chr(number).encode()
            except (ValueError, OverflowError):
                raise error(f"invalid escape \\{code}{digits} in string") from None
            i += 1 + size + (0 if code.isdigit() else 1)
        else:
            raise error(f"invalid escape \\{code} in string")
    return out.decode("utf-8", "replace")


def _error(source: str, what: str, at: int) -> TemplateError:
    line = source.count("\n", 0, at) + 1
    column = at - (source.rfind("\n", 0, at) + 1) + 1
    return TemplateError(f"template:{line}:{column}: {what}; {HINT}")


# ---------------------------------------------------------------- nodes

_NO_ARG = object()  # no value piped into a command


class _Fail(Exception):
    """A function's error, given its position by the call that made it."""


class _Cut(Exception):
    """The field the render stops after was read (``Template.render``'s ``stop_after``)."""


class _Stop(Exception):
    """``{{break}}`` (``brk``) or ``{{continue}}`` unwinding to the innermost range."""

    def __init__(self, brk: bool) -> None:
        self.brk = brk


@dataclass(slots=True)
class _Text:
    text: str

    def run(self, r: _Renderer, dot: Any) -> None:
        r.write(self.text)


@dataclass(slots=True)
class _Action:
    pipe: _Pipe

    def run(self, r: _Renderer, dot: Any) -> None:
        value = self.pipe.value(r, dot)
        if not self.pipe.decl:  # a declaration or assignment prints nothing
            r.write("<no value>" if value is None else _sprint_one(value))


@dataclass(slots=True)
class _Stopper:
    brk: bool

    def run(self, r: _Renderer, dot: Any) -> None:
        raise _Stop(self.brk)


@dataclass(slots=True)
class _Branch:
    """``if`` and ``with`` with their ``else if`` / ``else with`` arms, tried in order (Go nests
    each in the previous else; a flat list renders the same without deep recursion). ``with``
    moves dot to the value. Variables declared in the pipelines last to the ``end``."""

    is_with: bool
    arms: list[tuple[_Pipe, list]]
    orelse: list

    def run(self, r: _Renderer, dot: Any) -> None:
        mark = len(r.vars)
        try:
            for pipe, body in self.arms:
                value = pipe.value(r, dot)
                if _truth(value):
                    r.run(body, value if self.is_with else dot)
                    return
            r.run(self.orelse, dot)
        finally:
            del r.vars[mark:]


@dataclass(slots=True)
class _Range:
    pipe: _Pipe
    names: list[str]  # none, the element's, or the key's (index's) and the element's
    body: list
    orelse: list

    def run(self, r: _Renderer, dot: Any) -> None:
        mark, ran = len(r.vars), False
        for key, element in self._pairs(r, self.pipe.value(r, dot)):
            ran = True
            r.tick()
            if len(self.names) == 2:
                r.vars += [(self.names[0], key), (self.names[1], element)]
            elif self.names:
                r.vars.append((self.names[0], element))
            try:
                r.run(self.body, element)
            except _Stop as stop:
                if stop.brk:
                    break
            finally:
                del r.vars[mark:]
        if not ran:
            r.run(self.orelse, dot)
            del r.vars[mark:]

    def _pairs(self, r: _Renderer, value: Any) -> Iterable[tuple[Any, Any]]:
        if value is None:
            return ()
        if isinstance(value, dict):
            return ((key, value[key]) for key in sorted(value, key=_key_order))
        if isinstance(value, (list, tuple)):
            return enumerate(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if len(self.names) == 2:
                raise r.error(f"can't use {value} to iterate over more than one variable", self.pipe.at)
            return ((i, i) for i in range(value))
        raise r.error(f"range can't iterate over {_sprint_one(value)}", self.pipe.at)


@dataclass(slots=True)
class _Pipe:
    """Commands joined by ``|``, each later one getting the previous value as its last argument;
    ``decl`` names the variables it declares (``:=``) or assigns (``=``)."""

    decl: list[str]
    assign: bool
    cmds: list
    at: int

    def value(self, r: _Renderer, dot: Any) -> Any:
        value = _NO_ARG
        for cmd in self.cmds:
            value = cmd.value(r, dot, value)
        for name in self.decl:
            if self.assign:
                r.assign(name, value, self.at)
            else:
                r.vars.append((name, value))
        return value


@dataclass(slots=True)
class _Call:
    name: str
    args: list
    at: int

    def value(self, r: _Renderer, dot: Any, final: Any) -> Any:
        thunks = [(lambda arg=arg: arg.value(r, dot, _NO_ARG)) for arg in self.args]
        if final is not _NO_ARG:
            thunks.append(lambda: final)
        if self.name in ("and", "or"):  # short-circuit: the deciding value, later ones not evaluated
            for thunk in thunks:
                value = thunk()
                if _truth(value) == (self.name == "or"):
                    return value
            return value
        args = [thunk() for thunk in thunks]
        try:
            result = _FUNCTIONS[self.name][2](*args)
        except _Fail as fail:
            raise r.error(f"error calling {self.name}: {fail}", self.at) from None
        # Functions pay for the data they touch: "len (slice $.Messages $i)" in a loop copies
        # the rest of the list each time, which a long conversation makes quadratic.
        touched = sum(len(v) for v in args if isinstance(v, str))  # Go counts bytes: we encode
        r.tick((touched + (len(result) if isinstance(result, (str, list, tuple)) else 0)) // 64)
        return result


@dataclass(slots=True)
class _Field:
    """``.A.B``, ``$x.A``, ``(pipeline).A``: a base (None: dot) and the names looked up from it."""

    base: Any
    names: list[str]
    at: int

    def value(self, r: _Renderer, dot: Any, final: Any = _NO_ARG) -> Any:
        value = dot if self.base is None else self.base.value(r, dot, _NO_ARG)
        if self.names and self.names[0] == r.stop_after:
            r.stopping = True  # nothing after the action reading it is rendered
        for name in self.names:
            if value is None:
                return None  # a missing map reads as an empty one
            if not isinstance(value, dict):
                raise r.error(f"can't evaluate field {name} in type {_go_type(value)}", self.at)
            value = value.get(name)
        return value


@dataclass(slots=True)
class _Var:
    name: str
    at: int

    def value(self, r: _Renderer, dot: Any, final: Any = _NO_ARG) -> Any:
        for name, value in reversed(r.vars):
            if name == self.name:
                return value
        raise r.error(f"undefined variable: {self.name}", self.at)


@dataclass(slots=True)
class _Literal:
    literal: Any

    def value(self, r: _Renderer, dot: Any, final: Any = _NO_ARG) -> Any:
        return self.literal


@dataclass(slots=True)
class _ParenPipe:
    pipe: _Pipe

    def value(self, r: _Renderer, dot: Any, final: Any = _NO_ARG) -> Any:
        return self.pipe.value(r, dot)


# ---------------------------------------------------------------- parser

@dataclass(slots=True)
class _Ident:
    """A function name as an operand, before we know whether it heads a command."""

    name: str
    at: int


class _Tokens:
    """The tokens of one action, read left to right."""

    def __init__(self, tokens: list[_Token], at: int) -> None:
        self.tokens, self.i, self.at = tokens, 0, at

    def peek(self, ahead: int = 0) -> _Token | None:
        i = self.i + ahead
        return self.tokens[i] if i < len(self.tokens) else None

    def kind(self, ahead: int = 0) -> str | None:
        token = self.peek(ahead)
        return token.kind if token else None

    def next(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token


class _Parser:
    def __init__(self, source: str, items: list[tuple[str, Any, int]]) -> None:
        self.src, self.items, self.i = source, items, 0
        self.scope = ["$"]  # variables visible here, as Go checks them at parse time
        self.names: set[str] = set()  # field and variable names read, lowercased (Ollama's Vars)

    def error(self, what: str, at: int) -> TemplateError:
        return _error(self.src, what, at)

    def parse(self) -> list:
        nodes, stop = self.list(0, False)
        if stop is not None:
            raise self.error(f"unexpected {{{{{stop[0].tokens[0].value}}}}}", stop[1])
        return nodes

    def list(self, depth: int, in_range: bool) -> tuple[list, tuple[_Tokens, int] | None]:
        """Nodes up to the end of the source or to an ``{{end}}`` or ``{{else ...}}``, returned."""
        nodes: list = []
        while self.i < len(self.items):
            kind, value, at = self.items[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(_Text(value))
                continue
            tokens = _Tokens(value, at)
            head = tokens.peek()
            if head is None:
                raise self.error("missing value for command", at)
            if head.kind != "keyword":
                nodes.append(_Action(self.pipeline(tokens, "action", depth)))
            elif head.value in ("end", "else"):
                return nodes, (tokens, at)
            else:
                nodes.append(self.control(tokens, at, depth, in_range))
        return nodes, None

    def control(self, tokens: _Tokens, at: int, depth: int, in_range: bool) -> Any:
        word = tokens.next().value
        if word in ("define", "template", "block"):
            raise self.error(f"{{{{{word}}}}} is not supported: a template here is one piece, without named ones", at)
        if word in ("break", "continue"):
            if not in_range:
                raise self.error(f"{{{{{word}}}}} outside {{{{range}}}}", at)
            self.expect_end(tokens, word)
            return _Stopper(word == "break")
        if depth >= MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH} levels", at)
        mark = len(self.scope)
        if word == "range":
            pipe, names = self.range_pipeline(tokens, depth)
            self.scope += names
            body, stop = self.list(depth + 1, True)
            del self.scope[mark:]
            orelse = self.else_list(stop, word, at, depth, in_range)
            return _Range(pipe, names, body, orelse)
        arms = []
        while True:  # if, else if, ... (or with, else with, ...)
            pipe = self.pipeline(tokens, word, depth)
            arm_mark = len(self.scope)
            body, stop = self.list(depth + 1, in_range)
            del self.scope[arm_mark:]
            arms.append((pipe, body))
            if stop is None or not (stop[0].peek().value == "else" and stop[0].kind(1) == "keyword"
                                    and stop[0].peek(1).value == word):
                break
            tokens, at = stop
            tokens.i = 2  # past "else if" / "else with"
        orelse = self.else_list(stop, word, at, depth, in_range)
        del self.scope[mark:]
        return _Branch(word == "with", arms, orelse)

    def else_list(self, stop: tuple[_Tokens, int] | None, word: str, at: int, depth: int, in_range: bool) -> list:
        """What follows the body up to ``{{end}}``: the else list, if there is one."""
        if stop is None:
            raise self.error(f"unexpected EOF: {{{{{word}}}}} has no {{{{end}}}}", at)
        tokens, else_at = stop
        if tokens.next().value == "end":
            self.expect_end(tokens, "end")
            return []
        if tokens.kind() == "keyword" and tokens.peek().value in ("if", "with"):
            raise self.error(f"{{{{else {tokens.peek().value}}}}} is only allowed after {{{{{tokens.peek().value}}}}}",
                             else_at)
        self.expect_end(tokens, "else")
        mark = len(self.scope)
        orelse, stop = self.list(depth + 1, in_range)
        del self.scope[mark:]
        if stop is None or stop[0].next().value != "end":
            raise self.error(f"expected {{{{end}}}} to close the {{{{{word}}}}}", stop[1] if stop else at)
        self.expect_end(stop[0], "end")
        return orelse

    def expect_end(self, tokens: _Tokens, word: str) -> None:
        if tokens.peek() is not None:
            raise self.error(f"unexpected {_shown(tokens.peek())} in {{{{{word}}}}}", tokens.peek().at)

    def range_pipeline(self, tokens: _Tokens, depth: int) -> tuple[_Pipe, list[str]]:
        names: list[str] = []
        if tokens.kind() == "var" and tokens.kind(1) == "comma" and tokens.kind(2) == "var":
            first, _, second = tokens.next(), tokens.next(), tokens.next()
            names = [first.value, second.value]
        elif tokens.kind() == "var" and tokens.kind(1) in ("declare", "assign"):
            names = [tokens.next().value]
        if names:
            if tokens.kind() != "declare":
                raise self.error("range variables must be declared with :=", tokens.at)
            tokens.next()
        return self.pipeline(tokens, "range", depth, declare=False), names

    def pipeline(self, tokens: _Tokens, context: str, depth: int, declare: bool = True) -> _Pipe:
        at = tokens.peek().at if tokens.peek() else tokens.at
        decl, assign = [], False
        if declare and tokens.kind() == "var" and tokens.kind(1) in ("declare", "assign", "comma"):
            if tokens.kind(1) == "comma":
                raise self.error("only range declares two variables", at)
            if context == "paren":
                raise self.error("a declaration inside parentheses is not supported", at)
            name, assign = tokens.next().value, tokens.next().kind == "assign"
            if assign and name not in self.scope:
                raise self.error(f"undefined variable {name}", at)
            decl = [name]
        cmds = [self.command(tokens, depth, piped=False)]
        while tokens.kind() == "pipe":
            tokens.next()
            cmds.append(self.command(tokens, depth, piped=True))
        if tokens.kind() == ")" and context != "paren":
            raise self.error("unexpected right paren", tokens.peek().at)
        if tokens.peek() is not None and context != "paren":
            raise self.error(f"unexpected {_shown(tokens.peek())} in {context}", tokens.peek().at)
        if decl and not assign:
            self.scope += decl
        return _Pipe(decl, assign, cmds, at)

    def command(self, tokens: _Tokens, depth: int, piped: bool) -> Any:
        at = tokens.peek().at if tokens.peek() else tokens.at
        operands: list[Any] = []
        while tokens.kind() not in (None, "pipe", ")"):
            if operands and not tokens.peek().spaced:
                raise self.error(f"unexpected {_shown(tokens.peek())} in operand", tokens.peek().at)
            operands.append(self.operand(tokens, depth))
        if not operands:
            raise self.error("missing value for command", at)
        first, args = operands[0], [self.call(op, 0, False) if isinstance(op, _Ident) else op for op in operands[1:]]
        if isinstance(first, _Ident):
            return self.call(first, len(args), piped, args)
        if piped:
            raise self.error("only a function can take a piped value", at)
        if args:
            if isinstance(first, (_Field, _Var)):
                raise self.error("method calls with arguments are not supported", at)
            raise self.error("can't give an argument to a non-function", at)
        if isinstance(first, _Literal) and first.literal is None:
            raise self.error("nil is not a command", at)
        return first

    def call(self, ident: _Ident, count: int, piped: bool, args: list | None = None) -> _Call:
        name = ident.name
        if name not in _FUNCTIONS:
            known = "is not supported" if name in ("call", "toTypeScriptType") else "is not defined"
            raise self.error(f'function "{name}" {known}', ident.at)
        low, high, _ = _FUNCTIONS[name]
        count += piped
        if count < low or (high is not None and count > high):
            want = f"{low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise self.error(f"wrong number of args for {name}: want {want} got {count}", ident.at)
        args = args or []
        if name == "printf" and args and isinstance(args[0], _Literal) and isinstance(args[0].literal, str):
            try:
                _format_parts(args[0].literal)
            except _Fail as fail:
                raise self.error(str(fail), ident.at) from None
        return _Call(name, args, ident.at)

    def operand(self, tokens: _Tokens, depth: int) -> Any:
        token = tokens.next()
        if token.kind == "ident":
            return _Ident(token.value, token.at)
        if token.kind in ("field", "dot"):
            node: Any = None
            names = [token.value] if token.kind == "field" else []
        elif token.kind == "var":
            if token.value not in self.scope:
                raise self.error(f"undefined variable {token.value}", token.at)
            self.names.add(token.value.lower())
            node, names = _Var(token.value, token.at), []
        elif token.kind == "(":
            if depth >= MAX_DEPTH:
                raise self.error(f"nesting deeper than {MAX_DEPTH} levels", token.at)
            node, names = _ParenPipe(self.pipeline(tokens, "paren", depth + 1)), []
            if tokens.kind() != ")":
                raise self.error("unclosed left paren", token.at)
            tokens.next()
        elif token.kind in ("literal", "nil"):
            if tokens.kind() == "field" and not tokens.peek().spaced:
                raise self.error(f"unexpected .{tokens.peek().value} after {_shown(token)}", tokens.peek().at)
            return _Literal(token.value)
        else:
            raise self.error(f"unexpected {_shown(token)} in operand", token.at)
        while tokens.kind() == "field" and not tokens.peek().spaced:
            names.append(tokens.next().value)
        if token.kind == "dot" and names:
            raise self.error("unexpected . after term", token.at)
        self.names.update(name.lower() for name in names)
        return _Field(node, names, token.at) if names or node is None else node


def _shown(token: _Token) -> str:
    if token.kind == "keyword":
        return f"<{token.value}>"
    if token.kind == "field":
        return f".{token.value}"
    return repr(token.value) if token.kind == "literal" else str(token.value)


# ---------------------------------------------------------------- rendering

class _Renderer:
    def __init__(self, source: str, data: Any, stop_after: str | None = None) -> None:
        self.src = source
        self.vars: list[tuple[str, Any]] = [("$", data)]
        self.out: list[str] = []
        self.size = self.steps = 0
        self.stop_after = stop_after
        self.stopping = False

    def error(self, what: str, at: int) -> TemplateError:
        return _error(self.src, what, at)

    def run(self, nodes: list, dot: Any) -> None:
        for node in nodes:
            if self.stopping:
                raise _Cut
            self.tick()
            node.run(self, dot)

    def tick(self, steps: int = 1) -> None:
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise TemplateError(f"template: rendering took more than {MAX_STEPS} steps; {HINT}")

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > MAX_OUTPUT:
            raise TemplateError(f"template: the rendered prompt is over {MAX_OUTPUT >> 20} MiB; {HINT}")
        self.out.append(text)

    def assign(self, name: str, value: Any, at: int) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i] = (name, value)
                return
        raise self.error(f"undefined variable: {name}", at)


class Template:
    """A parsed template; ``render`` may be called any number of times, from any thread."""

    def __init__(self, source: str, nodes: list, identifiers: frozenset[str]) -> None:
        self.source = source
        self._nodes = nodes
        # Field and variable names it reads, lowercased: Ollama looks for "messages" and
        # "response" here to choose how to fill in the data.
        self.identifiers = identifiers

    def render(self, data: dict[str, Any], stop_after: str | None = None) -> str:
        """The text; with ``stop_after`` (a field of the data), only up to and including the
        first action that reads it: Ollama renders the last turn of a template without
        ``.Messages`` that way, so that the answer continues from ``.Response``."""
        renderer = _Renderer(self.source, data, stop_after)
        try:
            renderer.run(self._nodes, data)
        except _Cut:
            pass
        except RecursionError:
            raise TemplateError(f"template: the data is nested too deeply to render; {HINT}") from None
        return "".join(renderer.out)


def parse(text: str) -> Template:
    """The template in ``text``; TemplateError if it is malformed or outside the subset."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT:
        raise TemplateError(f"template: over {MAX_TEXT >> 10} KiB; {HINT}")
    parser = _Parser(text, _Lexer(text).run())
    nodes = parser.parse()
    return Template(text, nodes, frozenset(parser.names))


# ---------------------------------------------------------------- values and printing

def _truth(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings, lists and maps are false."""
    if value is None:
        return False
    if isinstance(value, (bool, int, float, str, list, tuple, dict)):
        return bool(value)
    return True


def _go_type(value: Any) -> str:
    if value is None:
        return "<nil>"
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float64"), (str, "string"),
                       ((list, tuple), "[]interface {}"), (dict, "map[string]interface {}")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _key_order(key: Any) -> tuple:
    """Go's order for map keys (fmt and range sort them): numbers, then strings."""
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        return (0, key, "")
    return (1, 0, key) if isinstance(key, str) else (2, 0, str(key))


def _sprint_one(value: Any) -> str:
    """Go's ``%v``."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value, json_style=False)
    if isinstance(value, str):
        return value
    if isinstance(value, (JsonMap, JsonList)):
        return _go_json(value)
    if isinstance(value, dict):
        pairs = (f"{_sprint_one(k)}:{_sprint_one(value[k])}" for k in sorted(value, key=_key_order))
        return "map[" + " ".join(pairs) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_sprint_one(v) for v in value) + "]"
    return str(value)


def _sprint(*args: Any) -> str:
    """Go's ``fmt.Sprint``: a space between operands when neither is a string."""
    out = _Bounded()
    for i, arg in enumerate(args):
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(_sprint_one(arg))
    return "".join(out)


def _sprintln(*args: Any) -> str:
    """Go's ``fmt.Sprintln``: spaces between all operands, and a newline."""
    out = _Bounded()
    for i, arg in enumerate(args):
        out.append(" " if i else "")
        out.append(_sprint_one(arg))
    out.append("\n")
    return "".join(out)


class _Bounded(list):
    """The pieces of a string a function builds, failing before they pass MAX_OUTPUT: a short
    template can print a long value many times over."""

    size = 0

    def append(self, piece: str) -> None:
        self.size += len(piece)
        if self.size > MAX_OUTPUT:
            raise _Fail(f"the text built is over {MAX_OUTPUT >> 20} MiB")
        super().append(piece)


def _go_float(value: float, json_style: bool) -> str:
    """Shortest digits that read back as ``value``, laid out as Go's ``%v`` (exponent form
    below 1e-4 or from 1e6: "1e+06") or as its encoding/json (below 1e-6 or from 1e21: "1e-7")."""
    if math.isnan(value) or math.isinf(value):
        if json_style:
            raise _Fail(f"json: unsupported value: {value}")
        return "NaN" if math.isnan(value) else "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    parts = decimal.Decimal(repr(abs(value))).as_tuple()
    digits = "".join(map(str, parts.digits))
    exp = len(digits) + int(parts.exponent) - 1  # the power of ten of the first digit
    digits = digits.rstrip("0")
    if json_style:
        use_e = abs(value) < 1e-6 or abs(value) >= 1e21
    else:
        use_e = exp < -4 or exp >= 6
    if use_e:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        power = f"{abs(exp)}" if json_style else f"{abs(exp):02d}"
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{power}"
    if exp < 0:
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    whole, fraction = digits[:exp + 1].ljust(exp + 1, "0"), digits[exp + 1:]
    return sign + whole + ("." + fraction if fraction else "")


def _go_json(value: Any) -> str:
    """Go's ``json.Marshal``: compact, <, > and & escaped; maps in the order given."""
    if isinstance(value, JsonMap) and value.json_value is not value:
        return _go_json(value.json_value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value, json_style=True)
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                              ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
            text = text.replace(char, escaped)
        return text
    if isinstance(value, dict):
        return "{" + ",".join(f"{_go_json(k if isinstance(k, str) else _sprint_one(k))}:{_go_json(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_go_json(v) for v in value) + "]"
    raise _Fail(f"json: unsupported type {type(value).__name__}")


_SHORT_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _go_quote(text: str, quote: str = '"') -> str:
    """Go's ``strconv.Quote`` (and, with ``'``, ``QuoteRune``)."""
    out = [quote]
    for char in text:
        code = ord(char)
        if char in (quote, "\\"):
            out.append("\\" + char)
        elif char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out) + quote


# ---------------------------------------------------------------- printf

_VERB = re.compile(r"%([-0]*)(\*|\d*)(?:\.(\*|\d*))?(.?)", re.DOTALL)


def _format_parts(fmt: str) -> list[Any]:
    """Text pieces and (flags, width, precision, verb) for each verb; _Fail on verbs we lack.
    A width or precision of "*" is taken from the arguments (Granite's templates count with it)."""
    parts: list[Any] = []
    pos = 0
    while (start := fmt.find("%", pos)) >= 0:
        parts.append(fmt[pos:start])
        match = _VERB.match(fmt, start)
        flags, width, precision, verb = match.groups()
        if verb not in ("s", "d", "v", "q", "f", "%"):
            raise _Fail(f"printf {match.group()!r} is not supported: use %s, %d, %v, %q, %f or %% "
                        "with an optional width, precision and - or 0 flag")
        if precision is not None and precision != "*":
            precision = int(precision or 0)
        parts.append((flags, width if width in ("", "*") else int(width), precision, verb))
        pos = match.end()
    parts.append(fmt[pos:])
    return parts


def _sprintf(fmt: Any, *args: Any) -> str:
    """Go's ``fmt.Sprintf`` for the verbs in _format_parts, with its %!v(MISSING) and EXTRA notes."""
    if not isinstance(fmt, str):
        raise _Fail(f"the format must be a string, not {_go_type(fmt)}")
    out, queue = _Bounded(), list(args)
    for part in _format_parts(fmt):
        if isinstance(part, str):
            out.append(part)
            continue
        flags, width, precision, verb = part
        if width == "*":
            width = queue.pop(0) if queue else None
            if not isinstance(width, int) or isinstance(width, bool):
                out.append("%!(BADWIDTH)")
                width = 0
            elif width < 0:
                flags, width = flags + "-", -width
        if precision == "*":
            precision = queue.pop(0) if queue else None
            if not isinstance(precision, int) or isinstance(precision, bool):
                out.append("%!(BADPREC)")
                precision = None
            elif precision < 0:
                precision = None
        if verb == "%":
            out.append("%")
        elif not queue:
            out.append(f"%!{verb}(MISSING)")
        else:
            if max(width or 0, precision or 0) > MAX_OUTPUT:
                raise _Fail(f"printf width or precision over {MAX_OUTPUT} is too large")
            text = _format_one(queue.pop(0), verb, precision)
            if len(text) < (width or 0):
                text = text.ljust(width) if "-" in flags else text.zfill(width) if "0" in flags else text.rjust(width)
            out.append(text)
    if queue:
        out.append("%!(EXTRA " + ", ".join(_bad_verb_value(arg) for arg in queue) + ")")
    return "".join(out)


def _format_one(value: Any, verb: str, precision: int | None) -> str:
    if isinstance(value, (JsonMap, JsonList)) and verb in "sqv":
        value = _go_json(value)  # Go calls the String method for these verbs
    elif isinstance(value, (dict, list, tuple)):  # verb applied to each item; a nil item is <nil>
        def item(v: Any) -> str:
            return "<nil>" if v is None else _format_one(v, verb, precision)
        if isinstance(value, dict):
            return "map[" + " ".join(f"{item(k)}:{item(value[k])}" for k in sorted(value, key=_key_order)) + "]"
        return "[" + " ".join(item(v) for v in value) + "]"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if verb == "v" and not (precision is not None and isinstance(value, (str, float))):
        return _sprint_one(value)
    if isinstance(value, str) and verb in "sqv":
        text = value if precision is None else value[:precision]
        return _go_quote(text) if verb == "q" else text
    if verb == "v" or (verb == "f" and number and isinstance(value, float)):
        if not math.isfinite(value):
            return _go_float(value, json_style=False)
        return format(value, f".{6 if precision is None else precision}{'f' if verb == 'f' else 'g'}")
    if verb == "d" and number and isinstance(value, int):
        digits = str(abs(value)).zfill(precision or 0)
        return ("-" if value < 0 else "") + digits
    if verb == "q" and number and isinstance(value, int) and 0 <= value <= 0x10FFFF:
        return _go_quote(chr(value), "'")
    return f"%!{verb}({_bad_verb_value(value)})"


def _bad_verb_value(value: Any) -> str:
    return "<nil>" if value is None else f"{_go_type(value)}={_sprint_one(value)}"


# ---------------------------------------------------------------- functions

def _len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())  # Go counts bytes
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    raise _Fail("len of nil pointer" if value is None else f"len of type {_go_type(value)}")


def _index(item: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(item, dict):
            try:
                item = item.get(key)
            except TypeError:
                raise _Fail(f"value has type {_go_type(key)}; it cannot be a map key") from None
            continue
        if item is None:
            raise _Fail("index of untyped nil")
        if not isinstance(item, (list, tuple, str)):
            raise _Fail(f"can't index item of type {_go_type(item)}")
        if not isinstance(key, int) or isinstance(key, bool):
            raise _Fail(f"cannot index slice/array with type {_go_type(key)}")
        sequence = item.encode() if isinstance(item, str) else item  # a string's items are its bytes
        if not 0 <= key < len(sequence):
            raise _Fail(f"index out of range: {key}")
        item = sequence[key]
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise _Fail("slice of untyped nil")
    if not isinstance(item, (list, tuple, str)):
        raise _Fail(f"can't slice item of type {_go_type(item)}")
    if len(indexes) == 3 and isinstance(item, str):
        raise _Fail("cannot 3-index slice a string")
    sequence = item.encode() if isinstance(item, str) else item
    for index in indexes:
        if not isinstance(index, int) or isinstance(index, bool):
            raise _Fail(f"cannot index slice/array with type {_go_type(index)}")
        if not 0 <= index <= len(sequence):
            raise _Fail(f"index out of range: {index}")
    low = indexes[0] if indexes else 0
    high = indexes[1] if len(indexes) > 1 else len(sequence)
    if low > high:
        raise _Fail(f"invalid slice index: {low} > {high}")
    if len(indexes) == 3 and indexes[2] < high:
        raise _Fail(f"invalid slice index: {high} > {indexes[2]}")
    part = sequence[low:high]
    return part.decode("utf-8", "replace") if isinstance(item, str) else list(part)


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "other"


def _eq(first: Any, *others: Any) -> bool:
    """Go's eq: true when ``first`` equals any of the others; values of basic kinds only."""
    for other in others:
        if _kind(first) != _kind(other):
            if first is not None and other is not None:
                raise _Fail("incompatible types for comparison")
        elif _kind(first) == "other":
            raise _Fail(f"non-comparable type {_go_type(first)}")
        elif first == other:
            return True
    return False


def _lt(first: Any, second: Any) -> bool:
    if _kind(first) in ("nil", "bool", "other") or _kind(second) in ("nil", "bool", "other"):
        raise _Fail("invalid type for comparison")
    if _kind(first) != _kind(second):
        raise _Fail("incompatible types for comparison")
    return first < second


def _text(args: tuple) -> str:
    """The one string argument as is, else the arguments printed (Go's evalArgs)."""
    return args[0] if len(args) == 1 and isinstance(args[0], str) else _sprint(*args)


def _html(*args: Any) -> str:
    text = _text(args)
    for char, entity in (("&", "&amp;"), ("'", "&#39;"), ('"', "&#34;"), ("<", "&lt;"), (">", "&gt;"),
                         ("\0", "\ufffd")):
        text = text.replace(char, entity)
    return text


_JS_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026", "=": "\\u003D"}


def _js(*args: Any) -> str:
    return "".join(_JS_ESCAPES.get(c) or (c if c.isprintable() else f"\\u{ord(c):04X}") for c in _text(args))


def _json(value: Any) -> str:
    try:
        return _go_json(value)
    except _Fail:
        return ""  # as Ollama's json, which drops json.Marshal's error


def _date(days_ago: int) -> Callable[..., str]:
    return lambda *_: (datetime.date.today() - datetime.timedelta(days=days_ago)).isoformat()


# name: (fewest arguments, most or None, the function); "and" and "or" are evaluated in _Call.
_FUNCTIONS: dict[str, tuple[int, int | None, Callable[..., Any] | None]] = {
    "and": (1, None, None),
    "or": (1, None, None),
    "not": (1, 1, lambda value: not _truth(value)),
    "eq": (2, None, _eq),
    "ne": (2, 2, lambda a, b: not _eq(a, b)),
    "lt": (2, 2, _lt),
    "le": (2, 2, lambda a, b: _lt(a, b) or _eq(a, b)),
    "gt": (2, 2, lambda a, b: not (_lt(a, b) or _eq(a, b))),
    "ge": (2, 2, lambda a, b: not _lt(a, b)),
    "len": (1, 1, _len),
    "index": (1, None, _index),
    "slice": (1, 4, _slice),
    "print": (0, None, _sprint),
    "println": (0, None, _sprintln),
    "printf": (1, None, _sprintf),
    "html": (0, None, _html),
    "js": (0, None, _js),
    "urlquery": (0, None, lambda *args: urllib.parse.quote_plus(_text(args), safe="")),
    "json": (1, 1, _json),
    "currentDate": (0, None, _date(0)),
    "yesterdayDate": (0, None, _date(1)),
}


# ---------------------------------------------------------------- data

def message_values(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Chat messages (dicts or models with ``model_dump``: role, content, thinking, images,
    tool_calls, tool_name, tool_call_id) as Ollama's templates read them, every field present
    as Go's struct would have it; a call's ``Function.Arguments`` prints as JSON."""
    values = []
    for message in messages:
        m = message.model_dump() if hasattr(message, "model_dump") else message
        calls = []
        for i, call in enumerate(m.get("tool_calls") or []):
            function = call.get("function", call)  # Ollama's wire shape or our flat ToolCall
            arguments = function.get("arguments") or {}
            calls.append({"ID": call.get("id") or "", "Function": {
                "Index": function.get("index", i), "Name": function.get("name") or "",
                "Arguments": JsonMap(arguments)}})
        values.append({"Role": m.get("role") or "", "Content": m.get("content") or "",
                       "Thinking": m.get("thinking") or "", "Images": list(m.get("images") or []),
                       "ToolCalls": calls, "ToolName": m.get("tool_name") or "",
                       "ToolCallID": m.get("tool_call_id") or ""})
    return values


def tool_values(tools: Iterable[dict[str, Any]]) -> JsonList:
    """Function tools (``{"type": "function", "function": {"name", "description", "parameters"}}``)
    as Ollama's templates read them: Go field names, and the list, each tool, its function, its
    parameters and their properties printing as the JSON Ollama writes for them (its fields in
    its order, the keys it does not know left out; properties in the order given)."""
    values = JsonList()
    for tool in tools:
        wire = _tool_json(tool)
        function, params = wire["function"], wire["function"]["parameters"]
        properties = (tool.get("function") or {}).get("parameters", {}).get("properties") or {}
        param_fields = {"Type": params["type"], "Defs": params.get("$defs"), "Items": params.get("items"),
                        "Required": params.get("required", []),
                        "Properties": JsonMap({name: _property_value(p) for name, p in properties.items()},
                                              params["properties"])}
        function_fields = {"Name": function["name"], "Description": function["description"],
                           "Parameters": JsonMap(param_fields, params)}
        values.append(JsonMap({"Type": wire["type"], "Items": wire.get("items"),
                               "Function": JsonMap(function_fields, function)}, wire))
    return values


def _tool_json(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    params = function.get("parameters") or {}
    params_json = {"type": params.get("type") or "", **_present(params, "$defs", "items"), **_given(params, "required")}
    properties = params.get("properties")
    params_json["properties"] = None if properties is None else {k: _property_json(p) for k, p in properties.items()}
    return {"type": tool.get("type") or "", **_present(tool, "items"),
            "function": {"name": function.get("name") or "", "description": function.get("description") or "",
                         "parameters": params_json}}


def _property_json(prop: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if prop.get("anyOf"):
        out["anyOf"] = [_property_json(p) for p in prop["anyOf"]]
    kind = prop.get("type")
    if kind:
        out["type"] = kind[0] if isinstance(kind, list) and len(kind) == 1 else kind
    out |= _present(prop, "items") | _given(prop, "description", "enum")
    if prop.get("properties"):
        out["properties"] = {k: _property_json(p) for k, p in prop["properties"].items()}
    return out | _given(prop, "required")


def _present(source: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: source[key] for key in keys if source.get(key) is not None}


def _given(source: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The keys Go's ``omitempty`` keeps: those neither missing nor empty."""
    return {key: source[key] for key in keys if source.get(key)}


def _property_value(prop: dict[str, Any]) -> JsonMap:
    wire = _property_json(prop)
    return JsonMap({"AnyOf": [_property_value(p) for p in prop.get("anyOf") or []], "Type": wire.get("type", ""),
                    "Items": prop.get("items"), "Description": prop.get("description") or "",
                    "Enum": list(prop.get("enum") or []), "Properties": prop.get("properties"),
                    "Required": list(prop.get("required") or [])}, wire)
