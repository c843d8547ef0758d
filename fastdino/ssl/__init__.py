"""DINO's self-supervised logic: loss, EMA teacher, student/teacher wrappers, parameter groups."""
from fastdino.ssl.ema import ema_update_
from fastdino.ssl.loss import DINOLoss
from fastdino.ssl.meta_arch import (DINOMetaArch, MultiCropWrapper, StepOutputs, build_student_teacher,
                                     param_groups)

__all__ = ["DINOLoss", "DINOMetaArch", "StepOutputs", "ema_update_", "MultiCropWrapper", "build_student_teacher",
           "param_groups"]
