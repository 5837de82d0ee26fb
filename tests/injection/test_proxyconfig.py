"""The `proxy.istio.io/config` parser: YAML's answer on the subset it reads, a clear refusal
for the rest, and bounds on size and depth that hold whatever the text."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector.injection import proxyconfig
from injector.injection.proxyconfig import ProxyConfigError, parse


@pytest.mark.parametrize("text", [
    "holdApplicationUntilProxyStarts: true\n",
    '{"holdApplicationUntilProxyStarts": false}',
    '{"a":true,"b":["x",{"c":null}]}',
    "{holdApplicationUntilProxyStarts: yes}",
    "---\nholdApplicationUntilProxyStarts: on\n",
    "proxyMetadata:\n  A: 'it''s'\n  B: \"tab\\there \\u00e9\"\ntracing:\n  zipkin:\n"
    "    address: zipkin.istio-system:9411  # a comment\n",
    "list:\n- a\n- b: c\n  d: e\n- - x\n  - y\nnext: {a: [p, q], b: }\nz: ~\n",
    "key:\n  - x\n  - y\nother: value with spaces\n",
    "", "# only a comment\n", "{a:1}", "[a, b,]", "{a, b: c}", "url: http://x:80/a#frag",
    '"quoted key": v', "a: -1x", "a: x#not-a-comment", "\r\na: b\r\n",
])
def test_the_subset_reads_as_yaml_reads_it(text: str) -> None:
    assert parse(text) == yaml.safe_load(text)


def test_tabs_in_blank_and_comment_lines_are_blanks() -> None:
    # YAML allows them there (PyYAML refuses them all the same).
    assert parse("a:\n\t\n  b: c\n \t# a comment after a tab\n") == {"a": {"b": "c"}}


@pytest.mark.parametrize(("text", "reason"), [
    ("a: 1\n  b: 2", "not indented"),
    ("a: b: c", "mapping cannot be written after a key"),
    ("a: &x 1", "anchors"),
    ("a: *x", "aliases"),
    ("a: !tag x", "tags"),
    ("a: |\n  x", "block scalars"),
    ("a: >\n  x", "block scalars"),
    ("? a\n: b", "complex keys"),
    ("a: 1\na: 2", "given twice"),
    ('{"a": 1, "a": 2}', "given twice"),
    ("{a: 1", "never closed"),
    ("[a, b", "never closed"),
    ("{a: 1}}", "unexpected"),
    ("a:\n\tb: 1", "tab in the indentation"),
    ("a: 1\n---\nb: 2", "one YAML document"),
    ("a: 'unterminated", "must end on its line"),
    ("first line\nsecond line", "over several lines"),
    ('a: "\\q"', "escape"),
])
def test_what_the_subset_does_not_read_is_refused_with_the_reason(text: str,
                                                                  reason: str) -> None:
    with pytest.raises(ProxyConfigError, match=reason):
        parse(text)


@pytest.mark.parametrize(("text", "bound"), [
    ("[" + "1," * 130_000 + "1]", "longer than"),  # the 256 KiB flow list
    ("a: " + "x" * proxyconfig.MAX_CHARS, "longer than"),
    ("a: b\n" * proxyconfig.MAX_LINES, "lines"),
    ("[" + "1," * (proxyconfig.MAX_TOKENS // 2 + 1) + "1]", "scalars and punctuation"),
    ("[" * (proxyconfig.MAX_DEPTH + 1) + "]" * (proxyconfig.MAX_DEPTH + 1), "deeper"),
    ("a:\n" + "".join("  " * level + f"k{level}:\n" for level in range(1, 20)), "deeper"),
    ("a: " + "[" * proxyconfig.MAX_DEPTH + "]" * proxyconfig.MAX_DEPTH, "deeper"),
])
def test_past_a_bound_it_is_refused_naming_the_bound(text: str, bound: str) -> None:
    with pytest.raises(ProxyConfigError, match=bound):
        parse(text)


def test_at_the_bounds_it_still_reads() -> None:
    depth = proxyconfig.MAX_DEPTH
    assert parse("[" * depth + "]" * depth) is not None
    assert len(parse("[" + ",".join(["a"] * (proxyconfig.MAX_TOKENS // 2 - 1)) + "]")) == (
        proxyconfig.MAX_TOKENS // 2 - 1)


# Documents of the kinds the parser reads: text, booleans and null in objects and lists.
scalars = st.one_of(st.none(), st.booleans(),
                    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12))
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=8), inner,
    max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=st.dictionaries(st.text(min_size=1, max_size=8).filter(str.isprintable),
                                documents, max_size=5),
       style=st.sampled_from(["block", "flow", "json"]))
def test_what_yaml_and_json_write_reads_back(document: dict[str, Any], style: str) -> None:
    if style == "json":
        text = json.dumps(document)
    else:
        text = yaml.safe_dump(document, default_flow_style=style == "flow", width=10**9,
                              allow_unicode=True)
    if len(text) > proxyconfig.MAX_CHARS:
        return
    try:
        parsed = parse(text)
    except ProxyConfigError as error:
        # What safe_dump writes of a key or text it cannot put plainly on one line.
        assert any(word in str(error) for word in ("over several lines", "complex keys",
                                                   "deeper", "scalars")), (text, error)
        return
    # JSON reads as JSON (PyYAML keeps a surrogate pair's halves apart; JSON joins them).
    assert parsed == (json.loads(text) if style == "json" else yaml.safe_load(text))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet=st.sampled_from(list("ab: -\n\t[]{},#'\"&*!|>?%@`\\~")),
                    max_size=80))
def test_any_text_is_read_or_refused_never_crashes(text: str) -> None:
    with contextlib.suppress(ProxyConfigError):
        parse(text)


def test_it_is_safe_to_call_from_threads_at_once() -> None:
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(200):
                assert parse("a:\n  b: [x, y]\n") == {"a": {"b": ["x", "y"]}}
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
