"""The config schema: YAML loading, dotted overrides, errors that name the field, shipped configs, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    DEFAULT_REWARDS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_to_yaml,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_follow_the_reference_recipe():
    c = TrainConfig()
    assert c.generation.num_generations == 16 and c.generation.max_completion_length == 200
    assert c.optim.lr == 5e-6 and c.optim.betas == (0.9, 0.99) and c.optim.weight_decay == 0.1
    assert c.optim.warmup_ratio == 0.1 and c.optim.scheduler == "cosine" and c.optim.max_grad_norm == 0.1
    assert c.checkpoint.every_steps == 100
    assert c.rewards == DEFAULT_REWARDS and set(c.rewards.values()) == {1.0}
    assert c.launch.num_rollout_servers == 1 and c.warm_start.enabled is False and c.eval.every_steps == 0


def test_yaml_load_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        yaml.safe_dump({"run": {"name": "x"}, "optim": {"lr": 1e-5}, "deepspeed": {"zero_stage": 3}})
    )
    c = load_config(
        p, ["optim.lr=2e-6", "rollout.server_urls=[http://a:1, http://b:2]", "model.tiny.num_layers=3"]
    )
    assert c.run.name == "x" and c.deepspeed.zero_stage == 3
    assert c.optim.lr == 2e-6  # the override wins over the file
    assert c.rollout.server_urls == ["http://a:1", "http://b:2"]
    assert c.model.tiny.num_layers == 3
    assert c.run_dir == Path("runs") / "x" and c.checkpoint_dir == Path("runs") / "x" / "checkpoints"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("a.b=1", (["a", "b"], 1)),
        ("a=1e-6", (["a"], 1e-6)),
        ("a=true", (["a"], True)),
        ("a=null", (["a"], None)),
        ("a=[1, 2]", (["a"], [1, 2])),
        ("a=text=with=equals", (["a"], "text=with=equals")),
        ("a=", (["a"], "")),
    ],
)
def test_parse_override_values_are_yaml(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["novalue", "a..b=1", "=1"])
def test_malformed_overrides_are_errors(item):
    with pytest.raises(ConfigError):
        apply_overrides({}, [item])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.betas=[0.9, 1.5]", "optim.betas"),
        ("optim.typo=1", "optim.typo"),
        ("generation.num_generations=1", "generation.num_generations"),
        ("objective.epsilon=2", "objective.epsilon"),
        ("objective.loss_type=ppo", "objective.loss_type"),
        ("deepspeed.zero_stage=1", "deepspeed.zero_stage"),
        ("rollout.server_urls=[]", "rollout.server_urls"),
        ("rollout.sync_backend=mpi", "rollout.sync_backend"),
        ("launch.num_trainer_ranks=0", "launch.num_trainer_ranks"),
        ("launch.rollout_backend=sglang", "launch.rollout_backend"),
        ("launch.server_extra_args=[--max-model-lenn, 1024]", "launch.server_extra_args"),
        ("launch.server_extra_args=[--max-model-len, many]", "launch.server_extra_args"),
        ("launch.server_extra_args=[--port, 9000]", "launch.server_extra_args"),
        ("data.source=jsonl", "data"),
        ("rewards={nope: 1.0}", "rewards"),
        ("custom_rewards={nocolon: 1.0}", "custom_rewards"),
        ("unknown_section.x=1", "unknown_section"),
    ],
)
def test_invalid_values_name_the_field(override, path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"\n  {path}:" in str(e.value), str(e.value)


def test_cross_field_errors_name_the_fields_without_dumping_the_config():
    with pytest.raises(ConfigError) as e:
        load_config("configs/cpu-demo.yaml", ["rollout.max_off_policy_steps=1"])
    text = str(e.value)
    assert "importance_sampling_cap" in text and "max_off_policy_steps" in text, text
    assert "warm_start" not in text and len(text) < 400, text  # not the whole config echoed back
    with pytest.raises(ConfigError, match=r"\(got 'fast'\)"):  # a scalar's value is still shown
        load_config(None, ["optim.lr=fast"])


def test_offload_param_needs_stage3():
    with pytest.raises(ConfigError, match="offload_param"):
        load_config(None, ["deepspeed.offload_param=true", "deepspeed.zero_stage=2"])
    assert load_config(
        None, ["deepspeed.offload_param=true", "deepspeed.zero_stage=3"]
    ).deepspeed.offload_param


def test_every_field_is_documented():
    def walk(model_cls, prefix=""):
        for name, f in model_cls.model_fields.items():
            assert f.description, f"{prefix}{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(TrainConfig)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate_and_round_trip(path):
    c = load_config(path)
    again = TrainConfig.model_validate(yaml.safe_load(config_to_yaml(c)))
    assert again == c


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"qwen2.5-0.5b-gsm8k.yaml", "qwen2.5-1.5b-gsm8k-long.yaml", "cpu-tiny-test.yaml"} <= names


def test_loss_config_is_extracted_unchanged():
    c = load_config(None, ["objective.beta=0.04", "objective.loss_type=grpo", "objective.epsilon_high=0.28"])
    lc = c.objective.loss_config()
    assert (lc.beta, lc.loss_type, lc.epsilon_high) == (0.04, "grpo", 0.28)


def test_cli_rejects_an_invalid_config_naming_the_field():
    r = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", "configs/cpu-tiny-test.yaml", "optim.lr=-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "optim.lr" in r.stderr and "greater than 0" in r.stderr


def test_api_token_comes_from_the_environment_and_never_reaches_disk(monkeypatch):
    from trainer.config import config_to_yaml, load_config

    monkeypatch.setenv("ROLLOUT_API_TOKEN", "s3cret-from-env")
    cfg = load_config("configs/cpu-tiny-test.yaml")
    assert cfg.rollout.api_token == "s3cret-from-env"
    assert "s3cret-from-env" not in config_to_yaml(cfg)
    explicit = load_config("configs/cpu-tiny-test.yaml", ["rollout.api_token=given"])
    assert explicit.rollout.api_token == "given"
    monkeypatch.delenv("ROLLOUT_API_TOKEN")
    assert load_config("configs/cpu-tiny-test.yaml").rollout.api_token is None


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=180
    )


@pytest.mark.parametrize("module", ["trainer", "launch"])
def test_bad_configuration_exits_2_naming_the_field_or_line(module, tmp_path):
    """Malformed YAML, an invalid value and a model folder that does not exist: exit 2, one line that says
    what to fix, no traceback (the launcher used to raise ConfigError / yaml.ParserError uncaught)."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run:\n  name: x\n optim: [\n")
    r = _cli(module, "--config", str(bad_yaml))
    assert r.returncode == 2, r.stderr
    assert "not valid YAML at line" in r.stderr and "Traceback" not in r.stderr

    r = _cli(module, "--config", "configs/cpu-tiny-test.yaml", "optim.lr=-1")
    assert r.returncode == 2 and "optim.lr" in r.stderr and "Traceback" not in r.stderr, r.stderr

    missing = tmp_path / "no-such-model"
    r = _cli(module, "--config", "configs/cpu-tiny-test.yaml", f"model.name_or_path={missing}")
    assert r.returncode == 2 and "model.name_or_path" in r.stderr and "Traceback" not in r.stderr, r.stderr

    r = _cli(module, "--config", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2 and "absent.yaml" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_server_extra_args_are_checked_by_the_servers_own_parser():
    ok = load_config(None, ["launch.server_extra_args=[--max-model-len, 1024, --enforce-eager]"])
    assert ok.launch.server_extra_args == ["--max-model-len", "1024", "--enforce-eager"]
    with pytest.raises(ConfigError, match="unrecognized arguments: --max-model-lenn"):
        load_config(None, ["launch.server_extra_args=[--max-model-lenn, 1024]"])
    with pytest.raises(ConfigError, match="--backend is set by the launcher"):
        load_config(None, ["launch.server_extra_args=[--backend=torch]"])
