"""Typed job configs: section dataclasses, YAML files and ``--section.field value`` overrides.

Precedence is CLI > YAML file > dataclass defaults. Every field carries a docstring (the string
literal under it), which ``--help`` prints. Validation lives in each section's
``__post_init__`` and raises :class:`ConfigError` naming ``section.field``, so a bad value fails
before any cluster work starts.

    cfg = parse_args(PretrainConfig, sys.argv[1:])   # --config cfg.yaml --train.lr 1e-3
    save_config(cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, TypeVar

import yaml

from beit_ray.errors import ConfigError, check
from beit_ray.storage import StorageConfig  # noqa: F401 - the storage section, re-exported

T = TypeVar("T")


def run_job(main: typing.Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """A job's exit code: ``main(argv)``'s int (0 otherwise), or 2 after printing ``config
    error: <field>: <why>`` when a value is bad or missing. Every ``jobs/*.py`` ends with
    ``sys.exit(run_job(main))``: one way to report a bad config, before any cluster work.
    Any other failure exits 1 with the original exception under Ray's wrappers and one line
    of context (``beit_ray.console.report_error``); the full traceback goes to the job's log."""
    try:
        code = main(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from beit_ray.console import report_error

        return report_error(e)
    finally:
        from beit_ray import console

        console.finish()
    return code if isinstance(code, int) else 0


@dataclass
class JobFlags:
    """Switches every job takes besides its config fields (``--dry-run``, ``--verbose``)."""

    dry_run: bool = False
    """Print the resolved plan and exit 0 (2 on a config error) without starting Ray."""
    verbose: bool = False
    """Also show Ray's, DeepSpeed's, Serve's and the workers' own output on the console (it
    always goes to the job's log file)."""


JOB_FLAGS = {"--dry-run": "dry_run", "--verbose": "verbose"}


def job_flags(argv: list[str] | None = None) -> tuple[JobFlags, list[str]]:
    """Split ``--dry-run`` / ``--verbose`` (value-less) from a job's arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = JobFlags()
    rest = []
    for arg in argv:
        if arg in JOB_FLAGS:
            setattr(flags, JOB_FLAGS[arg], True)
        else:
            rest.append(arg)
    return flags, rest


def on_demo_data(argv: list[str], real_data: tuple[str, ...]) -> bool:
    """Whether a job runs on its embedded demo data, so its demo settings apply: no
    ``--config`` and none of ``real_data`` (e.g. ``--data.source``) given, as ``--opt value``
    or ``--opt=value``."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return not ({"--config", *real_data} & given)


# --------------------------------------------------------------------------- field docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for prev, node in zip(body, body[1:], strict=False):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


# --------------------------------------------------------------------------- coercion


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML/CLI value into ``tp`` or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{name}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], name) for v in value)
            if args and len(args) != len(value):
                raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)}")
            return (
                tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=False))
                if args
                else tuple(value)
            )
        return [_coerce(v, args[0], name) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        if args:
            return {_coerce(k, args[0], name): _coerce(v, args[1], name) for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if _is_section(tp):
        return build(tp, value, prefix=name)
    return value


def build(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            close = [
                k for k in known if k.replace("_", "") == str(key).replace("_", "").replace("-", "")
            ]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown field{hint}; known: {', '.join(sorted(known))}")
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        value = data[f.name]
        if isinstance(value, dict):
            value = {**_factory_fields(f), **value}
        kwargs[f.name] = _coerce(value, hints[f.name], where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix + "."):
            msg = f"{prefix}.{msg}"
        raise ConfigError(msg) from None


def _factory_fields(f: dataclasses.Field) -> dict[str, Any]:
    """Fields a section's ``default_factory`` sets apart from its class defaults (pretraining's
    demo source and codebook, fine-tuning's run name), so that a partial section from the CLI
    or a file (``--checkpoint.storage_path /x``) keeps them instead of the class's defaults."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    try:
        own = f.default_factory()
        if not dataclasses.is_dataclass(own):
            return {}
        plain = to_dict(type(own)())
    except (ConfigError, TypeError):
        return {}
    return {k: v for k, v in to_dict(own).items() if v != plain.get(k)}


def to_dict(cfg: Any, redact: bool = False) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (tuples become lists); ``redact`` hides secrets."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            out = {}
            for f in dataclasses.fields(v):
                x = getattr(v, f.name)
                out[f.name] = "<redacted>" if redact and not f.repr and x is not None else plain(x)
            return out
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def _cli_value(text: str) -> Any:
    # YAML scalars give ints/floats/bools/null/lists for free; keep the raw text when YAML
    # would mangle it (e.g. "s3://b/p" parses as a string anyway, "1e-3" as a string in YAML 1.1).
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return (
                float(value)
                if any(c in value for c in "eE.") and value[0] in "0123456789.-+"
                else value
            )
        except ValueError:
            return value
    return value


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file (local path or any URI the storage layer can open)."""
    from beit_ray import storage

    with storage.open_uri(path, "rb") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the file must hold a mapping of sections")
    return data


def help_text(cls: type, prog: str | None = None) -> str:
    """Every field with its type, default and docstring, grouped by section."""
    lines = [
        f"usage: {prog or os.path.basename(sys.argv[0])} [--config FILE.yaml] [--section.field VALUE ...]"
        " [--dry-run] [--verbose]",
        "",
        "  --dry-run   print the resolved plan (input, model, resources, outputs) and exit",
        "  --verbose   also show Ray's, DeepSpeed's and the workers' output (always in the job log)",
        "",
    ]
    if cls.__doc__:
        lines += [inspect.cleandoc(cls.__doc__), ""]

    def default_of(f: dataclasses.Field, instance: Any) -> Any:
        if instance is not None:
            return getattr(instance, f.name)
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            try:
                return f.default_factory()
            except ConfigError:
                return None
        return None

    def walk(klass: type, prefix: str, instance: Any) -> None:
        hints = typing.get_type_hints(klass)
        docs = field_docs(klass)
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            name = f"{prefix}{f.name}"
            value = default_of(f, instance)
            if _is_section(tp):
                lines.append(f"[{name}]  {docs.get(f.name, '')}".rstrip())
                walk(tp, name + ".", value)
                lines.append("")
                continue
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            lines.append(f"  --{name} ({tname}, default {value!r})")
            if docs.get(f.name):
                lines.append(
                    textwrap.fill(
                        docs[f.name], 96, initial_indent="      ", subsequent_indent="      "
                    )
                )

    try:  # a job whose defaults alone do not validate (a required --input) still has help
        root = cls()
    except ConfigError:
        root = None
    walk(cls, "", root)
    return "\n".join(lines)


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """``--config file.yaml`` then ``--a.b value`` / ``--a.b=value`` overrides; ``--help``."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in JOB_FLAGS]
    if "-h" in argv or "--help" in argv:
        print(help_text(cls))
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --section.field VALUE")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{key}: missing value")
            val = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            tree = load_yaml(val)
        else:
            overrides.append((key.replace("-", "_"), _cli_value(val)))
    for key, val in overrides:
        _set_dotted(tree, key, val)
    return build(cls, tree)


def save_config(cfg: Any, uri: str) -> None:
    """Write the resolved config as YAML beside a run's outputs."""
    from beit_ray import storage

    storage.write_text(uri, yaml.safe_dump(to_dict(cfg, redact=True), sort_keys=False))


def replace(cfg: T, **dotted: Any) -> T:
    """A copy of ``cfg`` with ``section__field=value`` overrides, validated again."""
    tree = to_dict(cfg)
    for key, val in dotted.items():
        _set_dotted(tree, key.replace("__", "."), val)
    return build(type(cfg), tree)


# --------------------------------------------------------------------------- shared sections


@dataclass
class RayConfig:
    """Where and how to connect to Ray."""

    address: str | None = None
    """Ray cluster address ("auto", "ray://host:10001"); unset starts a local Ray in the job."""
    num_cpus: int | None = None
    """Logical CPUs for a local Ray (unset: what the machine has). Ignored on a cluster."""
    temp_dir: str | None = None
    """Temp dir for a local Ray (short paths: Unix sockets have a length limit)."""
    worker_niceness: int = 0
    """Nice level of a local Ray's workers. Ray's default, 15, lets every nice-0 process (the
    driver's Ray Data loop, Ray's daemons) preempt the model's threads on a small machine. On a
    cluster the nodes' ``ray start`` decides (environment variable RAY_worker_niceness)."""

    def __post_init__(self) -> None:
        check(self.num_cpus is None or self.num_cpus > 0, "ray.num_cpus", "must be positive")
        check(0 <= self.worker_niceness <= 19, "ray.worker_niceness", "must be in [0, 19]")


FLAVOUR_NAMES = ("debug", "base", "large", "vit-debug", "vit-base", "vit-large")


@dataclass
class ModelConfig:
    """Which model to build or load."""

    flavour: str = "debug"
    """Named shape: debug (tiny, tests), base, large (BEiT); vit-debug, vit-base, vit-large."""
    init_from: str | None = None
    """Start from this checkpoint: an HF-format folder or a beit-ray run/checkpoint (local or s3://)."""
    image_size: int | None = None
    """Input resolution; unset: the flavour's (224; 32 for debug). Changing it resizes position tables."""
    vocab_size: int | None = None
    """Visual-token vocabulary for MIM; unset: the flavour's (8192; 256 for debug)."""
    drop_path: float | None = None
    """Stochastic depth rate; unset: the flavour's (0.1 base, 0.2 large)."""
    layer_scale: float | None = None
    """Layer-scale init; unset: the flavour's (0.1 base, 1e-5 large)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel used by transformers."""

    def __post_init__(self) -> None:
        check(
            self.flavour in FLAVOUR_NAMES,
            "model.flavour",
            f"{self.flavour!r} is not one of {', '.join(FLAVOUR_NAMES)}",
        )
        check(
            self.image_size is None or self.image_size > 0, "model.image_size", "must be positive"
        )
        check(self.vocab_size is None or self.vocab_size > 1, "model.vocab_size", "must be > 1")
        check(
            self.drop_path is None or 0 <= self.drop_path < 1,
            "model.drop_path",
            "must be in [0, 1)",
        )
