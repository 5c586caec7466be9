"""Reading `meshagent apply -f` input: files and directories -> YAML documents -> validated resources.

All or nothing: every document of every file is read and validated before anything is returned, and
the first problem raises `ResourceError`. Nothing here writes anything.

Before any schema work the input is held to `Limits` (`_limits.py`): at most ``max_bytes`` of YAML
read per apply, and each document, as it is composed, to ``max_document_bytes`` as JSON with its
aliases expanded and to go-yaml's alias ratio; neither check expands an alias.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from ._kinds import KIND_INFO
from ._limits import Limits, allowed_alias_ratio, excessive_aliasing, json_size, str_size
from ._model import Resource, ResourceError
from ._schema import Invalid, describe, key_text, show, walk

KINDS: dict[str, tuple[str, ...]] = {kind: info.api_versions for kind, info in KIND_INFO.items()}
YAML_SUFFIXES = (".yaml", ".yml")

try:  # libyaml scans and parses in C (3-4 times faster); composing stays in Python, to count as it goes
    from yaml.cyaml import CParser as _Parser

    _C_PARSER = True
except ImportError:  # PyYAML built without libyaml  # pragma: no cover
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

    _C_PARSER = False


class _TooLarge(yaml.YAMLError):
    """The document being composed passed ``max_document_bytes`` at ``where`` ("line 3, column 5")."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


class _ExcessiveAliasing(yaml.YAMLError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _CountingComposer(Composer):
    """PyYAML's composer, counting what each document would be with its aliases expanded, without
    expanding anything: every node composed records its expanded node count and JSON size (from its
    children's), and an alias adds its anchor's. The running totals are checked after every node, in
    document order, as go-yaml checks while decoding: over ``max_document_bytes``, or more aliased
    nodes than go-yaml's ratio allows, and the document stops there. An anchor used inside itself
    (PyYAML would build a cycle, which has no JSON form) is refused as go-yaml refuses it."""

    def __init__(self, max_document_bytes: int) -> None:
        super().__init__()
        self._max_document_bytes = max_document_bytes
        self._expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, JSON bytes), aliases expanded
        self._nodes = self._aliased = self._bytes = 0

    def compose_document(self):
        self._expanded.clear()
        self._nodes = self._aliased = self._bytes = 0
        try:
            return super().compose_document()
        finally:
            self._expanded.clear()

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:  # else PyYAML's "found undefined alias"
                expanded = self._expanded.get(id(target))
                if expanded is None:
                    raise ComposerError(None, None, f"anchor {show(event.anchor)} is used inside its own value "
                                        "(a recursive structure has no JSON form)", event.start_mark)
                self._count(1 + expanded[0], expanded[0], expanded[1], event.start_mark)
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        if isinstance(node, ScalarNode):
            own = str_size(node.value)
            nodes, size = 1, own
        elif isinstance(node, SequenceNode):
            own = 2 + 2 * len(node.value)
            nodes = 1 + sum(self._expanded[id(item)][0] for item in node.value)
            size = own + sum(self._expanded[id(item)][1] for item in node.value)
        else:  # MappingNode
            own = 2 + 4 * len(node.value)
            nodes = 1 + sum(self._expanded[id(k)][0] + self._expanded[id(v)][0] for k, v in node.value)
            size = own + sum(self._expanded[id(k)][1] + self._expanded[id(v)][1] for k, v in node.value)
        self._expanded[id(node)] = (nodes, size)
        self._count(1, 0, own, node.end_mark)  # composing has reached its end
        return node

    def _count(self, nodes: int, aliased: int, size: int, mark) -> None:
        self._nodes += nodes
        self._aliased += aliased
        self._bytes += size
        if self._bytes > self._max_document_bytes:
            raise _TooLarge(_at(mark))
        if excessive_aliasing(self._aliased, self._nodes):
            raise _ExcessiveAliasing(
                f"excessive aliasing at {_at(mark)}: aliases make {self._aliased:,} of its {self._nodes:,} nodes so "
                f"far, more than the {allowed_alias_ratio(self._nodes):.0%} Kubernetes' YAML decoder (go-yaml) "
                "allows; write the repeated parts out instead of aliasing them")


def _at(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


class _Loader(_CountingComposer, _Parser, SafeConstructor, Resolver):
    """PyYAML's safe loader (libyaml's parser where there is one), bounded by the counting composer
    and stricter where PyYAML would otherwise hide a mistake or crash.

    - A key given twice in one mapping is an error, as with kubectl; PyYAML keeps the last one, which
      would silently drop the first `ingress:` of a policy.
    - A scalar Python cannot build (``2024-13-45``, ``!!int x``, a bare ``!!int``) raises ValueError
      or IndexError inside PyYAML; turn it into a YAML error with a position.
    """

    def __init__(self, text: str, max_document_bytes: int) -> None:
        _Parser.__init__(self, text)
        _CountingComposer.__init__(self, max_document_bytes)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # PyYAML's constructors raise bare IndexError, ValueError... on odd scalars
            raise ConstructorError(None, None, f"invalid value: {e}", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may override, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable key: SafeConstructor reports it below
                    continue
                if duplicate:
                    raise ConstructorError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_error(source: str, text: str, e: yaml.YAMLError) -> ResourceError:
    if isinstance(e, yaml.reader.ReaderError):
        # libyaml counts the position in UTF-8 bytes, PyYAML's reader in characters
        before = text.encode("utf-8")[:e.position].decode("utf-8", "replace") if _C_PARSER else text[:e.position]
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        problem = f"unacceptable character #x{e.character:04x}" if isinstance(e.character, int) \
            else "invalid byte"
        return ResourceError(f"{source}: malformed YAML at line {line}, column {column}: {problem}")
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = (e.problem or e.context or "syntax error")[:200]
        if mark is not None:
            return ResourceError(
                f"{source}: malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
            )
        return ResourceError(f"{source}: malformed YAML: {problem}")
    return ResourceError(f"{source}: malformed YAML: {e}")


def _load_yaml(text: str, source: str, limits: Limits) -> list[object]:
    loader = None
    docs: list[object] = []
    try:
        loader = _Loader(text, limits.max_document_bytes)  # PyYAML's own reader checks characters here
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except _TooLarge as e:
        raise limits.document_too_large(f"{source}: document {len(docs) + 1}", f" (by {e.where})") from None
    except _ExcessiveAliasing as e:
        raise ResourceError(f"{source}: document {len(docs) + 1}: {e.message}") from None
    except yaml.YAMLError as e:
        raise _yaml_error(source, text, e) from None
    except RecursionError:
        raise ResourceError(f"{source}: malformed YAML: nested too deeply") from None
    except UnicodeEncodeError as e:  # libyaml takes UTF-8: a lone surrogate in text that never was a file
        raise ResourceError(f"{source}: not UTF-8 text (character {e.start})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _context(doc: dict) -> str:
    """``(CiliumNetworkPolicy default/allow-web)``, from whatever the document says, before validation."""
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    parts = [key_text(kind)] if isinstance(kind, str) and kind else []
    if isinstance(name, str) and name:
        ns = namespace if isinstance(namespace, str) and namespace else "default"
        info = KIND_INFO.get(kind) if isinstance(kind, str) else None
        parts.append(key_text(name) if info is not None and info.cluster_scoped and not namespace
                     else f"{key_text(ns)}/{key_text(name)}")
    return f" ({' '.join(parts)})" if parts else ""


def validate(doc: object, where: str, limits: Limits | None = None) -> Resource:
    """Validate one loaded document; ``where`` names it in errors ("policies.yaml: document 2").
    ``limits`` (default: the agent's, `Limits.from_env`) bound its size as JSON before anything else:
    what reaches the agent through its API never went through the YAML loader's checks."""
    limits = limits or Limits.from_env()
    size = json_size(doc, limits.max_document_bytes)
    if size > limits.max_document_bytes:
        raise limits.document_too_large(where + (_context(doc) if isinstance(doc, dict) else ""))
    if not isinstance(doc, dict):
        raise ResourceError(f"{where}: expected a mapping with apiVersion, kind, metadata and spec, "
                            f"got {describe(doc)}")
    base, where = where, where + _context(doc)
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if "kind" not in doc:
        raise ResourceError(f"{where}: kind: required field missing; supported: {', '.join(KINDS)}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ResourceError(f"{where}: kind: {show(kind)} is not supported; supported: {', '.join(KINDS)}")
    info = KIND_INFO[kind]
    if "apiVersion" not in doc:
        raise ResourceError(f"{where}: apiVersion: required field missing; "
                            f"supported for {kind}: {', '.join(info.api_versions)}")
    if not isinstance(api_version, str) or api_version not in info.api_versions:
        raise ResourceError(f"{where}: apiVersion: {show(api_version)} is not supported for {kind}; "
                            f"supported: {', '.join(info.api_versions)}")
    notes: list[str] = []
    try:
        walk(info.schema, doc, "", notes)
    except Invalid as e:
        raise ResourceError(f"{where}: {e.path}: {e.message}") from None
    meta = doc["metadata"]
    namespace, name = "" if info.cluster_scoped else meta.get("namespace", "default"), meta["name"]
    return Resource(api_version=api_version, kind=kind, namespace=namespace, name=name, body=doc, where=base,
                    warnings=tuple(f"{kind} {namespace}/{name}: {note}" for note in notes), size=size)


def _parse(text: str, source: str, limits: Limits, carried: int = 0) -> tuple[list[Resource], int]:
    """The text's resources, and what the apply carries with them as JSON (``carried`` before)."""
    docs = _load_yaml(text, source, limits)
    resources = []
    # Documents are numbered as the user counts them, empty ones included.
    for i, doc in enumerate(docs, 1):
        if doc is not None:
            r = validate(doc, f"{source}: document {i}", limits)
            carried += r.size
            if carried > limits.max_bytes:  # each document fits, but aliases can make many of them large
                raise limits.too_many_bytes(f"{r.where}: with the documents before it, this apply is, as JSON,")
            resources.append(r)
    return resources, carried


def _check_unique(resources: Iterable[Resource]) -> None:
    first: dict[tuple[str, str, str], Resource] = {}
    for r in resources:
        if r.key in first:
            raise ResourceError(f"{r.where} ({r.describe()}): the same resource appears twice in one apply; "
                                f"first in {first[r.key].where}")
        first[r.key] = r


def parse_documents(text: str, source: str, limits: Limits | None = None) -> list[Resource]:
    """Every non-empty document of a multi-document YAML text, validated. ``source`` names it in errors."""
    limits = limits or Limits()
    if len(text) > limits.max_bytes:  # in characters: the text was decoded already
        raise limits.too_many_bytes(f"{source}: the text is")
    resources, _ = _parse(text, source, limits)
    _check_unique(resources)
    return resources


def _files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        try:
            entries = sorted(e for e in p.iterdir() if e.suffix in YAML_SUFFIXES and e.is_file())
        except OSError as e:
            raise ResourceError(f"{path}: cannot read directory: {e.strerror}") from None
        return [str(e) for e in entries]
    if p.exists():
        return [path]
    raise ResourceError(f"{path}: no such file or directory")


def _read(path: str, budget: int, limits: Limits, first: bool) -> tuple[str, int]:
    """The file as text, and its size, if it fits in ``budget`` bytes (what the apply has left); reads
    at most one byte more, whatever the file's size (/dev/zero included)."""
    try:
        with open(path, "rb") as f:
            data = f.read(budget + 1)
    except OSError as e:
        raise ResourceError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > budget:
        raise limits.too_many_bytes(f"{path}: the file is" if first else
                                    f"{path}: with the files read before it, this apply is")
    try:
        return data.decode("utf-8-sig"), len(data)
    except UnicodeDecodeError as e:
        raise ResourceError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def load_paths(paths: list[str], limits: Limits | None = None) -> list[Resource]:
    """Files, or directories of *.yaml/*.yml files (not recursive, in name order), every document
    validated. Raises ResourceError on the first problem, so a caller applies all or nothing.
    ``limits`` (default `Limits()`) bound each document, and what the apply carries: the bytes read
    and the documents as JSON, each all files together."""
    limits = limits or Limits()
    files: list[str] = []
    for path in paths:
        files.extend(_files(path))
    resources: list[Resource] = []
    read: set[str] = set()
    budget, carried = limits.max_bytes, 0
    for f in files:
        real = os.path.realpath(f)
        if real in read:  # `-f dir -f dir/x.yaml` names one file twice: read it once
            continue
        text, size = _read(f, budget, limits, first=not read)
        read.add(real)
        budget -= size
        parsed, carried = _parse(text, f, limits, carried)
        resources.extend(parsed)
    _check_unique(resources)
    return resources


def check_apply_size(resources: Iterable[Resource], limits: Limits) -> None:
    """The documents of one apply, as JSON, fit in ``limits.max_bytes`` (the agent's check of what
    reaches it through the API; `load_paths` checks the same as it goes)."""
    if sum(r.size for r in resources) > limits.max_bytes:
        raise limits.too_many_bytes("this apply's documents are, as JSON,")
