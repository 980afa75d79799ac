"""One typed config system for every job: defaults < ``--config FILE.yaml`` < ``--key value``.

A job declares a dataclass whose fields are built with :func:`opt` (type, default, one-line doc).
:func:`parse_config` resolves the precedence chain, parses every value by its field's type and
collects *all* problems before raising one :class:`ConfigError`, so a user fixes a config in one go.

    @dataclass
    class Config:
        batch_size: int = opt(8, "Rows per batch.")
        data: DataConfig = opt(DataConfig, "Where the tables live.")

    cfg = parse_config(Config, argv, prog="jobs.my_job")
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

_MISSING = dataclasses.MISSING

SHOWN_VALUE_CHARS = 200  # a value echoed in an error; the rest is counted, not printed
SHOWN_PROBLEM_CHARS = 2000  # backstop for messages built elsewhere (a __post_init__ check)
MAX_YAML_VALUES = 100_000  # values a config file may hold once its aliases are expanded
MAX_YAML_DEPTH = 100  # nesting a config file may have (aliases included)


class ConfigError(ValueError):
    """All problems found in a config, one per line, each naming where it came from."""

    def __init__(self, problems: list[str]):
        self.problems = [cut(problem, SHOWN_PROBLEM_CHARS) for problem in problems]
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


def cut(text: str, limit: int = SHOWN_VALUE_CHARS) -> str:
    """``text`` up to ``limit`` characters, then its full length: a hostile or mistaken value
    (a megabyte string, an alias bomb) must not turn one error line into megabytes."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut to a sane length."""
    return cut(repr(value))


def opt(default: Any, doc: str) -> Any:
    """A config field with a default and a one-line doc.

    A dataclass type or a mutable value (list, dict) becomes a ``default_factory``.
    """
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata={"doc": doc})
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


# --------------------------------------------------------------------------- type handling


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " | ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(tp)) else inner
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        k, v = get_args(tp) or (str, Any)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + "|".join(str(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _from_cli_text(text: str) -> Any:
    """A command-line value is read as YAML (so ``8``, ``true``, ``[a, b]`` and ``null`` work).

    Text that is not YAML, or whose aliases expand too far, stays text: the field's type check
    then reports it (cut to a sane length).
    """
    if not text.strip():
        return text
    try:
        return _load_yaml_text(text)[0]
    except (yaml.YAMLError, _YamlTooLarge, RecursionError):
        return text


def _coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Parse ``value`` as type ``tp``; raise ``TypeError`` with a short reason otherwise."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (from_cli and value in ("null", "None", "none")):
            if type(None) in args:
                return None
            raise TypeError("null is not allowed")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, from_cli)
            except TypeError as exc:
                errors.append(str(exc))
        raise TypeError("; ".join(errors))
    if origin is Literal:
        allowed = get_args(tp)
        for candidate in allowed:
            if value == candidate or (from_cli and str(value) == str(candidate)):
                return candidate
        raise TypeError(f"not one of {list(allowed)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or str(value) == str(member.value) or value == member.name:
                return member
        raise TypeError(f"not one of {[m.value for m in tp]}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if from_cli and isinstance(value, str):
            value = [_from_cli_text(part) for part in value.split(",")] if value else []
        elif from_cli and isinstance(value, (int, float, bool)):
            value = [value]  # `--sizes 4`: the command line read "4" as a number, meant as one item
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        items = [_coerce(item, item_tp, from_cli) for item in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise TypeError("not a mapping")
        return {_coerce(k, key_tp, from_cli): _coerce(v, val_tp, from_cli) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise TypeError("not a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("not a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if from_cli and value is not None and not isinstance(value, (list, dict)):
            return str(value)
        raise TypeError("not a string")
    if _is_dataclass_type(tp):
        raise TypeError("is a section: set its keys, e.g. section.key")
    raise TypeError(f"unsupported field type {tp!r}")


# --------------------------------------------------------------------------- resolution


def field_paths(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every leaf field of a (nested) config class as ``dotted.key -> (type, field)``."""
    paths: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if _is_dataclass_type(tp):
            paths.update(field_paths(tp, key + "."))
        else:
            paths[key] = (tp, f)
    return paths


def _flatten(mapping: dict, dict_fields: set[str] = frozenset(), prefix: str = "") -> dict[str, Any]:
    """Nested YAML sections to dotted keys; values of dict-typed fields stay whole."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in dict_fields:
            flat.update(_flatten(value, dict_fields, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _closest(key: str, valid: list[str]) -> str:
    key = key[:SHOWN_VALUE_CHARS]  # difflib is quadratic: a megabyte key would take minutes
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    leaf_matches = [v for v in valid if v.split(".")[-1] == key.split(".")[-1]]
    best = leaf_matches[0] if leaf_matches else (match[0] if match else None)
    return f" (closest valid key: '{best}')" if best else ""


# --------------------------------------------------------------------------- YAML files


class _YamlTooLarge(Exception):
    """A YAML document that expands (through its aliases) past the limits; ``line`` is 1-based."""

    def __init__(self, line: int, reason: str):
        self.line, self.reason = line, reason
        super().__init__(reason)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that expands past ``MAX_YAML_VALUES`` values or ``MAX_YAML_DEPTH`` levels.

    Aliases make a graph, not a tree: nine lines of anchors, each alias used nine times, expand
    to 10^9 strings (a "billion laughs") once anything walks, copies or prints the data. Each
    node's expanded size is computed once (memoised), so the check itself stays linear.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, levels below)
    open_nodes: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise _YamlTooLarge(node.start_mark.line + 1, "an alias refers to a value that contains it")
        if key not in measured:
            open_nodes.add(key)
            children = _child_nodes(node)
            sizes = [measure(child, depth + 1) for child in children]
            open_nodes.discard(key)
            measured[key] = (1 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0))
        size, height = measured[key]
        if size > MAX_YAML_VALUES:
            raise _YamlTooLarge(
                node.start_mark.line + 1, f"its aliases expand to {size} values (at most {MAX_YAML_VALUES}); "
                "write the values out instead of nesting aliases"
            )
        if depth + height > MAX_YAML_DEPTH:
            raise _YamlTooLarge(node.start_mark.line + 1, f"nested deeper than {MAX_YAML_DEPTH} levels")
        return size, height

    measure(root, 0)


def _child_nodes(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _load_yaml_text(text: str) -> tuple[Any, dict[str, list[int]]]:
    """YAML text to data and the lines of its keys (:func:`_key_lines`).

    The node graph is checked before any data is built, and its key lines are read before the
    constructor resolves merge keys (``<<: *base``) in place, which would make them look repeated.

    Raises:
        yaml.YAMLError: the text is not YAML.
        _YamlTooLarge: its aliases expand too far, or it nests too deep.
        RecursionError: it nests deeper than the YAML parser itself can follow.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        _check_expansion(root)
        lines = _key_lines(root)
        return loader.construct_document(root), lines
    finally:
        loader.dispose()


def _key_lines(root: yaml.Node) -> dict[str, list[int]]:
    """Dotted key -> every line that sets it, so errors point at ``file:line`` and a key set
    twice (``a: 1`` twice, or ``data: {b: 1}`` and ``data.b: 2``) is found, not silently merged."""
    lines: dict[str, list[int]] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges a mapping in; an explicit key may override it
            dotted = prefix + str(key_node.value)
            lines.setdefault(dotted, []).append(key_node.start_mark.line + 1)
            walk(value_node, dotted + ".")

    walk(root, "")
    return lines


def _repeated_keys(path: Path, lines: dict[str, list[int]]) -> list[str]:
    return [
        f"{path}:{line}: key '{cut(key)}' repeats line {where[0]}; set each key once"
        for key, where in lines.items()
        for line in where[1:]
    ]


def _read_config_text(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is named with the line and offset of its first bad byte."""
    if not path.is_file():
        raise ConfigError([f"--config {path}: no such file"])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"--config {path}: cannot be read ({exc.strerror or exc})"]) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); save the file as UTF-8"
        ]) from None


def _load_yaml(path: Path) -> tuple[dict, dict[str, list[int]], list[str]]:
    """A config file's mapping, the lines of its (dotted) keys, and its repeated keys as problems.

    Raises:
        ConfigError: the file is missing, not UTF-8, not YAML, too large once its aliases are
            expanded, or not a mapping.
    """
    text = _read_config_text(path)
    try:
        data, lines = _load_yaml_text(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({cut(str(getattr(exc, 'problem', exc)))})"]) from None
    except _YamlTooLarge as exc:
        raise ConfigError([f"{path}:{exc.line}: refused: {exc.reason}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: refused: nested deeper than the YAML parser can follow"]) from None
    if data is None:
        return {}, {}, []
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: expected a mapping of keys to values, found {type(data).__name__}"])
    return data, lines, _repeated_keys(path, lines)


def _split_cli(argv: list[str]) -> tuple[Path | None, list[tuple[str, str | None]], list[str]]:
    """Split argv into the --config path, (key, raw value) overrides and problems."""
    config_path: Path | None = None
    overrides: list[tuple[str, str | None]] = []
    problems: list[str] = []
    first_given: dict[str, tuple[int, str]] = {}  # key -> (argument number, as typed)
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            problems.append(f"command line: unexpected argument {shown(token)} (expected --key value)")
            i += 1
            continue
        start = i
        key, eq, inline = token[2:].partition("=")
        if eq:
            value: str | None = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = None  # a bare flag: only valid for booleans
            i += 1
        typed = " ".join(argv[start:i])
        key = key.replace("-", "_")
        if key in first_given:
            # Last-one-wins would silently drop a value the user typed (a pasted command, a script
            # that appends overrides): name both, let the user keep one.
            number, earlier = first_given[key]
            problems.append(
                f"command line: --{cut(key)} is given twice ({shown(earlier)} at argument {number}, "
                f"{shown(typed)} at argument {start + 1}); give it once"
            )
            continue
        first_given[key] = (start + 1, typed)
        if key == "config":
            if value is None:
                problems.append("command line: --config needs a file path")
            else:
                config_path = Path(value)
        else:
            overrides.append((key, value))
    return config_path, overrides, problems


def cli_keys(argv: list[str]) -> set[str]:
    """The config keys ``argv`` sets, however spelled (``--a.b-c v``, ``--a.b_c=v``): ``a.b_c``."""
    config_path, overrides, _ = _split_cli(argv)
    return {key for key, _ in overrides} | ({"config"} if config_path else set())


def _build(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if _is_dataclass_type(tp):
            kwargs[f.name] = _build(tp, flat, key + ".")
        elif key in flat:
            kwargs[f.name] = flat[key]
    return cls(**kwargs)


def parse_config(cls: type, argv: list[str] | None = None, prog: str | None = None) -> Any:
    """Resolve a job config: dataclass defaults < ``--config FILE.yaml`` < ``--key value``.

    Raises:
        ConfigError: listing every unknown key (with the closest valid one), every value that
            does not parse as its field's type, and every ``__post_init__`` check that failed.
        SystemExit: after printing ``--help``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        _print_quietly(format_help(cls, prog or cls.__module__))
        raise SystemExit(0)
    config_path, overrides, problems = _split_cli(argv)
    paths = field_paths(cls)
    dict_fields = {k for k, (tp, _) in paths.items() if get_origin(tp) is dict}
    valid = sorted(paths)
    values: dict[str, Any] = {}

    sections = {k.rsplit(".", 1)[0] for k in paths if "." in k}

    def accept(key: str, raw: Any, where: str, from_cli: bool) -> None:
        if key in sections:
            if raw is not None or from_cli:  # a YAML section whose keys are all commented out is empty
                problems.append(f"{where}: '{key}' is a section: set its keys, e.g. {key}.<key>")
            return
        if key not in paths:
            problems.append(f"{where}: unknown key '{cut(key)}'{_closest(key, valid)}")
            return
        tp, _ = paths[key]
        if raw is None and from_cli:
            if tp is bool:
                values[key] = True
                return
            problems.append(f"{where}: --{key} needs a value ({_type_name(tp)})")
            return
        value = _from_cli_text(raw) if from_cli else raw
        if from_cli and value is not None and tp in (str, str | None):
            value = raw  # a string field keeps the text as typed: '007' stays '007', 'yes' stays 'yes'
        try:
            values[key] = _coerce(value, tp, from_cli)
        except TypeError as exc:
            problems.append(
                f"{where}: field '{key}' expects {_type_name(tp)}, got {shown(raw)} ({cut(str(exc))})"
            )

    if config_path is not None:
        try:
            data, lines, repeated = _load_yaml(config_path)
        except ConfigError as exc:
            raise ConfigError(problems + exc.problems) from None
        problems += repeated
        for key, raw in _flatten(data, dict_fields).items():
            line = lines.get(key, [1])[-1]  # a repeated key holds its last value, as YAML reads it
            accept(key, raw, f"{config_path}:{line}", from_cli=False)
    for key, raw in overrides:
        accept(key, raw, "command line", from_cli=True)
    if problems:
        raise ConfigError(problems)
    try:
        return _build(cls, values)
    except (ValueError, TypeError) as exc:
        source = f"{config_path} + command line" if config_path else "command line"
        raise ConfigError([f"{source}: {exc}"]) from None


def load_config_file(cls: type, path: str | Path) -> Any:
    """Validate a YAML file against a config class (used by tests and by ``run_pipeline``)."""
    return parse_config(cls, ["--config", str(path)])


# --------------------------------------------------------------------------- output


def config_to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe dict of a config (enums as their values)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def print_config(cfg: Any, title: str) -> None:
    """Print the resolved config at job start, so logs say exactly what ran."""
    print(f"[{title}] resolved config:\n" + "\n".join("  " + line for line in config_to_yaml(cfg).splitlines()))


def _print_quietly(text: str) -> None:
    """Print to stdout; a reader that stopped early (``--help | head``) ends it quietly.

    Without this, the interpreter's last flush into the closed pipe prints a BrokenPipeError.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the flush at exit has nowhere to fail (Python's own advice).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def format_help(cls: type, prog: str) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"usage: python -m {prog} [--config FILE.yaml] [--key value ...]", ""]
    if doc and not doc[0].startswith(cls.__name__ + "("):
        lines += [doc[0], ""]
    lines.append("Precedence: defaults < --config FILE.yaml < --key value (dotted keys for sections).")
    lines.append("")
    dict_fields = {k for k, (tp, _) in field_paths(cls).items() if get_origin(tp) is dict}
    defaults = _flatten(config_to_dict(_build(cls, {})), dict_fields) if _all_defaulted(cls) else {}
    for key, (tp, f) in field_paths(cls).items():
        default = defaults.get(key, "(required)")
        lines.append(f"  --{key} {_type_name(tp)}  (default: {default!r})")
        lines.append(f"      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def _all_defaulted(cls: type) -> bool:
    for f in dataclasses.fields(cls):
        if f.default is _MISSING and f.default_factory is _MISSING:
            return False
    return True


def save_config(cfg: Any, output_uri: str, name: str = "config.yaml", options: Any = None) -> str:
    """Save the resolved config beside a job's outputs; returns the file's URI."""
    from tmr_core import storage

    uri = storage.join(output_uri, name)
    storage.write_text_atomic(uri, config_to_yaml(cfg), options)
    return uri


def run_main(main: Any) -> None:
    """Run a job's ``main(argv)``; config and data errors end in one line, not a traceback."""
    from tmr_core.errors import TMRError

    try:
        code = main(sys.argv[1:])
    except (ConfigError, TMRError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
