"""Load Compose files the way ``docker compose -f a.yml -f b.yml config`` does, without Docker.

Tests use it to check the merged stacks of ``deploy/compose/`` against the Compose
Specification schema and against each other (Prometheus targets vs worker services, ...).

What it implements (the Compose Specification's rules, for the keys our files use):

- ``.env``-style files: ``KEY=VALUE`` lines, ``#`` comments, quoted values.
- Interpolation of every string value: ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
  ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``,
  nested ``${A:-${B}}``, ``$$`` for a literal ``$``; any other ``$`` is an error, as in Compose.
- YAML anchors and ``<<`` merge keys (PyYAML), and the ``!reset`` / ``!override`` tags.
- ``extends`` with ``file`` and ``service`` (recursively), resolved per file before the files
  are merged; a base service with ``depends_on`` is refused, as the specification says.
- Merging: mappings merge recursively, scalars are replaced; ``command``, ``entrypoint`` and
  ``healthcheck.test`` are replaced whole; ``environment`` and ``labels`` merge by key (list
  or mapping form); ``depends_on`` merges by service (list or mapping form); ``volumes``
  merge by container path; ``ports``, ``env_file`` and ``expose`` are appended without
  duplicates; every other sequence is appended.
- Relative paths (``build.context``, ``env_file``, ``extends.file``, bind-mount sources) are
  made absolute against the directory of the file that names them.

Limits (not used by our files, so not implemented): ``include``, ``profiles`` selection,
``env_file`` long syntax, ``secrets``/``configs`` merge-by-target, the long syntax of
``ports``, ``!reset`` on a single sequence item, and Compose's type casting of interpolated
values (numbers stay strings here; the schema accepts both).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ComposeError(Exception):
    """A file that ``docker compose config`` would refuse."""


@dataclass(frozen=True)
class Reset:
    """``!reset``: remove the value inherited from earlier files."""


@dataclass(frozen=True)
class Override:
    """``!override VALUE``: replace the inherited value instead of merging into it."""

    value: Any


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that knows Compose's ``!reset`` and ``!override`` tags."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", _construct_reset)
_ComposeLoader.add_constructor("!override", _construct_override)


# --- .env files and interpolation -------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ComposeError(f"{path}:{number}: not a KEY=VALUE line: {raw!r}")
        values[key] = _env_value(value.strip())
    return values


def _env_value(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    # An unquoted value ends where an inline comment (" #") starts.
    return re.split(r"\s+#", value, maxsplit=1)[0]


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str], where: str = "") -> str:
    """One string with Compose's ``$`` substitutions applied (see the module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end = _closing_brace(text, i + 1, where)
            out.append(_braced(text[i + 2 : end], env, where))
            i = end + 1
        elif (name := _NAME.match(text, i + 1)) is not None:
            out.append(env.get(name.group(), ""))
            i = name.end()
        else:
            raise ComposeError(f"{where}: invalid interpolation format in {text!r}")
    return "".join(out)


def _closing_brace(text: str, open_at: int, where: str) -> int:
    depth = 0
    for index in range(open_at, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ComposeError(f"{where}: unclosed '${{' in {text!r}")


def _braced(body: str, env: Mapping[str, str], where: str) -> str:
    name = _NAME.match(body)
    if name is None:
        raise ComposeError(f"{where}: invalid interpolation format ${{{body}}}")
    key, rest = name.group(), body[name.end() :]
    value = env.get(key)
    if rest == "":
        return value or ""
    operator = next((op for op in (":-", ":?", ":+", "-", "?", "+") if rest.startswith(op)), None)
    if operator is None:
        raise ComposeError(f"{where}: invalid interpolation format ${{{body}}}")
    argument = rest[len(operator) :]
    missing = value is None or (operator.startswith(":") and value == "")
    if operator.endswith("-"):
        return interpolate(argument, env, where) if missing else str(value)
    if operator.endswith("?"):
        if missing:
            message = interpolate(argument, env, where) or f"{key} is not set"
            raise ComposeError(f"{where}: required variable {key} is missing a value: {message}")
        return str(value)
    return "" if missing else interpolate(argument, env, where)


def _interpolate_tree(node: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(node, str):
        return interpolate(node, env, where)
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env, f"{where}.{key}") for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(item, env, f"{where}[{n}]") for n, item in enumerate(node)]
    if isinstance(node, Override):
        return Override(_interpolate_tree(node.value, env, where))
    return node


# --- loading one file -------------------------------------------------------------------


def load_file(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """One Compose file: parsed, interpolated, paths made absolute, ``extends`` resolved."""
    return _load_file(path.resolve(), env, chain=())


def _load_file(path: Path, env: Mapping[str, str], chain: tuple[str, ...]) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=_ComposeLoader)
    if not isinstance(data, dict):
        raise ComposeError(f"{path}: not a mapping")
    data = _interpolate_tree(data, env, path.name)
    services = data.get("services") or {}
    for service in services.values():
        _absolute_paths(service, path.parent)
    for name in list(services):
        services[name] = _resolve_extends(services[name], path, env, (*chain, f"{path}:{name}"))
    return data


def _resolve_extends(
    service: dict[str, Any], path: Path, env: Mapping[str, str], chain: tuple[str, ...]
) -> dict[str, Any]:
    extends = service.get("extends")
    if extends is None:
        return service
    if isinstance(extends, str):
        extends = {"service": extends}
    base_path = Path(extends.get("file", path))
    key = f"{base_path}:{extends['service']}"
    if key in chain:
        raise ComposeError(f"circular extends: {' -> '.join((*chain, key))}")
    base_file = _load_file(base_path, env, chain)
    base = copy.deepcopy((base_file.get("services") or {}).get(extends["service"]))
    if base is None:
        raise ComposeError(f"{path}: extends names a missing service {key}")
    if "depends_on" in base:
        raise ComposeError(f"{key}: a service with depends_on cannot be extended")
    local = {k: v for k, v in service.items() if k != "extends"}
    return _merge(base, local, "services.*")


def _absolute_paths(service: dict[str, Any], directory: Path) -> None:
    build = service.get("build")
    if isinstance(build, str):
        service["build"] = {"context": build}
        build = service["build"]
    if isinstance(build, dict) and "context" in build:
        build["context"] = str((directory / build["context"]).resolve())
    if isinstance(service.get("extends"), dict) and "file" in service["extends"]:
        service["extends"]["file"] = str((directory / service["extends"]["file"]).resolve())
    if "env_file" in service:
        files = service["env_file"]
        files = [files] if isinstance(files, str) else files
        service["env_file"] = [str((directory / f).resolve()) for f in files]
    if isinstance(service.get("volumes"), list):
        service["volumes"] = [_absolute_volume(v, directory) for v in service["volumes"]]


def _absolute_volume(volume: Any, directory: Path) -> Any:
    if not isinstance(volume, str):
        return volume
    source, sep, rest = volume.partition(":")
    if sep and source.startswith((".", "/", "~")):
        return f"{(directory / source).resolve()}:{rest}"
    return volume


# --- merging files ------------------------------------------------------------------------

_REPLACED = {"services.*.command", "services.*.entrypoint", "services.*.healthcheck.test"}
_KEYED = {"services.*.environment", "services.*.labels", "services.*.build.args"}
_APPENDED_UNIQUE = {"services.*.ports", "services.*.env_file", "services.*.expose"}


def load_stack(files: list[Path], env: Mapping[str, str]) -> dict[str, Any]:
    """The merged model of ``docker compose -f files[0] -f files[1] ...``."""
    merged: dict[str, Any] = {}
    for path in files:
        merged = _merge(merged, load_file(path, env), "")
    return _drop_markers(merged)


def _generic(path: str) -> str:
    """``services.kafka.ports`` -> ``services.*.ports`` (the form the rules are written in)."""
    parts = path.split(".")
    if len(parts) >= 2 and parts[0] == "services":
        parts[1] = "*"
    return ".".join(parts)


def _merge(base: Any, override: Any, path: str) -> Any:
    rule = _generic(path)
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(override, Reset):
        return override
    if rule in _REPLACED or base is None:
        return copy.deepcopy(override)
    if rule in _KEYED:
        return {**_as_mapping(base), **_as_mapping(override)}
    if rule == "services.*.depends_on":
        return _merge_mappings(_as_dependencies(base), _as_dependencies(override), path)
    if rule == "services.*.volumes":
        return _merge_volumes(base, override)
    if isinstance(base, dict) and isinstance(override, dict):
        return _merge_mappings(base, override, path)
    if isinstance(base, list) and isinstance(override, list):
        if rule in _APPENDED_UNIQUE:
            return base + [item for item in override if item not in base]
        return base + copy.deepcopy(override)
    return copy.deepcopy(override)


def _merge_mappings(base: dict[str, Any], override: dict[str, Any], path: str) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        child = f"{path}.{key}" if path else key
        merged[key] = _merge(merged.get(key), value, child)
    return merged


def _as_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    result: dict[str, Any] = {}
    for item in value:
        key, sep, rest = str(item).partition("=")
        result[key] = rest if sep else None
    return result


def _as_dependencies(value: Any) -> dict[str, Any]:
    if isinstance(value, list):
        return {name: {"condition": "service_started"} for name in value}
    return dict(value)


def volume_target(volume: Any) -> str:
    """The container path of a short (``src:dst[:mode]``) or long volume entry."""
    if isinstance(volume, dict):
        return str(volume["target"])
    parts = str(volume).split(":")
    return parts[1] if len(parts) >= 2 else parts[0]


def _merge_volumes(base: list[Any], override: list[Any]) -> list[Any]:
    replaced = {volume_target(v): v for v in override}
    kept = [replaced.pop(volume_target(v), v) for v in base]
    return kept + [v for v in override if volume_target(v) in replaced]


def _drop_markers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_markers(v) for k, v in node.items() if not isinstance(v, Reset)}
    if isinstance(node, list):
        return [_drop_markers(item) for item in node if not isinstance(item, Reset)]
    if isinstance(node, Override):
        return _drop_markers(node.value)
    return node
