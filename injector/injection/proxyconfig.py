"""The `proxy.istio.io/config` annotation (a ProxyConfig in YAML), read by a parser of our own.

The annotation is free text from whoever writes the pod, and the webhook reads it while the
API server waits. PyYAML cannot be trusted with it: its cost grows faster than its input (a
256 KiB flow list took 11.8 s on the event loop, past the API server's 10 s timeout) and it
recurses once per level of nesting. This parser reads, in one pass and without recursion, the
part of YAML a ProxyConfig is written in, within fixed bounds, so the worst input costs about
as much as a typical one (under 0.2 ms at the bounds; `bench/bench_fuzz.py` measures it):

- at most MAX_CHARS characters, MAX_LINES lines, MAX_TOKENS scalars and punctuation marks,
  MAX_DEPTH levels of nesting;
- block mappings and sequences indented by spaces (`key: value`, `- item`), flow collections
  (`{a: 1, b: [x, y]}`, hence JSON; over several lines only as the whole document), plain,
  'single-' and "double-quoted" scalars on one line, comments, a leading `---`.

Everything else YAML allows is refused with the reason, never guessed at: anchors, aliases,
tags, block scalars (`|`, `>`), complex keys (`?`), directives, more than one document, a plain
or quoted scalar over several lines, tabs in indentation, a key given twice. Plain scalars
resolve as YAML 1.1 (and so PyYAML) resolves nulls and booleans (`~`, `true`, `yes`, `off`...);
every other scalar stays text. `check` then holds the result to Istio's ProxyConfig, field by
field.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from injector.errors import InvalidInput

MAX_CHARS = 4096
MAX_LINES = 64
MAX_TOKENS = 256
MAX_DEPTH = 16


class ProxyConfigError(InvalidInput):
    """The annotation is not a ProxyConfig this parser reads; the message says why and where."""


_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE = frozenset({"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"})
_FALSE = frozenset({"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"})

_DOUBLE = r'"(?:[^"\\\n]++|\\.)*+"'
_SINGLE = r"'(?:[^'\n]++|'')*+'"
# A plain scalar's first character may not be an indicator; `-`, `?` and `:` may start one
# when a non-blank follows (`-1`, `:x`).
_PLAIN_FIRST_FLOW = r"(?:[^ \t\r\n,\[\]{}#&*!|>'\"%@`?:-]|[?:-](?=[^ \t\r\n,\[\]{}]))"
_PLAIN_FIRST_BLOCK = r"(?:[^ \t\r\n,\[\]{}#&*!|>'\"%@`?:-]|[?:-](?=[^ \t\r\n]))"
# Then anything but `: ` and ` #`; in flow context, no flow indicators either. Blanks inside
# only when more of the scalar follows on the line. Possessive (`*+`): a plain scalar is always
# the longest one, so nothing is gained by backtracking into it, and a line that fails to be a
# `key:` fails in one pass.
_PLAIN_REST_FLOW = (r"(?:[^ \t\r\n:,\[\]{}#]++|:(?=[^ \t\r\n,\[\]{}])|(?<![ \t])\#"
                    r"|[ \t]++(?=[^ \t\r\n:,\[\]{}#]))*+")
_PLAIN_REST_BLOCK = (r"(?:[^ \t\r\n:#]++|:(?=[^ \t\r\n])|(?<![ \t])\#"
                     r"|[ \t]++(?=[^ \t\r\n:#]))*+")

_FLOW_TOKEN = re.compile(
    r"(?P<blank>[ \t\r\n]+(?:\#[^\n]*)?)"
    r"|(?P<open>[\[{])|(?P<close>[\]}])|(?P<comma>,)"
    # `:` then a blank or a flow indicator; or straight after a quoted key, as JSON writes it.
    r"|(?P<colon>:(?=[ \t\r\n,\[\]{}]|$)|(?<=[\"']):)"
    rf"|(?P<double>{_DOUBLE})|(?P<single>{_SINGLE})"
    rf"|(?P<plain>{_PLAIN_FIRST_FLOW}{_PLAIN_REST_FLOW})"
    r"|(?P<other>[\s\S])"
)
_BLOCK_SCALAR = re.compile(rf"{_DOUBLE}|{_SINGLE}|{_PLAIN_FIRST_BLOCK}{_PLAIN_REST_BLOCK}")
_KEY = re.compile(
    rf"(?P<key>{_DOUBLE}|{_SINGLE}|{_PLAIN_FIRST_BLOCK}{_PLAIN_REST_BLOCK})[ \t]*:(?:[ \t]+|$)"
)
_AFTER_VALUE = re.compile(r"[ \t]*(?:\#.*)?")  # what may end a line after its value

_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v",
            "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
            "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}
_HEX_ESCAPE = {"x": 2, "u": 4, "U": 8}
_ESCAPE = re.compile(r"\\(?:[xuU][0-9A-Fa-f]*|[\s\S])")
_UNSUPPORTED = {"&": "anchors", "*": "aliases", "!": "tags", "|": "block scalars",
                ">": "block scalars", "%": "directives", "?": "complex keys",
                "@": "reserved indicators", "`": "reserved indicators"}


def _unescape(escape: re.Match[str]) -> str:
    text = escape.group()
    kind = text[1]
    if kind in _HEX_ESCAPE:
        digits = text[2:]
        if len(digits) < _HEX_ESCAPE[kind]:
            raise ProxyConfigError(f"a bad escape {text!r} in a double-quoted string")
        return chr(int(digits[: _HEX_ESCAPE[kind]], 16)) + digits[_HEX_ESCAPE[kind]:]
    if kind not in _ESCAPES:
        raise ProxyConfigError(f"an unknown escape {text!r} in a double-quoted string")
    return _ESCAPES[kind]


def _quoted(token: str) -> str:
    """The text of a quoted scalar token (with its quotes)."""
    if token[0] == "'":
        return token[1:-1].replace("''", "'")
    if "\\" not in token:
        return token[1:-1]
    try:
        decoded: str = orjson.loads(token)  # JSON's escapes are YAML's, bar a few
        return decoded
    except orjson.JSONDecodeError:
        pass
    try:
        return _ESCAPE.sub(_unescape, token[1:-1])
    except (ValueError, OverflowError):
        raise ProxyConfigError(f"a bad escape in the double-quoted string {token}") from None


def _plain(token: str) -> Any:
    """A plain scalar resolved as YAML 1.1 resolves nulls and booleans; text otherwise."""
    if token in _NULLS:
        return None
    if token in _TRUE:
        return True
    if token in _FALSE:
        return False
    return token


class _Budget:
    """Tokens left to read: a hard bound on the work, whatever the shape of the text."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_TOKENS

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise ProxyConfigError(f"more than {MAX_TOKENS} scalars and punctuation marks")


# Flow parsing: one frame per open collection, with what it expects next.
_LIST_VALUE, _LIST_SEPARATOR, _MAP_KEY, _MAP_COLON, _MAP_VALUE, _MAP_SEPARATOR = range(6)
_NOTHING: Any = object()


def _flow(text: str, depth: int, budget: _Budget, where: str) -> Any:
    """One flow collection (or scalar) spanning all of `text`, `depth` levels down already."""
    root = _NOTHING
    # [collection, state, pending key]
    frames: list[list[Any]] = []
    for token in _FLOW_TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "blank":
            continue
        budget.spend()
        if kind == "other":
            character = token.group()
            problem = _UNSUPPORTED.get(character, f"an unexpected {character!r}")
            raise ProxyConfigError(f"{where}: {problem} at offset {token.start()}")
        top = frames[-1] if frames else None
        state = top[1] if top is not None else None
        value: Any = _NOTHING
        if kind == "double" or kind == "single" or kind == "plain":
            text_value = token.group()
            if top is not None and state == _MAP_KEY:
                key = _quoted(text_value) if kind != "plain" else text_value
                if key in top[0]:
                    raise ProxyConfigError(f"{where}: the key {key!r} is given twice")
                top[2], top[1] = key, _MAP_COLON
                continue
            value = _quoted(text_value) if kind != "plain" else _plain(text_value)
        elif kind == "open":
            if state not in (None, _LIST_VALUE, _MAP_VALUE) or (top is None
                                                                 and root is not _NOTHING):
                raise ProxyConfigError(f"{where}: an unexpected {token.group()!r}"
                                       f" at offset {token.start()}")
            if depth + len(frames) >= MAX_DEPTH:
                raise ProxyConfigError(f"nested deeper than {MAX_DEPTH} levels")
            frames.append([{}, _MAP_KEY, None] if token.group() == "{"
                          else [[], _LIST_VALUE, None])
            continue
        elif kind == "close":
            closing_map = token.group() == "}"
            if top is None or isinstance(top[0], dict) is not closing_map:
                raise ProxyConfigError(f"{where}: an unexpected {token.group()!r}"
                                       f" at offset {token.start()}")
            if state in (_MAP_COLON, _MAP_VALUE):
                top[0][top[2]] = None  # `{a}` and `{a: }`: a null value
            frames.pop()
            value = top[0]
            top = frames[-1] if frames else None
            state = top[1] if top is not None else None
        elif kind == "comma":
            if top is None or state not in (_LIST_SEPARATOR, _MAP_SEPARATOR, _MAP_COLON,
                                            _MAP_VALUE):
                raise ProxyConfigError(f"{where}: an unexpected ',' at offset {token.start()}")
            if state in (_MAP_COLON, _MAP_VALUE):
                top[0][top[2]] = None  # `{a, b}` and `{a: , b}`: a null value
            top[1] = _LIST_VALUE if state == _LIST_SEPARATOR else _MAP_KEY
            continue
        else:  # colon
            if top is None or state != _MAP_COLON:
                raise ProxyConfigError(f"{where}: an unexpected ':' at offset {token.start()}")
            top[1] = _MAP_VALUE
            continue
        # A whole value: a scalar, or a collection just closed.
        if top is None:
            if root is not _NOTHING:
                raise ProxyConfigError(f"{where}: more after the value, at offset "
                                       f"{token.start()}")
            root = value
        elif state == _LIST_VALUE:
            top[0].append(value)
            top[1] = _LIST_SEPARATOR
        elif state == _MAP_VALUE:
            top[0][top[2]] = value
            top[1] = _MAP_SEPARATOR
        else:
            raise ProxyConfigError(f"{where}: a value where ',' or a closing bracket belongs, "
                                   f"at offset {token.start()}")
    if frames:
        raise ProxyConfigError(f"{where}: a '[' or '{{' that is never closed")
    return None if root is _NOTHING else root


def _inline_value(rest: str, depth: int, budget: _Budget, where: str) -> Any:
    """The value written after `key:` or `- ` on one line; _NOTHING when it is on the lines
    that follow (the line ends, or holds only a comment)."""
    if not rest or rest[0] == "#":
        return _NOTHING
    first = rest[0]
    if first in "[{":
        return _flow(rest, depth, budget, where)
    if first in _UNSUPPORTED:
        raise ProxyConfigError(f"{where}: {_UNSUPPORTED[first]} are not supported")
    budget.spend()
    scalar = _BLOCK_SCALAR.match(rest)
    if scalar is None and first in "\"'":
        raise ProxyConfigError(f"{where}: a quoted string must end on its line")
    if scalar is None:
        raise ProxyConfigError(f"{where}: cannot read {rest[:40]!r}")
    if _AFTER_VALUE.fullmatch(rest, scalar.end()) is None:
        after = rest[scalar.end():].lstrip()
        if first in "\"'":
            raise ProxyConfigError(f"{where}: a quoted string must end on its line, followed by "
                                   f"nothing but a comment")
        problem = ("a mapping cannot be written after a key on the same line"
                   if after.startswith(":") else f"cannot read {after[:40]!r}")
        raise ProxyConfigError(f"{where}: {problem}")
    token = scalar.group()
    return _quoted(token) if first in "\"'" else _plain(token)


class _Block:
    """A collection of the block being read: its indentation, and the slot (key or index)
    still waiting for a value written on the lines below."""

    __slots__ = ("indent", "node", "pending", "under_key")

    def __init__(self, indent: int, node: dict[str, Any] | list[Any], under_key: bool) -> None:
        self.indent = indent
        self.node = node
        self.pending: Any = _NOTHING
        # A sequence written at its key's own indentation (`key:` then `- a`): it ends at the
        # next key of that mapping, not at a shallower line.
        self.under_key = under_key


def _block(lines: list[str], first: int, budget: _Budget) -> Any:
    """The block document in `lines` (numbered from `first`)."""
    root: Any = _NOTHING
    stack: list[_Block] = []

    def open_collection(indent: int, node: dict[str, Any] | list[Any], where: str) -> None:
        """Find where a collection at `indent` starts: as the root, or the value of the
        deepest collection's pending slot."""
        nonlocal root
        top = stack[-1] if stack else None
        under_key = False
        if top is None:
            if root is not _NOTHING:
                raise ProxyConfigError(f"{where}: more after the document's value")
            root = node
        elif top.pending is not _NOTHING and (
                indent > top.indent
                or (indent == top.indent and isinstance(node, list)
                    and isinstance(top.node, dict))):
            under_key = indent == top.indent
            top.node[top.pending] = node
            top.pending = _NOTHING
        else:
            raise ProxyConfigError(f"{where}: not indented as the lines before it")
        if len(stack) >= MAX_DEPTH:
            raise ProxyConfigError(f"nested deeper than {MAX_DEPTH} levels")
        stack.append(_Block(indent, node, under_key))

    def collection(indent: int, kind: type, where: str) -> _Block:
        """The collection of `kind` a line at `indent` adds to, opened if need be."""
        while stack and stack[-1].indent > indent:
            stack.pop()
        top = stack[-1] if stack else None
        if (top is not None and top.indent == indent and kind is dict
                and isinstance(top.node, list) and top.under_key):
            stack.pop()  # `key:` / `- a` / `next:`: the sequence under `key` ends here
            top = stack[-1]
        if top is not None and top.indent == indent and isinstance(top.node, kind):
            top.pending = _NOTHING  # what was pending stays null
            return top
        open_collection(indent, {} if kind is dict else [], where)
        return stack[-1]

    for number, raw in enumerate(lines, first):
        where = f"line {number}"
        line = raw.rstrip("\r")
        content = line.lstrip(" ")
        significant = content.lstrip(" \t")  # tabs may stand in blank and comment lines
        if not significant or significant[0] == "#":
            continue
        indent = len(line) - len(content)
        if content[0] == "\t":
            raise ProxyConfigError(f"{where}: a tab in the indentation")
        if indent == 0 and (content in ("---", "...") or content.startswith(("--- ", "... "))):
            raise ProxyConfigError(f"{where}: only one YAML document is read")
        while True:
            if content == "-" or content.startswith(("- ", "-\t")):
                sequence = collection(indent, list, where)
                assert isinstance(sequence.node, list)
                rest = content[1:]
                content = rest.lstrip(" \t")
                item_indent = indent + 1 + len(rest) - len(content)
                if content.startswith(("- ", "-\t")) or content == "-" or _KEY.match(content):
                    # A sequence or a mapping starts on the item's line: read it there.
                    sequence.node.append(None)
                    sequence.pending = len(sequence.node) - 1
                    indent = item_indent
                    continue
                value = _inline_value(content, len(stack), budget, where)
                sequence.node.append(None if value is _NOTHING else value)
                if value is _NOTHING:
                    sequence.pending = len(sequence.node) - 1
                break
            entry = _KEY.match(content)
            if entry is None:
                if not stack and root is _NOTHING:
                    # A document that is a single scalar (or a flow collection on one line).
                    root = _inline_value(content, 0, budget, where)
                    if root is _NOTHING:
                        root = None
                    break
                raise ProxyConfigError(f"{where}: expected 'key: value' or '- item' (a scalar "
                                       "over several lines is not read)")
            mapping = collection(indent, dict, where)
            assert isinstance(mapping.node, dict)
            budget.spend()
            token = entry.group("key")
            key = _quoted(token) if token[0] in "\"'" else token
            if key in mapping.node:
                raise ProxyConfigError(f"{where}: the key {key!r} is given twice")
            value = _inline_value(content[entry.end():], len(stack), budget, where)
            mapping.node[key] = None if value is _NOTHING else value
            if value is _NOTHING:
                mapping.pending = key
            break
    return None if root is _NOTHING else root


def parse(text: str) -> Any:
    """The annotation's value: dicts, lists, str, bool and None (an empty text is None).

    Raises ProxyConfigError for text past the bounds or outside the subset read.
    """
    if len(text) > MAX_CHARS:
        raise ProxyConfigError(f"longer than {MAX_CHARS} characters")
    if text.count("\n") >= MAX_LINES:
        raise ProxyConfigError(f"more than {MAX_LINES} lines")
    budget = _Budget()
    lines = text.split("\n")
    # Skip blank and comment lines, and one leading `---`, to see how the document starts.
    start = 0
    while start < len(lines):
        stripped = lines[start].strip(" \t\r")
        if stripped and stripped[0] != "#":
            break
        start += 1
    if start < len(lines) and (lines[start].rstrip(" \t\r") == "---"
                               or lines[start].startswith("--- ")):
        lines[start] = lines[start][3:]
        if not lines[start].strip(" \t\r"):
            start += 1
    body = "\n".join(lines[start:]).strip(" \t\r\n")
    if body[:1] in ("[", "{"):
        return _flow(body, 0, budget, "the flow collection")
    return _block(lines[start:], start + 1, budget)


# --- The ProxyConfig's fields ---------------------------------------------------------------------
# Istio's ProxyConfig (istio.io/api mesh/v1alpha1/proxy.proto), as protojson reads it from the
# YAML: every top-level field by its JSON name (protojson also takes the proto name, snake_case),
# with what its value must be. A field the injector acts on is read by `injector.injection.
# overrides`; the others are checked and carried no further (our agent is not pilot-agent).
# Messages are checked to be mappings, and the two small ones (`image`, `proxyStatsMatcher`)
# field by field.
_STRING, _DURATION, _INT32, _UINT32, _BOOL = "string", "duration", "int32", "uint32", "bool"
_MAP, _STRINGS, _MESSAGE = "map of strings", "list of strings", "mapping"
_ENUMS: dict[str, tuple[str, ...]] = {
    "interceptionMode": ("REDIRECT", "TPROXY", "NONE"),
    "controlPlaneAuthPolicy": ("NONE", "MUTUAL_TLS", "INHERIT"),
    "tracingServiceName": ("APP_LABEL_AND_NAMESPACE", "CANONICAL_NAME_ONLY",
                           "CANONICAL_NAME_AND_NAMESPACE"),
}
FIELDS: dict[str, str] = {
    "configPath": _STRING, "binaryPath": _STRING, "serviceCluster": _STRING,
    "tracingServiceName": "enum", "drainDuration": _DURATION, "discoveryAddress": _STRING,
    "discoveryRefreshDelay": _DURATION, "zipkinAddress": _STRING, "statsdUdpAddress": _STRING,
    "envoyMetricsServiceAddress": _STRING, "proxyAdminPort": _INT32, "availabilityZone": _STRING,
    "controlPlaneAuthPolicy": "enum", "customConfigFile": _STRING, "statNameLength": _INT32,
    "concurrency": _INT32, "proxyBootstrapTemplatePath": _STRING, "interceptionMode": "enum",
    "tracing": _MESSAGE, "sds": _MESSAGE, "envoyAccessLogService": _MESSAGE,
    "envoyMetricsService": _MESSAGE, "proxyMetadata": _MAP, "runtimeValues": _MAP,
    "statusPort": _INT32, "extraStatTags": _STRINGS, "gatewayTopology": _MESSAGE,
    "terminationDrainDuration": _DURATION, "meshId": _STRING, "readinessProbe": _MESSAGE,
    "proxyStatsMatcher": "proxyStatsMatcher", "holdApplicationUntilProxyStarts": _BOOL,
    "caCertificatesPem": _STRINGS, "image": "image", "privateKeyProvider": _MESSAGE,
    "proxyHeaders": _MESSAGE, "fileFlushInterval": _DURATION, "fileFlushMinSizeKb": _UINT32,
    "statsCompression": _BOOL, "connectionSettings": _MESSAGE,
}
_SNAKE = {re.sub(r"([A-Z])", lambda match: "_" + match.group(1).lower(), name): name
          for name in FIELDS}
_STATS_MATCHER = ("inclusionPrefixes", "inclusionSuffixes", "inclusionRegexps")
# protojson's Duration: seconds, up to nine decimals, then `s`.
_DURATION_TEXT = re.compile(r"-?[0-9]{1,12}(?:\.[0-9]{1,9})?s")
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,10}")


def _integer(value: object, low: int, high: int) -> bool:
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        return low <= int(value) <= high
    return False


def _fits(kind: str, name: str, value: object) -> str | None:
    """Why `value` cannot be field `name` of kind `kind`, or None when it can."""
    if kind == _STRING:
        return None if isinstance(value, str) else "a string"
    if kind == _DURATION:
        ok = isinstance(value, str) and _DURATION_TEXT.fullmatch(value.strip()) is not None
        return None if ok else 'a duration in seconds, such as "5s" or "0.5s"'
    if kind == _INT32:
        return None if _integer(value, -(2**31), 2**31 - 1) else "a whole number"
    if kind == _UINT32:
        return None if _integer(value, 0, 2**32 - 1) else "a whole number, not negative"
    if kind == _BOOL:
        return None if isinstance(value, bool) else "true or false"
    if kind == "enum":
        return None if value in _ENUMS[name] else f"one of {', '.join(_ENUMS[name])}"
    if kind == _MAP:
        ok = isinstance(value, dict) and all(isinstance(item, str) for item in value.values())
        return None if ok else "a mapping of names to strings"
    if kind == _STRINGS:
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        return None if ok else "a list of strings"
    if kind == "image":
        ok = isinstance(value, dict) and set(value) <= {"imageType", "image_type"} and all(
            isinstance(item, str) for item in value.values())
        return None if ok else "a mapping with imageType (a string) only"
    if kind == "proxyStatsMatcher":
        known = {*_STATS_MATCHER, "inclusion_prefixes", "inclusion_suffixes",
                 "inclusion_regexps"}
        ok = isinstance(value, dict) and set(value) <= known and all(
            isinstance(item, list) and all(isinstance(text, str) for text in item)
            for item in value.values())
        return None if ok else f"a mapping of {', '.join(_STATS_MATCHER)} (lists of strings)"
    return None if isinstance(value, dict) else "a mapping"


def check(config: object) -> dict[str, Any]:
    """The parsed annotation as Istio's ProxyConfig, keyed by JSON names; ProxyConfigError
    naming the first field (in the annotation's order) that Istio would not read. Null is an
    absent field, as protojson reads it."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ProxyConfigError("expected a mapping (a ProxyConfig)")
    fields: dict[str, Any] = {}
    for key, value in config.items():
        name = key if key in FIELDS else _SNAKE.get(key)
        if name is None:
            raise ProxyConfigError(f"{str(key)[:64]!r} is not a field of Istio's ProxyConfig")
        if name in fields:
            raise ProxyConfigError(f"{name} is given twice")
        if value is None:
            continue
        problem = _fits(FIELDS[name], name, value)
        if problem is not None:
            raise ProxyConfigError(f"{name} must be {problem}")
        fields[name] = value
    if "serviceCluster" in fields and "tracingServiceName" in fields:
        raise ProxyConfigError("serviceCluster and tracingServiceName exclude each other")
    return fields
