"""One clear line where a request needs a package that cannot be imported here.

FFCV (a compiled extension) and DeepSpeed are needed only for .beton data and for
ZeRO / several ranks; the models, the kernels, the trainer on synthetic data and
the benchmarks on synthetic data work without them (some GPU hosts cannot build FFCV).
"""
from __future__ import annotations

import importlib

FFCV_INSTALL = ("`apt-get install pkg-config libturbojpeg0-dev libopencv-dev && pip install ffcv==1.0.2` "
                "(the extra `fastdino[ffcv]`, or `make setup`)")
DEEPSPEED_INSTALL = "`pip install deepspeed` (the extra `fastdino[deepspeed]`, or `make setup`)"


class MissingPackageError(ImportError):
    """A package this request needs is not importable; the message says how to install it."""


def require(module: str, what: str, install: str) -> None:
    """Raises MissingPackageError, one line naming `what` needs `module` and how to install it,
    where `import module` fails (the underlying ImportError is quoted)."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MissingPackageError(f"{what} needs {module}, which cannot be imported here ({reason}); "
                                  f"install it with {install}") from None


def require_ffcv(what: str, alternative: str = "") -> None:
    """`what` (e.g. "data.path=train.beton") needs FFCV; `alternative` (", or ...") ends the message."""
    require("ffcv", what, FFCV_INSTALL + alternative)


def require_deepspeed(what: str) -> None:
    """`what` (e.g. "parallel.zero_stage=2") needs DeepSpeed."""
    require("deepspeed", what, DEEPSPEED_INSTALL)
