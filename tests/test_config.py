from pathlib import Path

import pytest

from modelmora import ConfigError, ManagerConfig
from modelmora.config import Budget

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads() -> None:
    cfg = ManagerConfig.from_yaml(ROOT / "configs" / "modelmora.yaml")
    assert cfg.models["qwen-14b"].memory == {"cuda:0": 11_500_000_000}
    assert cfg.models["sdxl-controlnet"].group == "heavy"
    assert cfg.models["gpt-sovits"].group is None
    assert cfg.budgets["cuda:0"].resolve(None) == 15_500_000_000
    assert cfg.default_model == "qwen-14b"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mm.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  a:\n    keep_alvie: 5m\n",
            "models.a.keep_alvie: unknown field (did you mean 'keep_alive'?)",
        ),
        (
            "models:\n  a:\n    memory: -3GB\n",
            "models.a.memory.cuda:0: a size must be a finite, non-negative amount",
        ),
        ("idle_ttl: soon\n", "idle_ttl: expected a duration"),
        ("budgets:\n  cuda:0: 150%\n", "budgets.cuda:0: a percentage budget must be in (0, 100]"),
        ("modles: {}\n", "modles: unknown field (did you mean 'models'?)"),
        (  # a field that may be unset (Hooks | None) suggests too, as the global hooks do
            "models:\n  a:\n    hooks: {afterload: x}\n",
            "models.a.hooks.afterload: unknown field (did you mean 'after_load'?)",
        ),
        (
            "default_model: qwen\nmodels:\n  qwen-14b: {}\n",
            "default_model: 'qwen' is not a registered model (did you mean 'qwen-14b'?)",
        ),
        ("models:\n  a: [\n", "invalid YAML at line"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
        ("max_loaded_models: 0\n", "max_loaded_models:"),
        ("models:\n  '../x': {}\n", "invalid model name '../x'"),
    ],
)
def test_bad_yaml_gives_one_line_naming_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        ManagerConfig.from_yaml(path)
    message = str(info.value)
    assert message.startswith(str(path) + ":")
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        ManagerConfig.from_yaml(tmp_path / "nope.yaml")


def test_environment_overrides() -> None:
    env = {
        "MODELMORA_IDLE_TTL": "10m",
        "MODELMORA_BUDGETS": "cuda:0=12GB,cpu=50%",
        "MODELMORA_PROVIDERS__OLLAMA__BASE_URL": "http://10.0.0.2:11434",
        "MODELMORA_MAX_LOADED_MODELS": "2",
        "OTHER": "ignored",
    }
    cfg = ManagerConfig.from_dict({"idle_ttl": "1m"}, environ=env)
    assert cfg.idle_ttl == 600
    assert cfg.budgets["cuda:0"] == Budget(bytes=12_000_000_000)
    assert cfg.budgets["cpu"] == Budget(percent=50)
    assert cfg.providers["ollama"]["base_url"] == "http://10.0.0.2:11434"
    assert cfg.max_loaded_models == 2


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MODELMORA_BUDGETS"):
        ManagerConfig.from_dict({}, environ={"MODELMORA_BUDGETS": "12GB"})
    with pytest.raises(ConfigError, match="idle_ttl"):
        ManagerConfig.from_dict({}, environ={"MODELMORA_IDLE_TTL": "soon"})


def test_merged_overrides_for_one_chain() -> None:
    cfg = ManagerConfig.from_dict(
        {"models": {"a": {"memory": "1GB"}}, "idle_ttl": "5m", "providers": {"ollama": {"base_url": "x"}}}
    )
    chain_cfg = cfg.merged({"idle_ttl": 0, "providers": {"ollama": {"timeout": 30}}})
    assert chain_cfg.idle_ttl == 0
    assert chain_cfg.providers["ollama"] == {"base_url": "x", "timeout": 30}
    assert cfg.idle_ttl == 300  # the original is untouched
    with pytest.raises(ConfigError, match="overrides: idle_tll: unknown field"):
        cfg.merged({"idle_tll": 0})


def test_budget_resolution() -> None:
    assert Budget.parse("90%").resolve(10_000) == 9000
    assert Budget.parse("90%").resolve(None) is None
    assert Budget.parse("1GB").resolve(None) == 10**9
    assert str(Budget.parse("90%")) == "90%"


def test_dump_and_reload_is_lossless() -> None:
    cfg = ManagerConfig.from_dict(
        {
            "budgets": {"cuda:0": 1234567, "cpu": "33.3%"},
            "models": {"a": {"memory": "1.23456GB", "keep_alive": -1}},
        }
    )
    again = ManagerConfig.from_dict(cfg.model_dump(mode="json"))
    assert again == cfg
    assert again.budgets["cuda:0"].bytes == 1234567 and again.budgets["cpu"].percent == 33.3
