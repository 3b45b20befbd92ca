"""Go's values as Go's text/template prints and compares them, and the functions a template
may call (common/go_template.py renders; this module says what a value looks like): Go's
printing (``<no value>``, ``[a b]``, ``map[k:v]``, 1.5, 2), ``printf``'s verbs, and Ollama's
``json``, which writes what Go's json.Marshal writes."""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

MAX_OUTPUT = 4 * 1024 * 1024  # of a rendered template, and of any string a function builds


class JsonMap(dict):
    """A map whose Go value has a String method printing JSON (Ollama's tools and tool-call
    arguments). Fields are looked up by Go name; it prints, and ``json`` encodes it, as
    ``json_value`` (the wire form, lowercase keys), or as itself when that is None."""

    def __init__(self, fields: dict[str, Any], json_value: Any = None) -> None:
        super().__init__(fields)
        self.json_value = self if json_value is None else json_value


class JsonList(list):
    """A list that prints as JSON, as Ollama's ``Tools`` does."""


class FunctionError(Exception):
    """A function's error, given its position by the call that made it."""


# ---------------------------------------------------------------- values and printing

def truth(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings, lists and maps are false."""
    if value is None:
        return False
    if isinstance(value, (bool, int, float, str, list, tuple, dict)):
        return bool(value)
    return True


def go_type(value: Any) -> str:
    if value is None:
        return "<nil>"
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float64"), (str, "string"),
                       ((list, tuple), "[]interface {}"), (dict, "map[string]interface {}")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def key_order(key: Any) -> tuple:
    """Go's order for map keys (fmt and range sort them): numbers, then strings."""
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        return (0, key, "")
    return (1, 0, key) if isinstance(key, str) else (2, 0, str(key))


def sprint_one(value: Any) -> str:
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
        pairs = (f"{sprint_one(k)}:{sprint_one(value[k])}" for k in sorted(value, key=key_order))
        return "map[" + " ".join(pairs) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(sprint_one(v) for v in value) + "]"
    return str(value)


def _sprint(*args: Any) -> str:
    """Go's ``fmt.Sprint``: a space between operands when neither is a string."""
    out = _Bounded()
    for i, arg in enumerate(args):
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(sprint_one(arg))
    return "".join(out)


def _sprintln(*args: Any) -> str:
    """Go's ``fmt.Sprintln``: spaces between all operands, and a newline."""
    out = _Bounded()
    for i, arg in enumerate(args):
        out.append(" " if i else "")
        out.append(sprint_one(arg))
    out.append("\n")
    return "".join(out)


class _Bounded(list):
    """The pieces of a string a function builds, failing before they pass MAX_OUTPUT: a short
    template can print a long value many times over."""

    size = 0

    def append(self, piece: str) -> None:
        self.size += len(piece)
        if self.size > MAX_OUTPUT:
            raise FunctionError(f"the text built is over {MAX_OUTPUT >> 20} MiB")
        super().append(piece)


def _go_float(value: float, json_style: bool) -> str:
    """Shortest digits that read back as ``value``, laid out as Go's ``%v`` (exponent form
    below 1e-4 or from 1e6: "1e+06") or as its encoding/json (below 1e-6 or from 1e21: "1e-7")."""
    if math.isnan(value) or math.isinf(value):
        if json_style:
            raise FunctionError(f"json: unsupported value: {value}")
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
        return "{" + ",".join(f"{_go_json(k if isinstance(k, str) else sprint_one(k))}:{_go_json(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_go_json(v) for v in value) + "]"
    raise FunctionError(f"json: unsupported type {type(value).__name__}")


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


def format_parts(fmt: str) -> list[Any]:
    """Text pieces and (flags, width, precision, verb) for each verb; FunctionError on verbs we lack.
    A width or precision of "*" is taken from the arguments (Granite's templates count with it)."""
    parts: list[Any] = []
    pos = 0
    while (start := fmt.find("%", pos)) >= 0:
        parts.append(fmt[pos:start])
        match = _VERB.match(fmt, start)
        flags, width, precision, verb = match.groups()
        if verb not in ("s", "d", "v", "q", "f", "%"):
            raise FunctionError(f"printf {match.group()!r} is not supported: use %s, %d, %v, %q, %f or %% "
                        "with an optional width, precision and - or 0 flag")
        if precision is not None and precision != "*":
            precision = int(precision or 0)
        parts.append((flags, width if width in ("", "*") else int(width), precision, verb))
        pos = match.end()
    parts.append(fmt[pos:])
    return parts


def _sprintf(fmt: Any, *args: Any) -> str:
    """Go's ``fmt.Sprintf`` for the verbs in format_parts, with its %!v(MISSING) and EXTRA notes."""
    if not isinstance(fmt, str):
        raise FunctionError(f"the format must be a string, not {go_type(fmt)}")
    out, queue = _Bounded(), list(args)
    for part in format_parts(fmt):
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
                raise FunctionError(f"printf width or precision over {MAX_OUTPUT} is too large")
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
            return "map[" + " ".join(f"{item(k)}:{item(value[k])}" for k in sorted(value, key=key_order)) + "]"
        return "[" + " ".join(item(v) for v in value) + "]"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if verb == "v" and not (precision is not None and isinstance(value, (str, float))):
        return sprint_one(value)
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
    return "<nil>" if value is None else f"{go_type(value)}={sprint_one(value)}"


# ---------------------------------------------------------------- functions

def _len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())  # Go counts bytes
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    raise FunctionError("len of nil pointer" if value is None else f"len of type {go_type(value)}")


def _index(item: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(item, dict):
            try:
                item = item.get(key)
            except TypeError:
                raise FunctionError(f"value has type {go_type(key)}; it cannot be a map key") from None
            continue
        if item is None:
            raise FunctionError("index of untyped nil")
        if not isinstance(item, (list, tuple, str)):
            raise FunctionError(f"can't index item of type {go_type(item)}")
        if not isinstance(key, int) or isinstance(key, bool):
            raise FunctionError(f"cannot index slice/array with type {go_type(key)}")
        sequence = item.encode() if isinstance(item, str) else item  # a string's items are its bytes
        if not 0 <= key < len(sequence):
            raise FunctionError(f"index out of range: {key}")
        item = sequence[key]
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise FunctionError("slice of untyped nil")
    if not isinstance(item, (list, tuple, str)):
        raise FunctionError(f"can't slice item of type {go_type(item)}")
    if len(indexes) == 3 and isinstance(item, str):
        raise FunctionError("cannot 3-index slice a string")
    sequence = item.encode() if isinstance(item, str) else item
    for index in indexes:
        if not isinstance(index, int) or isinstance(index, bool):
            raise FunctionError(f"cannot index slice/array with type {go_type(index)}")
        if not 0 <= index <= len(sequence):
            raise FunctionError(f"index out of range: {index}")
    low = indexes[0] if indexes else 0
    high = indexes[1] if len(indexes) > 1 else len(sequence)
    if low > high:
        raise FunctionError(f"invalid slice index: {low} > {high}")
    if len(indexes) == 3 and indexes[2] < high:
        raise FunctionError(f"invalid slice index: {high} > {indexes[2]}")
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
                raise FunctionError("incompatible types for comparison")
        elif _kind(first) == "other":
            raise FunctionError(f"non-comparable type {go_type(first)}")
        elif first == other:
            return True
    return False


def _lt(first: Any, second: Any) -> bool:
    if _kind(first) in ("nil", "bool", "other") or _kind(second) in ("nil", "bool", "other"):
        raise FunctionError("invalid type for comparison")
    if _kind(first) != _kind(second):
        raise FunctionError("incompatible types for comparison")
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
    except FunctionError:
        return ""  # as Ollama's json, which drops json.Marshal's error


def _date(days_ago: int) -> Callable[..., str]:
    return lambda *_: (datetime.date.today() - datetime.timedelta(days=days_ago)).isoformat()


# name: (fewest arguments, most or None, the function); "and" and "or" are evaluated in _Call.
FUNCTIONS: dict[str, tuple[int, int | None, Callable[..., Any] | None]] = {
    "and": (1, None, None),
    "or": (1, None, None),
    "not": (1, 1, lambda value: not truth(value)),
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
