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


@dataclass
class OwnDefaultsConfig:
    """A job whose section default differs from the section class's own."""

    optim: OptimSection = field(default_factory=lambda: OptimSection(schedule="linear"))
    """The optimizer, linear by default here."""


def test_a_partial_section_keeps_the_jobs_own_defaults(tmp_path):
    """`--optim.lr X` (or a file setting only optim.lr) keeps this job's schedule: it once
    rebuilt the section from the class defaults (fine-tuning's `--checkpoint.storage_path`
    renamed the run to pretrain-debug; pretraining's `--data.*` lost the codebook tokenizer)."""
    assert parse_args(OwnDefaultsConfig, ["--optim.lr", "0.5"]).optim.schedule == "linear"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 0.5\n")
    assert parse_args(OwnDefaultsConfig, ["--config", str(cfg_file)]).optim.schedule == "linear"
    given = parse_args(OwnDefaultsConfig, ["--optim.schedule", "cosine"])
    assert given.optim.schedule == "cosine"


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


# --------------------------------------------------------------------------- one resolution flag


def test_one_flag_sets_a_jobs_resolution():
    from beit_ray.data.config import TokenizeConfig
    from beit_ray.train.config import FinetuneConfig, PretrainConfig

    seg = parse_args(
        FinetuneConfig,
        ["--task", "segmentation", "--model.image_size", "64", "--data.source", "x"],
    )
    assert (seg.data.image_size, seg.data.patch_size, seg.data.grid) == (64, 8, 8)
    # The DALL-E tokenizer (DataConfig's default) is not fine-tuning's business: a tokenizer
    # view that would not fit it is not checked there, but is for pretraining.
    odd = ["--model.image_size", "64", "--data.source", "x", "--data.tokenizer_image_size", "24"]
    assert parse_args(FinetuneConfig, odd).data.tokenizer_image_size == 24
    with pytest.raises(ConfigError, match=r"^data\.tokenizer_image_size: the DALL-E"):
        parse_args(PretrainConfig, [*odd, "--data.tokenizer", "dalle"])
    pre = parse_args(PretrainConfig, ["--model.image_size", "64"])
    assert (pre.data.image_size, pre.data.grid, pre.data.tokenizer_image_size) == (64, 8, 64)
    assert pre.data.masking_patches == round(0.3827 * 64)
    base = parse_args(PretrainConfig, ["--model.flavour", "base", "--data.tokenizer", "dalle"])
    assert (base.data.image_size, base.data.patch_size, base.data.tokenizer_image_size) == (
        224, 16, 112
    )  # fmt: skip
    # The resolved config round-trips (saved config.yaml, config.replace).
    again = parse_args(FinetuneConfig, [])
    assert to_dict(build_again(again)) == to_dict(again)
    tok = TokenizeConfig(input="a", output="b")  # no model: BEiT-base's sizes
    assert (tok.data.image_size, tok.data.patch_size, tok.data.tokenizer_image_size) == (
        224, 16, 112
    )  # fmt: skip


def build_again(cfg):
    from beit_ray.config import build

    return build(type(cfg), to_dict(cfg))


@pytest.mark.parametrize(
    "argv, field_name",
    [
        (["--model.image_size", "64", "--data.image_size", "32"], "data.image_size"),
        (["--data.patch_size", "16"], "data.patch_size"),  # debug's patch is 8
        (["--model.image_size", "60"], "model.image_size"),  # not a multiple of 8
        (["--data.crop_pct", "1.2"], "data.crop_pct"),
    ],
)
def test_sizes_that_disagree_with_the_model_name_the_field(argv, field_name):
    from beit_ray.train.config import FinetuneConfig

    with pytest.raises(ConfigError) as err:
        parse_args(FinetuneConfig, argv)
    assert str(err.value).startswith(field_name), str(err.value)
