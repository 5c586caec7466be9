"""Reading `meshagent apply -f` input: files and directories -> YAML documents -> validated resources.

All or nothing: every document of every file is read and validated before anything is returned, and
the first problem raises `ResourceError`. Nothing here writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from ._kinds import KIND_INFO
from ._model import Resource, ResourceError
from ._schema import Invalid, describe, key_text, show, walk

KINDS: dict[str, tuple[str, ...]] = {kind: info.api_versions for kind, info in KIND_INFO.items()}
YAML_SUFFIXES = (".yaml", ".yml")


class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter where it would otherwise hide a mistake or crash.

    - A key given twice in one mapping is an error, as with kubectl; PyYAML keeps the last one, which
      would silently drop the first `ingress:` of a policy.
    - A scalar Python cannot build (``2024-13-45``, ``!!int x``, a bare ``!!int``) raises ValueError
      or IndexError inside PyYAML; turn it into a YAML error with a position.
    """

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
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        problem = f"unacceptable character #x{e.character:04x}" if isinstance(e.character, int) \
            else "invalid byte"
        return ResourceError(f"{source}: malformed YAML at line {line}, column {column}: {problem}")
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        if mark is not None:
            return ResourceError(
                f"{source}: malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
            )
        return ResourceError(f"{source}: malformed YAML: {problem}")
    return ResourceError(f"{source}: malformed YAML: {e}")


def _load_yaml(text: str, source: str) -> list[object]:
    loader = None
    try:
        loader = _Loader(text)  # already reads: a control character fails here
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as e:
        raise _yaml_error(source, text, e) from None
    except RecursionError:
        raise ResourceError(f"{source}: malformed YAML: nested too deeply") from None
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
        parts.append(f"{key_text(ns)}/{key_text(name)}")
    return f" ({' '.join(parts)})" if parts else ""


def validate(doc: object, where: str) -> Resource:
    """Validate one loaded document; ``where`` names it in errors ("policies.yaml: document 2")."""
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
    namespace, name = meta.get("namespace", "default"), meta["name"]
    return Resource(api_version=api_version, kind=kind, namespace=namespace, name=name, body=doc, where=base,
                    warnings=tuple(f"{kind} {namespace}/{name}: {note}" for note in notes))


def _parse(text: str, source: str) -> list[Resource]:
    docs = _load_yaml(text, source)
    # Documents are numbered as the user counts them, empty ones included.
    return [validate(doc, f"{source}: document {i}") for i, doc in enumerate(docs, 1) if doc is not None]


def _check_unique(resources: Iterable[Resource]) -> None:
    first: dict[tuple[str, str, str], Resource] = {}
    for r in resources:
        if r.key in first:
            raise ResourceError(f"{r.where} ({r.describe()}): the same resource appears twice in one apply; "
                                f"first in {first[r.key].where}")
        first[r.key] = r


def parse_documents(text: str, source: str) -> list[Resource]:
    """Every non-empty document of a multi-document YAML text, validated. ``source`` names it in errors."""
    resources = _parse(text, source)
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


def _read(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ResourceError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ResourceError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def load_paths(paths: list[str]) -> list[Resource]:
    """Files, or directories of *.yaml/*.yml files (not recursive, in name order), every document
    validated. Raises ResourceError on the first problem, so a caller applies all or nothing."""
    files: list[str] = []
    for path in paths:
        files.extend(_files(path))
    resources: list[Resource] = []
    read: set[str] = set()
    for f in files:
        real = os.path.realpath(f)
        if real in read:  # `-f dir -f dir/x.yaml` names one file twice: read it once
            continue
        read.add(real)
        resources.extend(_parse(_read(f), f))
    _check_unique(resources)
    return resources
