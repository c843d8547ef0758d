"""The DINO training loop (one process: CPU or one GPU).

One step: multi-crop batch -> teacher forward on the 2 global crops -> student
forward on all crops -> DINO loss (updates the centre) -> backward -> per-parameter
gradient clipping, last layer frozen in early epochs -> AdamW with the scheduled
lr and weight decay -> EMA teacher update. Everything needed to continue exactly
(weights, optimizer, centre, step, RNG) goes into each checkpoint; data order and
augmentations are a pure function of (seed, epoch, batch), so a resumed run sees
the same batches.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from fastdino import metrics
from fastdino.config import save_config, to_dict
from fastdino.data import eval_loader, multicrop_loader
from fastdino.eval.knn import extract_features, knn_classify
from fastdino.runinfo import run_metadata, setup_logging
from fastdino.ssl import (DINOLoss, build_student_teacher, cancel_last_layer_gradients,
                          clip_gradients_per_parameter, ema_update_, param_groups)
from fastdino.train import checkpoint as ckpt
from fastdino.train.monitor import collapse_stats, collapse_warnings
from fastdino.train.schedules import build_schedules

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the run stopped at a step boundary and saved a checkpoint."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA GPU is available (use device=cpu or device=auto)")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    def __init__(self, cfg, resume: str | None = None):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        setup_logging(self.output_dir / "train.log")
        self.device = resolve_device(cfg.device)
        self.meta = run_metadata(self.device)
        save_config(cfg, self.output_dir / "config.yaml")
        (self.output_dir / "run.json").write_text(json.dumps(self.meta, indent=2) + "\n")
        logger.info("run %s | git %s | %s", self.output_dir, self.meta["git_revision"], self.meta["device"])
        logger.info("versions %s", json.dumps(self.meta["versions"]))
        logger.info("config\n%s", OmegaConf.to_yaml(cfg).rstrip())

        torch.manual_seed(cfg.seed)
        data = cfg.data
        self.loader = multicrop_loader(
            data.path, data.batch_size, n_local_crops=data.n_local_crops, global_size=data.global_size,
            local_size=data.local_size, device=str(self.device), seed=cfg.seed, augment=data.augment,
            num_workers=data.num_workers)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{data.path} holds {self.loader.num_images} images, fewer than one batch of "
                             f"{data.batch_size}: lower data.batch_size")
        self.schedules = build_schedules(cfg, self.steps_per_epoch, data.batch_size)
        full = self.schedules.total_steps
        self.total_steps = min(cfg.max_steps, full) if cfg.max_steps > 0 else full

        nets = build_student_teacher(cfg.model)
        self.student = nets.student.to(self.device)
        # The teacher stays in train mode as in the official code: it only matters for
        # batch norm in the head (use_bn_in_head), where the teacher uses batch statistics.
        self.teacher = nets.teacher.to(self.device)
        self.ncrops = 2 + data.n_local_crops
        self.dino_loss = DINOLoss(cfg.model.out_dim, self.ncrops, cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp,
                                  cfg.dino.warmup_teacher_temp_epochs, cfg.optim.epochs, cfg.dino.student_temp,
                                  cfg.dino.center_momentum, impl=cfg.dino.loss_impl).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0, betas=tuple(cfg.optim.betas))
        self.flops_per_image = metrics.flops_per_image_from_config(cfg)
        self.peak_flops = metrics.peak_flops(self.device.type)
        self.start_step = 0
        self.knn_history: list[dict] = []
        if resume:
            self._resume(resume)
        self._stop_requested = False

    # ---- checkpoints -------------------------------------------------------------------------------
    def _resume(self, resume: str) -> None:
        path = ckpt.latest_checkpoint(self.checkpoint_dir) if resume == "auto" else Path(resume)
        if path is None:
            logger.info("--resume auto: no checkpoint in %s, starting from scratch", self.checkpoint_dir)
            return
        state = ckpt.load_checkpoint(path, map_location=self.device)
        try:
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.dino_loss.load_state_dict(state["dino_loss"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this config: {str(exc).splitlines()[0]}") from None
        ckpt.set_rng_state(state["rng"])
        self.start_step = int(state["step"])
        self.knn_history = list(state.get("knn_history", []))
        self._truncate_log(self.start_step)
        logger.info("resumed from %s at step %d", path, self.start_step)

    def _truncate_log(self, step: int) -> None:
        """Drops records of steps after the checkpoint: they will be run (and logged) again."""
        log_path = self.output_dir / "log.jsonl"
        if not log_path.exists():
            return
        def keep(record: dict) -> bool:
            return record["step"] < step or (record.get("kind") == "eval" and record["step"] <= step)

        kept = [line for line in log_path.read_text().splitlines() if line and keep(json.loads(line))]
        log_path.write_text("".join(line + "\n" for line in kept))

    def save(self, step: int) -> Path:
        payload = {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": OmegaConf.to_yaml(self.cfg),
            "knn_history": self.knn_history,
        }
        path = ckpt.save_checkpoint(self.checkpoint_dir, step, payload, self.cfg.keep_checkpoints)
        logger.info("checkpoint %s", path)
        return path

    # ---- evaluation --------------------------------------------------------------------------------
    def knn_enabled(self) -> bool:
        return bool(self.cfg.eval.knn_train_path and self.cfg.eval.knn_val_path)

    @torch.no_grad()
    def evaluate_knn(self, step: int) -> dict:
        ev = self.cfg.eval
        backbone = self.teacher.backbone
        batch = max(self.cfg.data.batch_size, 64)
        train = extract_features(backbone, eval_loader(ev.knn_train_path, batch, size=ev.eval_size,
                                                       device=str(self.device)), self.device)
        val = extract_features(backbone, eval_loader(ev.knn_val_path, batch, size=ev.eval_size,
                                                     device=str(self.device)), self.device)
        result = knn_classify(train[0], train[1], val[0], val[1], k=ev.knn_k, temperature=ev.knn_temperature)
        record = {"step": step, "knn_top1": result["top1"], "knn_top5": result.get("top5")}
        self.knn_history.append(record)
        logger.info("k-NN (teacher, k=%d) at step %d: top-1 %.2f%%", ev.knn_k, step, result["top1"])
        return record

    # ---- training ----------------------------------------------------------------------------------
    def _apply_schedules(self, step: int) -> dict:
        values = self.schedules.at(step)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = values["lr"]
            if i == 0:
                group["weight_decay"] = values["wd"]
        return values

    def _batches(self):
        """(step, crops, labels) from start_step on, crossing epochs."""
        step = self.start_step
        while step < self.total_steps:
            epoch, first = divmod(step, self.steps_per_epoch)
            for crops, labels in self.loader.iter_epoch(epoch, start_batch=first):
                yield step, crops, labels
                step += 1
                if step >= self.total_steps:
                    return

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once; the last checkpoint is intact
            raise KeyboardInterrupt
        logger.warning("signal %d: stopping after this step and writing a checkpoint (again to stop now)", signum)
        self._stop_requested = True

    def train(self) -> dict:
        cfg = self.cfg
        log_path = self.output_dir / "log.jsonl"
        logger.info("training steps %d..%d of %d (%d per epoch), %s, %.1f GFLOP per image",
                    self.start_step, self.total_steps, self.schedules.total_steps, self.steps_per_epoch,
                    self.device, self.flops_per_image / 1e9)
        if self.knn_enabled() and not self.knn_history:
            self._log_knn(log_path, self.evaluate_knn(step=0), epoch=0)
        previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        progress = tqdm(total=self.total_steps, initial=self.start_step, disable=not cfg.progress,
                        dynamic_ncols=True, desc="train")
        self.student.train()
        images_since_log, time_since_log, data_wait = 0, time.perf_counter(), 0.0
        last_record, warnings = {}, []
        try:
            fetch_start = time.perf_counter()
            for step, crops, _labels in self._batches():
                data_wait += time.perf_counter() - fetch_start
                values = self._apply_schedules(step)
                epoch = values["epoch"]
                with autocast_context(self.device, cfg.precision):
                    with torch.no_grad():
                        teacher_output, teacher_features = self.teacher(crops[:2], return_backbone=True)
                    student_output = self.student(crops)
                    loss = self.dino_loss(student_output, teacher_output, epoch)
                if not torch.isfinite(loss):
                    message = f"non-finite loss ({loss.item()}) at step {step} (epoch {epoch})"
                    if cfg.on_nonfinite_loss == "error":
                        raise NonFiniteLossError(message + "; the last checkpoint is intact (resume with --resume auto)")
                    logger.warning("%s: skipping this step's update", message)
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optim.clip_grad > 0:
                        clip_gradients_per_parameter(self.student, cfg.optim.clip_grad)
                    cancel_last_layer_gradients(self.student, epoch, cfg.optim.freeze_last_layer)
                    self.optimizer.step()
                    ema_update_(self.teacher, self.student, values["momentum"], impl=cfg.dino.ema_impl)
                images_since_log += crops[0].shape[0]
                done = step + 1
                progress.update(1)

                if done % cfg.log_every == 0 or step == self.start_step or done == self.total_steps:
                    elapsed = time.perf_counter() - time_since_log
                    img_per_s = images_since_log / max(elapsed, 1e-9)
                    stats = collapse_stats(student_output.detach(), teacher_output.detach(), self.dino_loss.center,
                                           cfg.dino.student_temp, values["teacher_temp"], teacher_features)
                    warnings = collapse_warnings(stats, cfg.monitor)
                    model_mfu = metrics.mfu(img_per_s, self.flops_per_image, self.peak_flops)
                    last_record = {
                        "step": step, "epoch": epoch, "loss": loss.item(), "lr": values["lr"], "wd": values["wd"],
                        "momentum": values["momentum"], "teacher_temp": values["teacher_temp"],
                        "img_per_s": img_per_s, "gflops_per_s": img_per_s * self.flops_per_image / 1e9,
                        "mfu": model_mfu, "data_wait_fraction": data_wait / max(elapsed, 1e-9),
                        **stats, "collapse_warnings": warnings,
                    }
                    if self.device.type == "cuda":
                        last_record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                    with open(log_path, "a") as f:
                        f.write(json.dumps(last_record) + "\n")
                    postfix = {"loss": f"{last_record['loss']:.4f}", "img/s": f"{img_per_s:.1f}",
                               "H/lnK": f"{stats['teacher_entropy'] / stats['log_k']:.2f}"}
                    if model_mfu is not None:
                        postfix["MFU"] = f"{model_mfu:.1%}"
                    if warnings:
                        postfix["WARN"] = warnings[0].split(":")[0]
                        for w in warnings:
                            logger.warning("step %d: %s", step, w)
                    progress.set_postfix(postfix, refresh=False)
                    if not cfg.progress:
                        logger.info("step %d/%d loss %.4f lr %.2e img/s %.1f", done, self.total_steps,
                                    last_record["loss"], values["lr"], img_per_s)
                    images_since_log, time_since_log, data_wait = 0, time.perf_counter(), 0.0

                if cfg.eval.knn_every > 0 and self.knn_enabled() and done % cfg.eval.knn_every == 0 \
                        and done < self.total_steps:
                    self._log_knn(log_path, self.evaluate_knn(done), epoch)
                if done % cfg.checkpoint_every == 0 or done == self.total_steps or self._stop_requested:
                    self.save(done)
                if self._stop_requested:
                    raise TrainingInterrupted(f"interrupted after step {done}; checkpoint saved in "
                                              f"{self.checkpoint_dir}; continue with --resume auto")
                fetch_start = time.perf_counter()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            progress.close()
        final_knn = None
        if self.knn_enabled():
            final_knn = self.evaluate_knn(self.total_steps)
            self._log_knn(log_path, final_knn, self.total_steps // self.steps_per_epoch)
        return {"steps": self.total_steps, "last": last_record, "knn": self.knn_history,
                "final_knn": final_knn, "collapse_warnings": warnings}

    def _log_knn(self, log_path: Path, record: dict, epoch: int) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({**record, "epoch": epoch, "kind": "eval"}) + "\n")
