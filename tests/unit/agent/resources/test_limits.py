"""`meshagent apply` input is bounded before any schema work: bytes read, each document's size with
its aliases expanded, and go-yaml's alias ratio (issue 13, "Bounded under abuse").

Bounded time is shown without a clock: each bomb here would take hours or terabytes if it were
expanded, and the error names a line near the top of the file, where composing stopped.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from agent.resources import (
    MAX_BYTES,
    MAX_DOCUMENT_BYTES,
    Limits,
    ResourceError,
    check_apply_size,
    format_size,
    load_paths,
    parse_documents,
    parse_size,
    validate,
)
from agent.resources._limits import allowed_alias_ratio, excessive_aliasing, json_size

HEAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bomb}\nspec:\n" \
       "  endpointSelector: {matchLabels: {app: x}}\n"


def one_line(text: str, limits: Limits | None = None, source: str = "bomb.yaml") -> str:
    with pytest.raises(ResourceError) as info:
        parse_documents(text, source, limits)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{source}: "), message
    return message


def line_of(message: str) -> int:
    m = re.search(r"line (\d+)", message)
    assert m, message
    return int(m[1])


def exponential_bomb(levels: int = 12, fan: int = 10) -> str:
    """Billion laughs: 10^12 nodes from 1.5 KB, every alias where the schema takes a list of rules."""
    lines = [HEAD.rstrip("\n"), "  ingress: &l0 [{fromEntities: [world]}, {fromEntities: [host]}]"]
    for i in range(1, levels):
        lines.append(f"  egress{'Deny' if i % 2 else ''}{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def wide_bomb(items: int = 1000, aliases: int = 50_000) -> str:
    """One big anchored rule, aliased from many list entries: shaped to pass the schema."""
    cidrs = ", ".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(items))
    return HEAD + "  ingress:\n  - &rule {fromCIDR: [" + cidrs + "]}\n" + "  - *rule\n" * aliases


def big_annotations(aliases: int = 400, width: int = 10_000) -> str:
    """Under the alias ratio (few, big aliases) and valid, but 4 MB as JSON."""
    lines = ["apiVersion: v1", "kind: Service", "metadata:", "  name: web", "  annotations:",
             f"    a0: &d {'x' * width}"]
    lines += [f"    a{i}: *d" for i in range(1, aliases)]
    return "\n".join(lines) + "\nspec: {ports: [{port: 80}]}\n"


# --- alias bombs ---------------------------------------------------------------------------------


def test_exponential_alias_bomb_is_refused_without_expanding_it():
    text = exponential_bomb()
    message = one_line(text)
    assert "document 1: excessive aliasing at line" in message
    assert "Kubernetes' YAML decoder (go-yaml)" in message and "write the repeated parts out" in message
    assert line_of(message) < 10 < text.count("\n") == 17  # in the first levels; the last alone is 10^11 nodes


def test_wide_alias_bomb_is_refused_long_before_its_end():
    text = wide_bomb()
    message = one_line(text)
    assert "excessive aliasing" in message
    assert line_of(message) < 200 < text.count("\n")


def test_merge_key_bomb_is_refused():
    # `<<` merges copy the merged pairs into each mapping while PyYAML constructs: exponential too.
    lines = ["a0: &a0 {k0: x, k1: y}"]
    for i in range(1, 25):
        lines.append(f"a{i}: &a{i} {{<<: [*a{i - 1}], n{i}: [*a{i - 1}, *a{i - 1}]}}")
    assert "excessive aliasing" in one_line("\n".join(lines) + "\n")


def test_an_anchor_used_inside_itself_is_refused():
    message = one_line(HEAD + "  ingress: &r [{fromEntities: [world]}, *r]\n")
    assert "malformed YAML at line 6" in message and "anchor 'r' is used inside its own value" in message


def test_small_documents_may_alias_freely():
    # go-yaml's floor: up to 100 aliased nodes, or 1,000 nodes in all, whatever the ratio.
    text = HEAD + "  ingress:\n  - &r {fromEntities: [world]}\n" + "  - *r\n" * 90
    (r,) = parse_documents(text, "ok.yaml")
    assert len(r.body["spec"]["ingress"]) == 91


def test_go_yaml_ratio():
    assert allowed_alias_ratio(1_000) == allowed_alias_ratio(400_000) == 0.99
    assert allowed_alias_ratio(4_000_000) == allowed_alias_ratio(10**9) == 0.10
    assert allowed_alias_ratio(2_200_000) == pytest.approx(0.545)
    assert not excessive_aliasing(100, 10_000)  # the floor
    assert not excessive_aliasing(990, 1_000)
    assert excessive_aliasing(992, 1_001)
    assert not excessive_aliasing(1_000_000, 10_000_000)


# --- sizes ---------------------------------------------------------------------------------------


def test_a_bomb_under_the_alias_ratio_cannot_pass_the_document_size():
    text = big_annotations()
    assert len(text) < 20_000
    message = one_line(text)
    assert message.startswith("bomb.yaml: document 1: the document is larger than 3 MiB as JSON with its "
                              "aliases expanded (by line ")
    assert message.endswith("the most one document may be; to raise the limit, set "
                            "MESHAGENT_APPLY_MAX_DOCUMENT_BYTES")
    assert line_of(message) < 400


def test_raising_the_document_limit_lets_a_big_document_through():
    (r,) = parse_documents(big_annotations(), "big.yaml", Limits(max_document_bytes=8 << 20))
    assert 4_000_000 < r.size < 4_200_000
    assert len(json.dumps(r.body)) <= r.size


def test_a_huge_document_without_aliases_stops_at_the_limit():
    rule = "  - {fromEntities: [world], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}\n"
    text = HEAD + "  ingress:\n" + rule * 60_000  # 4.7 MB of YAML: under max_bytes, over the document limit
    message = one_line(text, Limits(max_document_bytes=256 << 10), source="huge.yaml")
    assert "huge.yaml: document 1: the document is larger than 256 KiB" in message
    assert line_of(message) < 4_000  # composing stopped there: the rest of the file was never built


def test_document_limit_counts_each_document_alone():
    doc = big_annotations(aliases=150)  # ~1.5 MB as JSON each
    resources = parse_documents(doc + "---\n" + doc.replace("name: web", "name: web2"), "two.yaml")
    assert len(resources) == 2


def test_documents_that_each_fit_may_not_add_up_past_the_apply_limit():
    docs = [big_annotations(aliases=150).replace("name: web", f"name: web{i}") for i in range(6)]
    text = "---\n".join(docs)
    assert len(text) < 100_000  # each document about 1.5 MB as JSON
    message = one_line(text, source="many.yaml")
    assert message == ("many.yaml: document 6: with the documents before it, this apply is, as JSON, larger than "
                       "8 MiB, the most one apply may carry; to raise the limit, set MESHAGENT_APPLY_MAX_BYTES")
    assert len(parse_documents("---\n".join(docs[:5]), "five.yaml")) == 5


def test_oversized_text_and_files(tmp_path):
    assert "the text is larger than 8 MiB, the most one apply may carry" in one_line("#" * (MAX_BYTES + 1))
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_BYTES // 10 + 1))
    with pytest.raises(ResourceError, match=r"big\.yaml: the file is larger than 8 MiB, the most one apply may "
                                            r"carry; to raise the limit, set MESHAGENT_APPLY_MAX_BYTES$"):
        load_paths([str(big)])


def test_a_file_is_read_no_further_than_the_limit():
    # /dev/zero never ends: reading it whole would never return.
    with pytest.raises(ResourceError, match=r"/dev/zero: the file is larger than 1 KiB"):
        load_paths(["/dev/zero"], Limits(max_bytes=1024))


def test_the_byte_limit_is_for_all_files_together(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("# x\n" * 150)  # 600 bytes
    assert load_paths([str(tmp_path / "a.yaml")], Limits(max_bytes=1000)) == []
    with pytest.raises(ResourceError, match=r"b\.yaml: with the files read before it, this apply is larger than "
                                            r"1000 bytes"):
        load_paths([str(tmp_path)], Limits(max_bytes=1000))


def test_a_large_legitimate_policy_loads():
    """10,000 rules, about 1.5 MB: the kind of file a generator writes, well inside the limits."""
    rules = "".join(f"  - fromEndpoints: [{{matchLabels: {{app: client-{i}, tier: t{i % 7}}}}}]\n"
                    f"    toPorts: [{{ports: [{{port: '{1024 + i}', protocol: TCP}}]}}]\n" for i in range(10_000))
    text = HEAD.replace("name: bomb", "name: big") + "  ingress:\n" + rules
    assert 1_200_000 < len(text) < 1_800_000
    (r,) = parse_documents(text, "big.yaml")
    assert len(r.body["spec"]["ingress"]) == 10_000
    assert r.size < MAX_DOCUMENT_BYTES
    assert validate(r.body, "request document 1").size == r.size  # as the agent checks it


# --- what reaches the agent through its API ------------------------------------------------------


def test_the_agent_checks_document_size_on_values(monkeypatch):
    monkeypatch.delenv("MESHAGENT_APPLY_MAX_DOCUMENT_BYTES", raising=False)
    doc = yaml.safe_load(big_annotations(aliases=2))
    doc["metadata"]["annotations"] = {f"a{i}": "x" * 10_000 for i in range(400)}
    with pytest.raises(ResourceError) as info:
        validate(doc, "request document 1")
    assert str(info.value) == (
        "request document 1 (Service default/web): the document is larger than 3 MiB as JSON with its aliases "
        "expanded, the most one document may be; to raise the limit, set MESHAGENT_APPLY_MAX_DOCUMENT_BYTES in "
        "the agent's environment")
    monkeypatch.setenv("MESHAGENT_APPLY_MAX_DOCUMENT_BYTES", "8MiB")
    assert validate(doc, "request document 1").size > 4_000_000


def test_shared_and_cyclic_values_are_measured_in_bounded_steps():
    leaf = ["x" * 1000]
    for _ in range(40):  # 2^40 leaves if expanded
        leaf = [leaf, leaf]
    assert json_size(leaf, 1 << 20) > 1 << 20
    cyclic: dict = {"a": []}
    cyclic["a"].append(cyclic)
    assert json_size(cyclic, 10_000) > 10_000
    with pytest.raises(ResourceError, match="larger than 3 MiB"):
        validate(cyclic, "request document 1")


@pytest.mark.parametrize("value", [
    {"a": [1, 2.5, None, True, False, "é"], "b": {"c": "d" * 100}}, [], {}, "x", 12345678901234567890,
])
def test_json_size_is_close_to_json_dumps(value):
    actual = len(json.dumps(value))
    assert actual - 4 <= json_size(value, 10**9) <= actual * 1.3 + 10


@pytest.mark.parametrize("text", ["", "x", "é" * 1000, "😀", 'say "hi"', "back\\slash", "a\nb\tc", "\x00" * 100])
def test_a_string_is_counted_as_json_escapes_it(text):
    assert json_size(text, 10**9) == len(json.dumps(text))


def test_the_documents_of_one_apply_together(monkeypatch):
    (r,) = parse_documents(big_annotations(aliases=100), "x.yaml")
    check_apply_size([r] * 3, Limits())
    with pytest.raises(ResourceError, match=r"^this apply's documents are, as JSON, larger than 2 MiB, the most one "
                                            r"apply may carry; to raise the limit, set MESHAGENT_APPLY_MAX_BYTES in "
                                            r"the agent's environment$"):
        monkeypatch.setenv("MESHAGENT_APPLY_MAX_BYTES", "2MiB")
        check_apply_size([r] * 3, Limits.from_env())


# --- the limits themselves -----------------------------------------------------------------------


@pytest.mark.parametrize("text,size", [
    ("8MiB", 8 << 20), ("8Mi", 8 << 20), ("8mib", 8 << 20), ("512KiB", 512 << 10), ("1GiB", 1 << 30),
    ("4M", 4_000_000), ("4MB", 4_000_000), ("1k", 1000), ("8388608", 8 << 20), (" 3 MiB ", 3 << 20),
    ("1.5MiB", 3 << 19),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1", "0", "8 MiBs", "8XiB", "{value}", "1e9", "2TiB", "nan"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (8 << 20, 3 << 20, 1 << 10, 1000, 1 << 30, 3 << 19)] == [
        "8 MiB", "3 MiB", "1 KiB", "1000 bytes", "1 GiB", "1536 KiB"]


def test_limits_from_the_environment():
    assert Limits.from_env({}) == Limits.from_env({"MESHAGENT_APPLY_MAX_BYTES": ""})
    limits = Limits.from_env({"MESHAGENT_APPLY_MAX_BYTES": "16MiB", "MESHAGENT_APPLY_MAX_DOCUMENT_BYTES": "4MiB"})
    assert (limits.max_bytes, limits.max_document_bytes) == (16 << 20, 4 << 20)
    assert limits.raise_bytes == "set MESHAGENT_APPLY_MAX_BYTES in the agent's environment"
    with pytest.raises(ResourceError, match=r"^the agent's MESHAGENT_APPLY_MAX_BYTES: 'lots' is not a size"):
        Limits.from_env({"MESHAGENT_APPLY_MAX_BYTES": "lots"})


def test_reader_errors_point_at_the_character_after_non_ascii_text():
    # libyaml counts the position in bytes; the message counts characters, as the user sees them.
    message = one_line("é: ü\x00\n")
    assert "malformed YAML at line 1, column 5: unacceptable character #x0000" in message
