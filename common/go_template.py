"""Go's text/template, the subset Ollama's prompt templates use, rendered in Python.

Ollama's ``template`` field on /api/generate and a Modelfile's ``TEMPLATE`` are Go templates.
We render the part of the language those templates use with Go's semantics: trim markers,
variable scoping, truthiness, short-circuit ``and``/``or``, ``eq`` with several operands,
range over maps in key order, and Go's printing (``<no value>``, ``[a b]``, ``map[k:v]``).
Anything else is refused by ``parse`` with a TemplateError that names the construct and where
it is, rather than rendered differently from Go: ``define``, ``template`` and ``block``,
method calls, functions other than those in go_values.FUNCTIONS (``call``, ``toTypeScriptType``), and
printf verbs other than %s %d %v %q %f and %%.

The data is what JSON decodes to (dicts, lists, str, int, float, bool, None) keyed by Go's
field names: ``System``, ``Prompt``, ``Suffix``, ``Response``, ``Messages`` (``Role``,
``Content``, ``Thinking``, ``Images``, ``ToolCalls``, ``ToolName``, ``ToolCallID``), ``Tools``,
``Think``, ``ThinkLevel``, ``IsThinkSet``; common/ollama_templates.py builds the
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

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.go_values import (
    FUNCTIONS, MAX_OUTPUT, FunctionError, format_parts, go_type, key_order, sprint_one, truth,
)

MAX_TEXT = 64 * 1024
MAX_DEPTH = 50
MAX_STEPS = 2_000_000  # node visits and range iterations: a conversation of thousands of turns needs far fewer
HINT = "use the model's own template by leaving template out, or send the whole prompt with raw"


class TemplateError(ValueError):
    """A template outside the supported subset, malformed, or failing on its data."""


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
            r.write("<no value>" if value is None else sprint_one(value))


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
                if truth(value):
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
            return ((key, value[key]) for key in sorted(value, key=key_order))
        if isinstance(value, (list, tuple)):
            return enumerate(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if len(self.names) == 2:
                raise r.error(f"can't use {value} to iterate over more than one variable", self.pipe.at)
            return ((i, i) for i in range(value))
        raise r.error(f"range can't iterate over {sprint_one(value)}", self.pipe.at)


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
                if truth(value) == (self.name == "or"):
                    return value
            return value
        args = [thunk() for thunk in thunks]
        try:
            result = FUNCTIONS[self.name][2](*args)
        except FunctionError as fail:
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
                raise r.error(f"can't evaluate field {name} in type {go_type(value)}", self.at)
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
        if name not in FUNCTIONS:
            known = "is not supported" if name in ("call", "toTypeScriptType") else "is not defined"
            raise self.error(f'function "{name}" {known}', ident.at)
        low, high, _ = FUNCTIONS[name]
        count += piped
        if count < low or (high is not None and count > high):
            want = f"{low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise self.error(f"wrong number of args for {name}: want {want} got {count}", ident.at)
        args = args or []
        if name == "printf" and args and isinstance(args[0], _Literal) and isinstance(args[0].literal, str):
            try:
                format_parts(args[0].literal)
            except FunctionError as fail:
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
