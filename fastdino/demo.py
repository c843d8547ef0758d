"""`fastdino demo`: the whole engine end to end on a CPU in a few minutes.

scikit-learn's digits (1,797 labelled 8x8 images, upscaled to 32 px) are written
to image folders and converted to .beton files; a small ViT trains with DINO
multi-crop; the teacher's k-NN accuracy on held-out digits is measured before
and after; attention maps are drawn for digits and for scikit-image's photos.
k-NN on raw pixels is reported beside the model's as the honest reference.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fastdino.config import CONFIG_DIR, load_config
from fastdino.data import convert_folder, eval_loader
from fastdino.data.sample_data import sample_photos, write_digits_folders
from fastdino.eval.draw import draw_attention
from fastdino.eval.knn import knn_classify
from fastdino.runinfo import setup_logging
from fastdino.eval.export import read_backbone
from fastdino.train.checkpoint import latest_checkpoint
from fastdino.train.trainer import Trainer

logger = logging.getLogger(__name__)
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def prepare_data(data_dir: Path, size: int) -> tuple[Path, Path]:
    """Digits as .beton files; reused when a previous demo already wrote them."""
    train_beton, val_beton = data_dir / "digits_train.beton", data_dir / "digits_val.beton"
    if not (train_beton.exists() and val_beton.exists()):
        train_dir, val_dir = write_digits_folders(data_dir / "digits", size=size)
        convert_folder(train_dir, train_beton, max_resolution=size, num_workers=1, progress=False)
        convert_folder(val_dir, val_beton, max_resolution=size, num_workers=1, progress=False)
    return train_beton, val_beton


def raw_pixel_knn(train_beton: Path, val_beton: Path, size: int, k: int, temperature: float) -> float:
    def pixels(path: Path):
        images, labels = zip(*[(x.flatten(1), y) for x, y in eval_loader(path, 256, size=size)])
        features = torch.nn.functional.normalize(torch.cat(images).float(), dim=1)
        return features, torch.cat(labels)

    train, val = pixels(train_beton), pixels(val_beton)
    return knn_classify(train[0], train[1], val[0], val[1], k=k, temperature=temperature)["top1"]


def first_image_per_label(beton: Path, size: int, labels: tuple[int, ...]) -> dict[int, torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    for images, batch_labels in eval_loader(beton, 256, size=size):
        for image, label in zip(images, batch_labels.tolist()):
            if label in labels and label not in found:
                found[label] = image
    return dict(sorted(found.items()))


def run_demo(output_dir: Path, overrides: list[str] | None = None) -> dict:
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging()
    for stale in ("checkpoints", "log.jsonl", "attention"):
        target = output_dir / stale
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)

    size = OmegaConf.load(DEMO_CONFIG).data.global_size
    train_beton, val_beton = prepare_data(output_dir / "data", size)
    cfg = load_config(DEMO_CONFIG, [f"output_dir={output_dir}", f"data.path={train_beton}",
                                    f"eval.knn_train_path={train_beton}", f"eval.knn_val_path={val_beton}",
                                    *(overrides or [])])
    pixel_top1 = raw_pixel_knn(train_beton, val_beton, cfg.eval.eval_size, cfg.eval.knn_k, cfg.eval.knn_temperature)
    logger.info("k-NN on raw pixels (the honest reference): top-1 %.2f%%", pixel_top1)

    result = Trainer(cfg).train()
    checkpoint = latest_checkpoint(output_dir / "checkpoints")
    backbone, _ = read_backbone(checkpoint)

    pictures = []
    mean = torch.tensor(cfg.data.augment.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.augment.std).view(3, 1, 1)
    for label, image in first_image_per_label(val_beton, size, labels=(2, 3, 5, 8)).items():
        pixels = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        pictures.append(draw_attention(backbone, cfg.model.patch_size, pixels,
                                       output_dir / "attention" / f"digit_{label}.png",
                                       size=size, title=f"digit {label} (held out)"))
    for name, photo in sample_photos().items():
        pictures.append(draw_attention(backbone, cfg.model.patch_size, photo,
                                       output_dir / "attention" / f"photo_{name}.png", size=128, title=name))

    summary = {
        "knn_top1_before": result["knn"][0]["knn_top1"],
        "knn_top1_after": result["final_knn"]["knn_top1"],
        "knn_top1_raw_pixels": pixel_top1,
        "knn_k": cfg.eval.knn_k,
        "steps": result["steps"],
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": result["last"].get("loss"),
        "log_k": result["last"].get("log_k"),
        "teacher_entropy": result["last"].get("teacher_entropy"),
        "collapse_warnings": result["collapse_warnings"],
        "checkpoint": str(checkpoint),
        "pngs": [str(p) for p in pictures],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("demo: k-NN top-1 %.2f%% -> %.2f%% (raw pixels %.2f%%) in %.0f s; summary in %s",
                summary["knn_top1_before"], summary["knn_top1_after"], pixel_top1, summary["seconds"],
                output_dir / "summary.json")
    return summary
