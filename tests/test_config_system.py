"""The typed job config system: precedence, parsing by type, and errors that say where and why."""

from __future__ import annotations

import enum
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from jobs._config import (
    ConfigError,
    field_paths,
    format_help,
    load_config_file,
    opt,
    parse_config,
    print_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Optim:
    lr: float = opt(1e-3, "Learning rate.")
    steps: int = opt(10, "Optimizer steps.")


@dataclass
class Data:
    batch_size: int = opt(8, "Rows per batch.")
    optim: Optim = opt(Optim, "Optimizer section, nested two deep.")


@dataclass
class Cfg:
    """A config that uses every supported field type."""

    count: int = opt(1, "An integer.")
    rate: float = opt(0.5, "A float.")
    flag: bool = opt(False, "A boolean.")
    name: str = opt("base", "A string.")
    sizes: list[int] = opt([1, 2], "A list of integers.")
    limit: Optional[int] = opt(None, "An optional integer.")  # noqa: UP045 (the typing spelling must work too)
    mode: Literal["fast", "slow"] = opt("fast", "A literal choice.")
    color: Color = opt(Color.RED, "An enum.")
    weights: dict[str, float] = opt({"a": 1.0}, "A mapping.")
    data: Data = opt(Data, "A nested section.")


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(Cfg, argv)
    return str(info.value)


# --------------------------------------------------------------------------- precedence


def test_defaults_yaml_cli_precedence(tmp_path):
    assert parse_config(Cfg, []) == Cfg()
    path = write(tmp_path, "count: 2\nname: from-yaml\ndata:\n  batch_size: 16\n  optim:\n    lr: 0.1\n")
    from_yaml = parse_config(Cfg, ["--config", str(path)])
    assert (from_yaml.count, from_yaml.name, from_yaml.data.batch_size, from_yaml.data.optim.lr) == (2, "from-yaml", 16, 0.1)
    assert from_yaml.data.optim.steps == 10 and from_yaml.rate == 0.5  # untouched keys keep defaults
    both = parse_config(Cfg, ["--config", str(path), "--count", "3", "--data.optim.lr=0.2", "--data.batch_size", "4"])
    assert (both.count, both.name, both.data.batch_size, both.data.optim.lr) == (3, "from-yaml", 4, 0.2)
    # CLI wins whatever the order of --config among the flags.
    assert parse_config(Cfg, ["--count", "5", "--config", str(path)]).count == 5


def test_dotted_keys_in_yaml_equal_nested_sections(tmp_path):
    nested = write(tmp_path, "data:\n  optim:\n    steps: 7\n", "nested.yaml")
    dotted = write(tmp_path, "data.optim.steps: 7\n", "dotted.yaml")
    assert parse_config(Cfg, ["--config", str(nested)]) == parse_config(Cfg, ["--config", str(dotted)])
    assert parse_config(Cfg, ["--data.optim.steps", "7"]).data.optim.steps == 7


def test_empty_yaml_and_empty_section_keep_defaults(tmp_path):
    assert parse_config(Cfg, ["--config", str(write(tmp_path, "# nothing set\n"))]) == Cfg()
    commented = write(tmp_path, "data:\n  # batch_size: 4\n", "commented.yaml")
    assert parse_config(Cfg, ["--config", str(commented)]) == Cfg()


# --------------------------------------------------------------------------- types


def test_every_type_parses_from_the_command_line():
    cfg = parse_config(Cfg, [
        "--count", "-4", "--rate", "1e-4", "--flag", "--name", "007", "--sizes", "3,4,5",
        "--limit", "9", "--mode", "slow", "--color", "blue", "--weights", "{b: 2}", "--data.optim.lr", "2",
    ])
    assert cfg.count == -4 and cfg.rate == 1e-4 and cfg.flag is True
    assert cfg.name == "007"  # a string field keeps the text as typed
    assert cfg.sizes == [3, 4, 5] and cfg.limit == 9 and cfg.mode == "slow"
    assert cfg.color is Color.BLUE and cfg.weights == {"b": 2.0}
    assert cfg.data.optim.lr == 2.0 and isinstance(cfg.data.optim.lr, float)
    assert parse_config(Cfg, ["--sizes", "[6, 7]"]).sizes == [6, 7]
    assert parse_config(Cfg, ["--sizes", "[]"]).sizes == []
    assert parse_config(Cfg, ["--flag", "false"]).flag is False
    assert parse_config(Cfg, ["--limit", "null"]).limit is None
    assert parse_config(Cfg, ["--name", "yes"]).name == "yes"


def test_every_type_parses_from_yaml(tmp_path):
    path = write(tmp_path, (
        "count: 12\nrate: 1e-5\nflag: true\nname: hello\nsizes: [9]\nlimit: null\n"
        "mode: slow\ncolor: blue\nweights: {x: 0.5, y: 2}\ndata: {batch_size: 2}\n"
    ))
    cfg = parse_config(Cfg, ["--config", str(path)])
    assert (cfg.count, cfg.rate, cfg.flag, cfg.name, cfg.sizes, cfg.limit) == (12, 1e-5, True, "hello", [9], None)
    assert cfg.mode == "slow" and cfg.color is Color.BLUE
    assert cfg.weights == {"x": 0.5, "y": 2.0} and cfg.data.batch_size == 2


@pytest.mark.parametrize(
    "argv, field, expected",
    [
        (["--count", "abc"], "count", "int"),
        (["--count", "1.5"], "count", "int"),
        (["--rate", "fast"], "rate", "float"),
        (["--flag", "maybe"], "flag", "bool"),
        (["--sizes", "1,x"], "sizes", "list[int]"),
        (["--limit", "many"], "limit", "int or null"),
        (["--mode", "medium"], "mode", "one of fast|slow"),
        (["--color", "green"], "color", "one of red|blue"),
        (["--weights", "[1]"], "weights", "dict[str, float]"),
    ],
)
def test_bad_value_names_field_type_and_value(argv, field, expected):
    message = problems_of(argv)
    assert f"command line: field '{field}' expects {expected}, got '{argv[1]}'" in message, message


def test_bad_value_in_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "count: 1\ndata:\n  optim:\n    steps: many\n")
    message = problems_of(["--config", str(path)])
    assert f"{path}:4: field 'data.optim.steps' expects int, got 'many'" in message


def test_value_missing_after_flag():
    assert "--count needs a value (int)" in problems_of(["--count"])


# --------------------------------------------------------------------------- unknown keys


def test_unknown_cli_key_names_command_line_and_closest_key():
    message = problems_of(["--data.optim.lrr", "0.1"])
    assert "command line: unknown key 'data.optim.lrr' (closest valid key: 'data.optim.lr')" in message
    assert "closest valid key: 'data.batch_size'" in problems_of(["--batch_size", "4"])


def test_unknown_yaml_key_names_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, "count: 1\ndata:\n  optim:\n    stesp: 3\n")
    message = problems_of(["--config", str(path)])
    assert f"{path}:4: unknown key 'data.optim.stesp' (closest valid key: 'data.optim.steps')" in message


def test_all_problems_are_reported_together(tmp_path):
    path = write(tmp_path, "cuont: 1\nrate: x\n")
    with pytest.raises(ConfigError) as info:
        parse_config(Cfg, ["--config", str(path), "--mode", "medium", "--colour", "red"])
    assert len(info.value.problems) == 4
    text = str(info.value)
    assert f"{path}:1: unknown key 'cuont'" in text and f"{path}:2: field 'rate'" in text
    assert "command line: field 'mode'" in text and "command line: unknown key 'colour'" in text


def test_section_given_a_value_is_rejected(tmp_path):
    assert "'data' is a section" in problems_of(["--data", "3"])
    path = write(tmp_path, "data: 3\n")
    assert f"{path}:1: 'data' is a section" in problems_of(["--config", str(path)])


# --------------------------------------------------------------------------- YAML files


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "count: 1\nsizes: [1, 2\nname: x\n")
    message = problems_of(["--config", str(path)])
    assert f"{path}:3: not valid YAML" in message, message
    tabbed = write(tmp_path, "count: 1\n\tname: x\n", "tab.yaml")
    assert f"{tabbed}:2: not valid YAML" in problems_of(["--config", str(tabbed)])


def test_yaml_that_is_not_a_mapping_or_missing(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    assert f"{path}:1: expected a mapping of keys to values, found list" in problems_of(["--config", str(path)])
    assert "no such file" in problems_of(["--config", str(tmp_path / "absent.yaml")])
    assert "unexpected argument 'stray'" in problems_of(["stray"])


def test_saved_config_reloads_to_the_same_config(tmp_path, capsys):
    cfg = parse_config(Cfg, ["--color", "blue", "--data.optim.lr", "0.25", "--sizes", "4"])
    uri = save_config(cfg, str(tmp_path / "run"))
    assert uri == str(tmp_path / "run" / "config.yaml")
    assert load_config_file(Cfg, uri) == cfg
    print_config(cfg, "demo")
    out = capsys.readouterr().out
    assert out.startswith("[demo] resolved config:") and "color: blue" in out and "lr: 0.25" in out


# --------------------------------------------------------------------------- --help


def test_help_lists_every_field_with_type_default_and_doc():
    text = format_help(Cfg, "jobs.example")
    assert "usage: python -m jobs.example" in text and "A config that uses every supported field type." in text
    assert "--count int  (default: 1)" in text
    assert "--limit int or null  (default: None)" in text
    assert "--mode one of fast|slow  (default: 'fast')" in text
    assert "--color one of red|blue  (default: 'red')" in text
    assert "--weights dict[str, float]  (default: {'a': 1.0})" in text
    assert "--data.optim.lr float  (default: 0.001)" in text
    for key, (_, f) in field_paths(Cfg).items():
        assert f"--{key} " in text and f.metadata["doc"] in text


def test_job_help_via_subprocess_lists_every_field():
    from jobs.prepare_dataset import Config

    result = subprocess.run(
        [sys.executable, "-m", "jobs.prepare_dataset", "--help"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m jobs.prepare_dataset")
    for key, (_, f) in field_paths(Config).items():
        assert f"--{key} " in result.stdout and f.metadata["doc"] in result.stdout, key
    assert "--format one of twitter2015|twitter2017|mnre|synthetic|jsonl  (default: 'synthetic')" in result.stdout
    assert "--storage.endpoint_url str or null  (default: None)" in result.stdout


def test_job_bad_flag_exits_with_one_line_not_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.prepare_dataset", "--fromat", "mnre"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "unknown key 'fromat' (closest valid key: 'format')" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- hostile and broken input


def alias_bomb(levels: int) -> str:
    """A "billion laughs": each line an anchor whose list uses the previous alias nine times."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nname: *l{levels - 1}\n"


def test_alias_bomb_is_refused_naming_file_and_line(tmp_path):
    # Six levels expand to ~600k values (a 4 MB error message before); nine to 10^9 (312 MB).
    for levels in (6, 9):
        path = write(tmp_path, alias_bomb(levels), f"bomb{levels}.yaml")
        with pytest.raises(ConfigError) as info:
            parse_config(Cfg, ["--config", str(path)])
        message = str(info.value)
        assert len(message) < 500, message[:1000]
        assert f"{path}:6: refused: its aliases expand to" in message and "at most 100000" in message


def test_alias_that_contains_itself_is_refused(tmp_path):
    path = write(tmp_path, "count: 1\nsizes: &s [1, *s]\n")
    assert f"{path}:2: refused: an alias refers to a value that contains it" in problems_of(["--config", str(path)])


def test_small_aliases_and_merge_keys_still_work(tmp_path):
    path = write(tmp_path, "weights: &w {a: 2.0}\ndata:\n  <<: {batch_size: 3}\n  batch_size: 5\n  optim: *w\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.optim.a'"):  # the alias expands: a real key check
        parse_config(Cfg, ["--config", str(path)])
    path = write(tmp_path, "sizes: &s [4, 5]\nlimit: 2\ndata:\n  <<: {batch_size: 3, optim: {steps: 4}}\n  batch_size: 5\n",
                 "merge.yaml")
    cfg = parse_config(Cfg, ["--config", str(path)])  # an explicit key overrides a merged one: no repeat
    assert cfg.sizes == [4, 5] and cfg.data.batch_size == 5 and cfg.data.optim.steps == 4


@pytest.mark.parametrize("where", ["yaml", "cli"])
def test_long_value_in_an_error_is_cut_with_its_length(tmp_path, where):
    value = "9" * 50 + "x" * 5000
    if where == "yaml":
        argv = ["--config", str(write(tmp_path, f"count: {value}\n"))]
    else:
        argv = ["--count", value]
    message = problems_of(argv)
    assert "field 'count' expects int, got '" + "9" * 50 in message
    assert f"… ({len(value) + 2} chars)" in message  # the repr's length: the value and its quotes
    assert len(message) < 600, len(message)


def test_long_unknown_key_is_cut(tmp_path):
    message = problems_of(["--" + "k" * 10_000, "1"])
    assert "unknown key 'kkk" in message and "(10000 chars)" in message and len(message) < 600


def test_non_utf8_file_names_file_line_and_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("count: 1\nname: caf\u00e9\n".encode("latin-1"))
    message = problems_of(["--config", str(path)])
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at offset 18); save the file as UTF-8" in message


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffname: café\n".encode())
    assert parse_config(Cfg, ["--config", str(path)]).name == "café"


def test_repeated_yaml_key_names_both_lines(tmp_path):
    path = write(tmp_path, "count: 1\nname: a\ncount: 2\n")
    assert f"{path}:3: key 'count' repeats line 1; set each key once" in problems_of(["--config", str(path)])
    nested = write(tmp_path, "data:\n  batch_size: 4\n  optim: {lr: 0.1, lr: 0.2}\n", "nested.yaml")
    assert f"{nested}:3: key 'data.optim.lr' repeats line 3" in problems_of(["--config", str(nested)])
    both = write(tmp_path, "data:\n  batch_size: 4\ndata.batch_size: 8\n", "both.yaml")
    assert f"{both}:3: key 'data.batch_size' repeats line 2" in problems_of(["--config", str(both)])


def test_repeated_cli_flag_names_both_places():
    message = problems_of(["--count", "1", "--rate", "0.1", "--count=2"])
    assert "command line: --count is given twice ('--count 1' at argument 1, '--count=2' at argument 5); give it once" in message
    assert "--data.batch_size is given twice" in problems_of(["--data.batch_size", "1", "--data.batch-size", "2"])
    assert "--config is given twice" in problems_of(["--config", "a.yaml", "--config", "b.yaml"])


def test_help_into_a_closed_pipe_exits_quietly():
    # `python -m jobs.X --help | head -1`: the reader is gone before the help is written.
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.prepare_dataset", "--help"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, stderr
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr
