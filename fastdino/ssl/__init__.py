"""DINO's self-supervised logic: loss, EMA teacher, student/teacher wrappers, parameter groups."""
from fastdino.ssl.ema import ema_update_
from fastdino.ssl.loss import DINOLoss
from fastdino.ssl.meta_arch import MultiCropWrapper, build_student_teacher, param_groups

__all__ = ["DINOLoss", "ema_update_", "MultiCropWrapper", "build_student_teacher", "param_groups"]
