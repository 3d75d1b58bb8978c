import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelmora.spec import ModelSpec, check_name, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("11.5GB", 11_500_000_000),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("100", 100),
        (2048, 2048),
        ("3.5gb", 3_500_000_000),
        ("0", 0),
        ("1KB", 1000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["-3GB", "12 parsecs", "GB", "", "nan", "inf", True, None, [1]])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("10s", 10.0),
        (0, 0.0),
        ("0", 0.0),
        (300, 300.0),
        ("2.5", 2.5),
        (-1, math.inf),
        ("-1", math.inf),
        ("24h", 86400.0),
    ],
)
def test_parse_duration(text: str | int, expected: float) -> None:
    assert parse_duration(text) == expected


# only -1 means never (issue 26): "-1m" was forever too, and so were NaN and -inf
@pytest.mark.parametrize(
    "bad", ["5 minutes", "m5", "1h 30m", "", "abc", "nan", True, "-1m", "-5", -5, "inf", "-inf", math.nan]
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


@settings(deadline=None)  # no timing asserts: a loaded machine stalls an example
@given(st.integers(min_value=0, max_value=10**15))
def test_size_roundtrip_through_bytes(n: int) -> None:
    assert parse_size(str(n)) == n
    assert parse_size(n) == n


@settings(deadline=None)  # no timing asserts: a loaded machine stalls an example
@given(st.text(max_size=30))
def test_parse_size_never_crashes_unexpectedly(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_size(text) >= 0


@settings(deadline=None)  # no timing asserts: a loaded machine stalls an example
@given(st.text(max_size=30))
def test_parse_duration_never_crashes_unexpectedly(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_duration(text) >= 0


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "a b", "rm -rf;", "x\n", "-flag", "a/../b", "$(id)", "ü", "a//b", ""]
)
def test_names_that_could_reach_a_shell_or_path_are_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        check_name(name)


@pytest.mark.parametrize(
    "name", ["qwen-14b", "qwen2.5:14b", "ollama/mistral-small:22b", "org/model@rev", "a.b_c+d"]
)
def test_names_people_use_are_accepted(name: str) -> None:
    assert check_name(name) == name


def test_spec_shorthand_memory_goes_to_its_device() -> None:
    spec = ModelSpec(name="tts", memory="3.5GB", device="cuda:1")
    assert spec.memory == {"cuda:1": 3_500_000_000}
    assert spec.target == "tts"
    assert spec.total_memory == 3_500_000_000


def test_spec_serialises_forever_as_minus_one() -> None:
    spec = ModelSpec(name="m", keep_alive=-1)
    assert spec.keep_alive == math.inf
    assert spec.model_dump(mode="json")["keep_alive"] == -1
    assert ModelSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_format_size() -> None:
    assert format_size(11_500_000_000) == "11.5 GB"
    assert format_size(512) == "512 B"
