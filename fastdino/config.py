"""Typed run configuration.

The dataclasses below are the schema (names and types only); every default value
lives in `configs/default.yaml`, with a comment, so there is one place to read them.
A run's config is built as default.yaml <- experiment file <- `key=value`
overrides, validated against the schema at load time, and written into the run
folder as `config.yaml`. A resumed run's config puts that saved `config.yaml` under the
experiment file and the overrides; `check_resume_fits` refuses changes to the keys that
cannot change mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def _config_dir() -> Path:
    # A wheel installs the top-level configs/ folder as the package data fastdino/configs/ (setup.py);
    # a source checkout, editable install included, reads configs/ beside the package.
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if (installed / "default.yaml").is_file() else package.parent / "configs"


CONFIG_DIR = _config_dir()
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A config problem, reported to the user as one line."""


@dataclass
class ModelConfig:
    arch: str = MISSING
    depth: int = MISSING
    patch_size: int = MISSING
    img_size: int = MISSING
    drop_path_rate: float = MISSING
    attn_backend: str = MISSING
    out_dim: int = MISSING
    head_hidden_dim: int = MISSING
    head_bottleneck_dim: int = MISSING
    head_nlayers: int = MISSING
    use_bn_in_head: bool = MISSING
    norm_last_layer: bool = MISSING
    drop_path_impl: str = MISSING
    packed_crops: bool = MISSING
    activation_checkpointing: bool = MISSING
    compile: bool = MISSING


@dataclass
class AugmentConfig:
    global_scale: List[float] = MISSING
    local_scale: List[float] = MISSING
    ratio: List[float] = MISSING
    flip_p: float = MISSING
    color_jitter_p: float = MISSING
    brightness: float = MISSING
    contrast: float = MISSING
    saturation: float = MISSING
    hue: float = MISSING
    grayscale_p: float = MISSING
    blur_p: List[float] = MISSING
    blur_sigma: List[float] = MISSING
    solarize_p: List[float] = MISSING
    mean: List[float] = MISSING
    std: List[float] = MISSING


@dataclass
class DataConfig:
    path: str = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    n_local_crops: int = MISSING
    global_size: int = MISSING
    local_size: int = MISSING
    decode: str = MISSING
    crops: str = MISSING
    order: str = MISSING
    os_cache: bool = MISSING
    batches_ahead: int = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    epochs: int = MISSING
    lr: float = MISSING
    min_lr: float = MISSING
    warmup_epochs: float = MISSING
    weight_decay: float = MISSING
    weight_decay_end: float = MISSING
    betas: List[float] = MISSING
    clip_grad: float = MISSING
    freeze_last_layer: int = MISSING


@dataclass
class DINOConfig:
    momentum_teacher: float = MISSING
    warmup_teacher_temp: float = MISSING
    teacher_temp: float = MISSING
    warmup_teacher_temp_epochs: int = MISSING
    student_temp: float = MISSING
    center_momentum: float = MISSING
    loss_impl: str = MISSING
    ema_impl: str = MISSING


@dataclass
class ParallelConfig:
    zero_stage: int = MISSING
    timeout_s: float = MISSING
    bucket_elements: int = MISSING


@dataclass
class EvalConfig:
    knn_train_path: str = MISSING
    knn_val_path: str = MISSING
    knn_k: int = MISSING
    knn_temperature: float = MISSING
    knn_every: int = MISSING
    eval_size: int = MISSING


@dataclass
class MonitorConfig:
    entropy_warn_fraction: float = MISSING
    feature_std_warn: float = MISSING
    top_prob_warn: float = MISSING


@dataclass
class LoggingConfig:
    tensorboard: bool = MISSING


@dataclass
class RunConfig:
    output_dir: str = MISSING
    seed: int = MISSING
    max_steps: int = MISSING
    device: str = MISSING
    precision: str = MISSING
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    on_nonfinite_loss: str = MISSING
    progress: bool = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.arch": ("vit_tiny", "vit_small", "vit_base"),
    "model.patch_size": (4, 8, 16),
    "model.attn_backend": ("auto", "xformers", "sdpa", "math"),
    "model.drop_path_impl": ("subset", "per_sample"),
    "data.decode": ("auto", "nvjpeg", "cpu"),
    "data.crops": ("auto", "opencv", "torch"),
    "data.order": ("random", "quasi_random"),
    "dino.loss_impl": ("auto", "triton", "torch"),
    "dino.ema_impl": ("auto", "triton", "torch"),
    "parallel.zero_stage": (0, 1, 2),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "bf16", "fp32"),
    "on_nonfinite_loss": ("error", "skip"),
}


def _one_line(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0].strip()
    where = f" in {source}" if source else ""
    return f"config key '{key}'{where}: {message}" if key else f"config{where}: {message}"


def _merge(base: DictConfig, update, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc, source)) from None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come from several libraries
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return loaded


def _validate(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' has no value: set it in the config file or as {missing[0]}=...")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}")
    positive = ["data.batch_size", "data.global_size", "data.local_size", "data.batches_ahead", "optim.epochs",
                "model.out_dim", "parallel.timeout_s", "parallel.bucket_elements", "log_every", "checkpoint_every"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {OmegaConf.select(cfg, key)}")
    if cfg.model.out_dim < 2:  # one prototype: the softmax is constant and ln K = 0
        raise ConfigError(f"config key 'model.out_dim' must be at least 2, got {cfg.model.out_dim}")
    for key in ("max_steps", "data.n_local_crops", "optim.warmup_epochs", "dino.warmup_teacher_temp_epochs"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {OmegaConf.select(cfg, key)}")
    # A warm-up longer than the run never reaches its target; both schedules get the same answer.
    for key, target in (("optim.warmup_epochs", "the peak lr (optim.lr)"),
                        ("dino.warmup_teacher_temp_epochs", f"dino.teacher_temp={cfg.dino.teacher_temp}")):
        if OmegaConf.select(cfg, key) > cfg.optim.epochs:
            raise ConfigError(f"config key '{key}' is {OmegaConf.select(cfg, key)} but optim.epochs is "
                              f"{cfg.optim.epochs}: the warm-up would never reach {target}; shorten it or "
                              f"raise optim.epochs")
    for key in ("model.img_size", "data.global_size", "data.local_size"):
        if OmegaConf.select(cfg, key) % cfg.model.patch_size:
            raise ConfigError(f"config key '{key}' must be a multiple of model.patch_size={cfg.model.patch_size}")
    for key in ("data.augment.blur_p", "data.augment.solarize_p"):
        if len(OmegaConf.select(cfg, key)) != 3:
            raise ConfigError(f"config key '{key}' needs 3 probabilities: global crop 1, global crop 2, local crops")


def _key_exists(cfg: DictConfig, dotted_key: str) -> bool:
    node = cfg
    for part in dotted_key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def find_config(path: str | Path) -> Path:
    """The experiment file `--config` names: an existing file as given, else a shipped config by
    its bare name (`demo` or `demo.yaml` is CONFIG_DIR/demo.yaml, wherever the command runs).
    Raises ConfigError when neither exists, listing the shipped names."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        shipped = CONFIG_DIR / f"{path.stem}.yaml"
        if shipped.is_file():
            return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (give a file, or the name of a shipped config: {names})")


def compose_config(path: str | Path | None = None, overrides: list[str] | None = None,
                   base: str | Path | None = None) -> DictConfig:
    """default.yaml, then `base` (a run's saved config.yaml, when resuming), then the experiment
    file `path`, then `key=value` overrides; type-checked but not validated (keys may be missing)."""
    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge(cfg, _read_yaml(DEFAULT_CONFIG), DEFAULT_CONFIG.name)
    path = find_config(path) if path is not None else None
    for source in (base, path):
        if source is not None:
            cfg = _merge(cfg, _read_yaml(Path(source)), str(source))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (for example optim.lr=0.001)")
        key, value = item.split("=", 1)
        if not _key_exists(cfg, key):
            raise ConfigError(f"config key '{key}' does not exist (override '{item}')")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), "command line")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: str | Path | None = None) -> DictConfig:
    """The validated, read-only run config: default.yaml, then `base` (a run's saved config.yaml,
    when resuming), then the experiment file `path`, then `key=value` overrides."""
    cfg = compose_config(path, overrides, base)
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))


# What a resumed run may change: when it stops, logs, saves and evaluates, where its files are, and
# how (not what) it computes. Everything else shapes the model, the optimizer state, the schedules
# or the data order, which the checkpoint has committed to. A key or a whole section.
CHANGEABLE_ON_RESUME = (
    "output_dir", "max_steps", "device", "precision", "log_every", "checkpoint_every", "keep_checkpoints",
    "on_nonfinite_loss", "progress", "eval", "monitor", "logging",
    "data.path", "data.num_workers", "data.decode", "data.crops", "data.os_cache", "data.batches_ahead",
    "model.attn_backend", "model.drop_path_impl", "model.packed_crops", "model.activation_checkpointing",
    "model.compile", "dino.loss_impl", "dino.ema_impl", "parallel.timeout_s", "parallel.bucket_elements",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changeable_on_resume(key: str) -> bool:
    """Whether a resumed run may give the dotted config `key` another value than its checkpoint."""
    return any(key == allowed or key.startswith(allowed + ".") for allowed in CHANGEABLE_ON_RESUME)


def check_resume_fits(saved: DictConfig, cfg: DictConfig, source: str) -> None:
    """Raises ConfigError, one line naming every key with its saved and new value, when `cfg` changes
    a key that cannot change mid-run (see CHANGEABLE_ON_RESUME). Keys `saved` lacks (added to the
    schema since it was written) are not compared."""
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
    changed = [f"{key} {old[key]!r} -> {new[key]!r}" for key in sorted(old)
               if key in new and old[key] != new[key] and not changeable_on_resume(key)]
    if changed:
        raise ConfigError(f"cannot change on resume: {', '.join(changed)} ({source} was trained with the first "
                          f"value; drop these overrides, or start a new run in another output_dir)")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
