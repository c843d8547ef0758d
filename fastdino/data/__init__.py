"""Data: image folders -> FFCV .beton files -> decoded batches -> DINO multi-crop views."""
from fastdino.data.convert import DataError, convert_folder
from fastdino.data.loader import EvalLoader, MultiCropLoader, eval_loader, multicrop_loader
from fastdino.data.multicrop import AugmentParams

__all__ = ["multicrop_loader", "MultiCropLoader", "eval_loader", "EvalLoader", "convert_folder", "DataError",
           "AugmentParams"]
