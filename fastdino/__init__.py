"""fastdino: a fast DINO (self-supervised ViT) training engine.

The Python API (fastdino/api.py), imported on first use (PEP 562) so that `import fastdino` loads
neither torch nor FFCV nor DeepSpeed:

    fastdino.train(config, **overrides)      -> the run's summary dict
    fastdino.load_backbone(path)             -> a ViT backbone from any checkpoint kind
    fastdino.extract_features(backbone, ...) -> {"cls": [N, D], "patch": [N, T, D], ...}

The top-level `kernels/` folder installs as `fastdino_kernels`: the bare name `kernels` belongs
to a Hugging Face package that transformers pulls in.
"""
import types

from fastdino import train as _train_package

__all__ = ["train", "load_backbone", "extract_features"]


class _CallableTrainPackage(types.ModuleType):
    # `fastdino.train` names both the subpackage (fastdino/train/: trainer, checkpoints) and the API
    # function. Importing any fastdino.train.* module binds the package to that name, so the package
    # itself is made callable: fastdino.train(...) trains and fastdino.train.checkpoint still resolves.
    def __call__(self, *args, **kwargs):
        """fastdino.api.train(config, /, *, resume=None, overwrite=False, **overrides)."""
        from fastdino.api import train

        return train(*args, **kwargs)


_train_package.__class__ = _CallableTrainPackage


def __getattr__(name: str):
    if name in ("load_backbone", "extract_features"):
        from fastdino import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastdino' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
