"""Data: image folders -> FFCV .beton files -> decoded batches -> DINO multi-crop views.

Names are imported on first use (PEP 562), so that `fastdino.data.recipe`, `fastdino.data.multicrop`,
`fastdino.data.gpu_decode` and `fastdino.data.synthetic` work where FFCV (a compiled
extension some GPU hosts cannot build) is missing; only the .beton readers and the
converter need it, and they say so in one line (`fastdino._requires`).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "multicrop_loader": "fastdino.data.loader", "MultiCropLoader": "fastdino.data.loader",
    "eval_loader": "fastdino.data.loader", "EvalLoader": "fastdino.data.loader",
    "convert_folder": "fastdino.data.convert", "DataError": "fastdino.data.convert",
    "ViewRecipe": "fastdino.data.recipe", "SyntheticMultiCrop": "fastdino.data.synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastdino.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
