from dataclasses import dataclass, field

import pytest

from beit_ray.config import (
    ConfigError,
    RayConfig,
    StorageConfig,
    check,
    help_text,
    parse_args,
    save_config,
    to_dict,
)


@dataclass
class OptimSection:
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    schedule: str = "cosine"
    """Schedule name."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")


@dataclass
class DemoConfig:
    """A demo job."""

    optim: OptimSection = field(default_factory=OptimSection)
    """The optimizer."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Storage."""
    steps: int = 10
    """How many steps."""


def test_defaults_yaml_and_cli_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 0.5\n  schedule: linear\nsteps: 3\n")
    cfg = parse_args(DemoConfig, ["--config", str(cfg_file), "--optim.lr", "1e-4", "--steps=7"])
    assert cfg.optim.lr == pytest.approx(1e-4)  # CLI beats the file
    assert cfg.optim.schedule == "linear"  # the file beats the default
    assert cfg.optim.betas == (0.9, 0.98)  # default kept
    assert cfg.steps == 7
    cfg = parse_args(DemoConfig, ["--optim.betas", "[0.8, 0.9]", "--ray.num_cpus", "2"])
    assert cfg.optim.betas == (0.8, 0.9) and cfg.ray.num_cpus == 2


@pytest.mark.parametrize(
    "argv, field_name",
    [
        (["--optim.lr", "-1"], "optim.lr"),
        (["--optim.lr", "fast"], "optim.lr"),
        (["--steps", "many"], "steps"),
        (["--optim.betas", "[1, 2, 3]"], "optim.betas"),
        (["--optim.lrr", "1"], "optim.lrr"),
        (["--ray.num_cpus", "0"], "ray.num_cpus"),
        (["--storage.endpoint_url", "localhost:9000"], "storage.endpoint_url"),
    ],
)
def test_bad_values_name_the_field(argv, field_name):
    with pytest.raises(ConfigError) as err:
        parse_args(DemoConfig, argv)
    assert str(err.value).startswith(field_name), str(err.value)


def test_help_lists_every_field_with_doc_and_default(capsys):
    text = help_text(DemoConfig)
    assert "--optim.lr (float, default 0.001)" in text
    assert "Peak learning rate." in text
    assert "--steps (int, default 10)" in text
    with pytest.raises(SystemExit):
        parse_args(DemoConfig, ["--help"])
    assert "--ray.address" in capsys.readouterr().out


def test_saved_config_round_trips_and_hides_secrets(tmp_path):
    cfg = parse_args(DemoConfig, ["--optim.lr", "0.25", "--storage.secret_access_key", "hunter2"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(path))
    text = path.read_text()
    assert "hunter2" not in text and "<redacted>" in text
    again = parse_args(DemoConfig, ["--config", str(path), "--storage.secret_access_key", "x"])
    assert to_dict(again.optim) == to_dict(cfg.optim)
