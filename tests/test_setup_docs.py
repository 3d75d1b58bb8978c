"""The set-up a newcomer follows stays true: the README's test command is the one CI runs,
and the lock pins every package pyproject.toml asks for, at a version its ranges allow."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-dev.txt"
LOCKED_EXTRAS = ("dev", "torch", "llama", "ray")  # what .ci/lock.sh compiles


def setup_block() -> list[str]:
    """The commands of the code block under '## Set up and run' that runs the demo."""
    section = (ROOT / "README.md").read_text().split("\n## Set up and run\n", 1)[1].split("\n## ", 1)[0]
    [block] = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "modelmora demo" in b]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readme_has_two_commands_and_ci_runs_the_second_word_for_word() -> None:
    demo, tests = setup_block()
    assert demo.endswith("modelmora demo")
    ci = (ROOT / ".ci" / "run").read_text()
    [command] = re.findall(r"^README_TEST_COMMAND='(.*)'$", ci, re.M)
    assert tests == command


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def wanted() -> list[Requirement]:
    """pyproject's dependencies plus the locked extras, with modelmora[...] expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(LOCKED_EXTRAS), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in extras[extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "modelmora":
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def test_the_lock_pins_everything_pyproject_asks_for_within_its_ranges() -> None:
    pins = locked()
    for req in wanted():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in {LOCK.name}: run bash .ci/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside {req}: run bash .ci/lock.sh"
        )
    assert pins["torch"] == Version("2.13.0+cpu")  # the CPU build; any other is a multi-GB CUDA one


def test_the_configuration_table_names_every_config_field() -> None:
    """README's Configuration table says 'Every field': a field added to the config (or to
    a model's spec) without a row there is a key a newcomer cannot find."""
    from modelmora.config import ManagerConfig
    from modelmora.spec import ModelSpec

    section = (ROOT / "README.md").read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    rows = [cell for line in table.splitlines() for cell in re.findall(r"`([^`]+)`", line.split(" | ")[0])]
    top = {row.split(".", 1)[0].split(" ", 1)[0] for row in rows}
    per_model = {row.split(".")[2] for row in rows if row.startswith("models.<name>.")}
    missing = [f for f in ManagerConfig.model_fields if f not in top]
    missing += [f"models.<name>.{f}" for f in ModelSpec.model_fields if f != "name" and f not in per_model]
    assert not missing, f"README's Configuration table lacks: {', '.join(missing)}"
