"""Fuzzed configuration: every input is either a valid config or one ConfigError line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelmora import ConfigError, ManagerConfig

FIELDS = [
    "provider",
    "target",
    "device",
    "memory",
    "group",
    "keep_alive",
    "pinned",
    "load_timeout",
    "load_time",
    "options",
    "warm_tier",
    "bogus",
]
TOP = [
    "models",
    "providers",
    "budgets",
    "reserve",
    "default_model",
    "idle_ttl",
    "max_loaded_models",
    "wait_timeout",
    "verbose",
    "reaper_interval",
    "reconcile_interval",
    "failure_cooldown",
    "nonsense",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.integers(),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64]),  # past what a float or a counter holds
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["5m", "-1", "0", "11.5GB", "90%", "150%", "512MiB", "-3GB", "1h30m", "../x", "qwen-14b", "cuda:0"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
model_specs = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)
configs = st.fixed_dictionaries(
    {},
    optional={
        "models": st.one_of(
            values,
            st.dictionaries(
                st.one_of(st.text(max_size=10), st.sampled_from(["qwen-14b", "a/b", "../etc"])),
                model_specs,
                max_size=3,
            ),
        ),
        "budgets": st.one_of(
            values,
            st.dictionaries(
                st.sampled_from(["cuda:0", "cpu", "x"]),
                st.one_of(
                    scalars,
                    st.fixed_dictionaries(
                        {}, optional={"bytes": scalars, "percent": scalars, "other": scalars}
                    ),
                ),
                max_size=2,
            ),
        ),
        **{k: values for k in TOP if k not in ("models", "budgets")},
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_config_dicts_validate_or_fail_with_one_line(data: dict[str, object]) -> None:
    try:
        cfg = ManagerConfig.from_dict(data, source="fuzz")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz: "), message
        assert "\n" not in message
        assert message.count(":") >= 2  # names a field (or the top level) and what was wrong
    else:
        for name, spec in cfg.models.items():
            assert spec.name == name and ".." not in name
            assert all(v >= 0 for v in spec.memory.values())
            assert spec.keep_alive is None or spec.keep_alive >= 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_yaml_text_never_escapes_as_an_unhandled_error(tmp_path_factory: object, text: str) -> None:
    path = Path(str(tmp_path_factory.mktemp("y"))) / "c.yaml"  # type: ignore[attr-defined]
    path.write_text(text, encoding="utf-8")
    try:
        ManagerConfig.from_yaml(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_yaml_round_trip_of_fuzzed_dicts(tmp_path_factory: object, data: dict[str, object]) -> None:
    path = Path(str(tmp_path_factory.mktemp("r"))) / "c.yaml"  # type: ignore[attr-defined]
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return
    path.write_text(text, encoding="utf-8")
    try:
        a = ManagerConfig.from_yaml(path)
    except ConfigError:
        return
    b = ManagerConfig.from_dict(a.model_dump(mode="json"), source="round-trip")
    assert a == b


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=60),
        st.sampled_from(
            [
                "../../etc/passwd",
                "a;rm -rf /",
                "$(reboot)",
                "a`id`",
                "qwen\n14b",
                "ｑｗｅｎ",
                "a/../b",
                "/abs",
                "a b",
                "-rf",
            ]
        ),
    )
)
def test_model_names_are_plain_or_refused(name: str) -> None:
    from modelmora.spec import check_name

    try:
        ok = check_name(name)
    except ValueError as exc:
        assert repr(name) in str(exc)
        return
    # what passes can reach a URL, a container label or a file name without escaping
    assert ok == name and ".." not in name and not name.startswith(("/", "-", "."))
    assert not set(name) & set(" ;$`|&<>()\\\n\t'\"*?!{}[]~#%")
    assert name.isascii()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, st.sampled_from(["", "idle_ttl: 5m\n", "models:\n  a: {}\n"]), st.booleans())
def test_fuzzed_config_files_through_the_cli(
    tmp_path_factory: object, data: dict[str, object], prefix: str, doubled: bool
) -> None:
    """Whatever the file holds (duplicate keys included), a command reads it and succeeds,
    or says what is wrong in one line: never a traceback."""
    from typer.testing import CliRunner

    from modelmora.cli import app

    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return
    text = prefix + text + (prefix if doubled else "")  # the same key twice when doubled
    path = Path(str(tmp_path_factory.mktemp("f"))) / "c.yaml"  # type: ignore[attr-defined]
    path.write_text(text, encoding="utf-8")
    for args in (["models", "list", "--json"], ["plan", "a"]):
        result = CliRunner().invoke(app, [*args, "-c", str(path)], env={"COLUMNS": "200"})
        assert result.exit_code in (0, 1), (args, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code == 1:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "data",
    [
        {"budgets": {"\x1e": "1GB"}},  # the fuzz's find: a record separator in a key
        {"budgets": {"": {"\x1e": 1}}},
        {"models": {"a": {"memory": "1GB\u2028x"}}},  # a line separator in a value
        {"idle_ttl": "5m\x0bsoon"},
    ],
)
def test_control_characters_in_a_config_stay_on_the_error_line(tmp_path: Path, data: dict[str, object]) -> None:
    """A key or value with a character that ends a line for ``str.splitlines`` (\\x1e,
    \\u2028, \\x0b, …) is written escaped: the error is still one line (red: the fuzz
    found ``budgets.'': \\x1e: Extra inputs`` printed on two)."""
    from typer.testing import CliRunner

    from modelmora.cli import app

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    result = CliRunner().invoke(app, ["models", "list", "-c", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1, repr(result.stderr)
