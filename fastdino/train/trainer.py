"""The DINO training loop: one process (CPU or one GPU), or one rank of many.

One step: multi-crop batch -> teacher forward on the 2 global crops -> student
forward on all crops -> DINO loss -> the step counts or is dropped (a non-finite
loss with on_nonfinite_loss=skip) -> centre update (all-reduced) -> backward
(gradients averaged over ranks) -> per-parameter gradient clipping, last layer
frozen in early epochs -> AdamW with the scheduled lr and weight decay -> EMA
teacher update from the student's current weights. fastdino.parallel decides and
applies the parallelism (plain module, or DeepSpeed ZeRO 0/1/2). Everything needed
to continue exactly (weights, optimizer, centre, step, per-rank RNG) goes into each
checkpoint; data order and augmentations are a pure function of (seed, epoch,
batch, rank), so a resumed run sees the same batches.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from fastdino import metrics
from fastdino._requires import require_ffcv
from fastdino.config import check_resume_fits
from fastdino.data.synthetic import SYNTHETIC
from fastdino.eval.knn import knn_accuracy
from fastdino.parallel import SHARD_PICKLED_CLASSES, barrier, init_distributed, memory_bytes
from fastdino.runinfo import resolve_device, run_metadata, setup_logging
from fastdino.train import checkpoint as ckpt
from fastdino.train.builders import build_dino_step, build_training_loader
from fastdino.train import run_folder
from fastdino.train.monitor import collapse_stats, collapse_warnings
from fastdino.train.schedules import build_schedules
from fastdino.train.tensorboard import TensorBoardLog

logger = logging.getLogger(__name__)


NO_STEP = 2**62  # "no non-finite loss yet": above every step, so the minimum over ranks finds the first


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the run stopped at a step boundary and saved a checkpoint.
    `exit_status` is the shell's convention for a death by that signal (130, 143), which the
    CLI exits with, so that scripts and schedulers see an interruption and not a failure."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class InterruptedNow(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop at once, without a checkpoint (the last one is intact).
    A KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, checkpoint_dir: Path | None = None):
        where = (f"the last checkpoint in {checkpoint_dir} is intact" if checkpoint_dir is not None
                 else "no checkpoint was written yet")
        super().__init__(f"signal {signum} again: stopped at once; {where}")
        self.exit_status = 128 + signum


def json_safe(value):
    """`value` with every non-finite float replaced by None: JSON has no NaN or Infinity, and a
    bare NaN in log.jsonl breaks strict parsers (and every reader of the whole file)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One log.jsonl line: strict JSON, non-finite values written as null."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def check_data_paths(cfg) -> None:
    """Raises a one-line error (MissingPackageError without FFCV, else fastdino.data.DataError)
    unless data.path is `synthetic` or a readable .beton, and the k-NN files, where set, are
    labelled .beton files. Reads headers and sample records only."""
    paths = [] if cfg.data.path == SYNTHETIC else [("data.path", cfg.data.path, False)]
    ev = cfg.eval
    if ev.knn_train_path and ev.knn_val_path:
        paths += [("eval.knn_train_path", ev.knn_train_path, True), ("eval.knn_val_path", ev.knn_val_path, True)]
    for key, path, need_labels in paths:
        if not Path(path).exists():  # said before the missing FFCV, which would not help
            raise FileNotFoundError(f"{key}={path}: no such .beton file (make one with "
                                    f"`fastdino data convert IMAGE_FOLDER OUT.beton`)")
        require_ffcv(f"{key}={path}", ", or train on data.path=synthetic" if key == "data.path" else "")
        from fastdino.data.decode import check_beton

        check_beton(path, source=key, need_labels=need_labels)


class Trainer:
    """One launch of a run into cfg.output_dir (see fastdino.train.run_folder for the folder's rules).

    `resume`: a checkpoint (a step file or a DeepSpeed step folder) or "auto" (the newest one in
    output_dir/checkpoints; none: start from scratch with a warning, as a requeued job does).
    `overwrite`: a fresh run may replace the run already in output_dir; its checkpoints and
    log.jsonl are deleted once this launch is set up. Nothing in output_dir but train.log and the
    lock is written until the launch is set up and its resume is known to fit. Rank 0 holds the
    folder's lock until train() ends (or close()).
    """

    def __init__(self, cfg, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        check_data_paths(cfg)  # a wrong path is one line, before anything is started or logged
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / run_folder.CHECKPOINT_DIR
        env_device = resolve_device(cfg.device)
        self.dist = init_distributed(env_device, cfg.parallel.timeout_s,
                                     need_group=cfg.parallel.zero_stage > 0)  # ZeRO on one rank needs a group too
        self.is_main = self.dist.is_main
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self._lock = None
        self.tensorboard = TensorBoardLog(self.output_dir, enabled=False)
        try:
            self._set_up(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the run folder to the next run (train() does it when it ends)."""
        self.tensorboard.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _set_up(self, resume: str | None, overwrite: bool) -> None:
        cfg = self.cfg
        # A checkpoint from another folder starts this folder's record afresh, as a run without --resume does.
        fresh = resume is None or (resume != "auto" and not run_folder.in_run_folder(Path(resume), self.output_dir))
        if overwrite and not fresh:
            raise run_folder.RunFolderError(f"--overwrite replaces the run in {self.output_dir}, so it cannot "
                                            f"also resume from that run's checkpoints")
        self._claim_run_folder(fresh, overwrite)
        if self.is_main:
            setup_logging(self.output_dir / "train.log")
        else:  # other ranks only report problems, on stderr
            setup_logging(None, level=logging.WARNING)
        self.meta = run_metadata(self.device)
        self.meta["world_size"] = self.dist.world_size
        logger.info("run %s | git %s | %s | %d rank(s)", self.output_dir, self.meta["git_revision"],
                    self.meta["device"], self.dist.world_size)
        logger.info("versions %s", json.dumps(self.meta["versions"]))
        # the whole config goes to train.log only: on the console it would push everything else away
        logger.info("config\n%s", OmegaConf.to_yaml(cfg).rstrip(), extra={"file_only": True})
        logger.info("config: %s (and train.log)", self.output_dir / run_folder.CONFIG_FILE)
        # --resume auto takes the newest intact checkpoint, skipping damaged ones with a warning
        resume_path, state = (ckpt.load_resume_checkpoint(self.checkpoint_dir, resume, map_location=self.device,
                                                          shard_classes=SHARD_PICKLED_CLASSES)
                              if resume else (None, None))
        if resume == "auto" and resume_path is None and self.is_main:
            # kept a warning, not an error: a requeued job (SLURM) starts this way the first time
            logger.warning("--resume auto: no checkpoint in %s, starting from scratch", self.checkpoint_dir)
        if state is not None:
            self._check_checkpoint_fits(resume_path, state)

        torch.manual_seed(cfg.seed)
        self.loader = build_training_loader(cfg, self.device, self.dist.rank, self.dist.world_size)
        data = cfg.data
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{data.path} holds {self.loader.num_images} images, fewer than one batch of "
                             f"{data.batch_size} on each of {self.dist.world_size} rank(s): lower data.batch_size")
        self.global_batch = data.batch_size * self.dist.world_size
        self.schedules = build_schedules(cfg, self.steps_per_epoch, self.global_batch)
        full = self.schedules.total_steps
        self.total_steps = min(cfg.max_steps, full) if cfg.max_steps > 0 else full

        # Same seed, same weights on every rank. Skip mode may drop a step after its forward, so the
        # step guards batch norm statistics; the error mode needs no copy: the run stops and nothing
        # computed after the bad step is saved.
        self.step = build_dino_step(cfg, self.device, self.dist, guard_nonfinite=cfg.on_nonfinite_loss == "skip")
        self.runner, self.teacher, self.student = self.step.runner, self.step.teacher, self.step.student
        self.dino_loss = self.step.dino_loss
        if self.dist.world_size > 1:  # independent drop-path masks per rank
            torch.manual_seed(cfg.seed + self.dist.rank)
        self.skipped_steps: list[int] = []
        self.flops_per_image = metrics.flops_per_image_from_config(cfg)
        self.peak_flops = metrics.peak_flops(self.device.type)
        self.start_step = 0
        self.knn_history: list[dict] = []
        if state is not None:
            self._load_state(resume_path, state)
        self._stop_signal = 0  # the signal that asked to stop, 0 while none did
        self._first_nonfinite = torch.tensor(NO_STEP, device=self.device)
        self._commit(fresh, overwrite, resume_path)

    # ---- the run folder ----------------------------------------------------------------------------
    def _claim_run_folder(self, fresh: bool, overwrite: bool) -> None:
        """Rank 0 creates and locks the folder, refuses a fresh run into another run's folder, and
        reads the log a resume will rewrite; its verdict stops every rank (one broadcast)."""
        error = None
        self._old_log: list[dict] = []
        if self.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._lock = run_folder.RunLock.acquire(self.output_dir)
                log_path = self.output_dir / run_folder.LOG_FILE
                if fresh and not overwrite:
                    run_folder.check_fresh(self.output_dir)
                elif not fresh and log_path.exists():
                    self._old_log = run_folder.read_log(log_path)
            except (run_folder.RunFolderError, OSError) as exc:
                error = str(exc) or type(exc).__name__
        if self.dist.world_size > 1:
            verdict = [error]
            dist.broadcast_object_list(verdict, src=0)
            error = verdict[0]
        if error:
            raise run_folder.RunFolderError(error)

    def _commit(self, fresh: bool, overwrite: bool, resume_path: Path | None) -> None:
        """Writes this launch into the folder, now that it is set up and any resume fits: a launch
        that failed before left the run's config.yaml, run.json and log.jsonl as they were."""
        if self.is_main:
            run_folder.remove_leftovers(self.output_dir)
            ckpt.remove_interrupted_writes(self.checkpoint_dir)
            if overwrite:
                run_folder.clear_records(self.output_dir)
            if not fresh:
                self._truncate_log()
            run_folder.atomic_write_text(self.output_dir / run_folder.CONFIG_FILE, OmegaConf.to_yaml(self.cfg))
            launch = {**self.meta, "start_step": self.start_step,
                      "resumed_from": str(resume_path) if resume_path else None}
            run_folder.write_launch(self.output_dir, launch, resumed=not fresh)
            self.tensorboard = TensorBoardLog(self.output_dir, enabled=self.cfg.logging.tensorboard)
        barrier()  # the old records are gone before any rank writes a checkpoint

    def _truncate_log(self) -> None:
        """Drops the records of the steps this launch runs again (all of them when it starts from
        scratch): otherwise they would be logged twice. An evaluation at the start step stays when
        the checkpoint holds it (it is not run again)."""
        evaluated = {record["step"] for record in self.knn_history}
        start = self.start_step

        def keep(record: dict) -> bool:
            return record["step"] < start or (record.get("kind") == "eval" and record["step"] == start
                                              and start in evaluated)

        kept = [record for record in self._old_log if keep(record)]
        log_path = self.output_dir / run_folder.LOG_FILE
        if log_path.exists():  # rewritten even when every record stays: a damaged last line goes
            run_folder.write_log(log_path, kept)
        if len(kept) < len(self._old_log):
            logger.info("log.jsonl: dropped %d record(s) of steps from %d on, which run again",
                        len(self._old_log) - len(kept), start)

    # ---- checkpoints -------------------------------------------------------------------------------
    def _check_checkpoint_fits(self, path: Path, state: dict) -> None:
        """Raises CheckpointError unless the checkpoint to resume from fits this run's config (keys
        that cannot change mid-run unchanged), before the model is built; its parallel layout is
        checked by the runner (_load_state)."""
        if "config" in state:
            check_resume_fits(OmegaConf.create(state["config"]), self.cfg, f"checkpoint {path}")

    def _load_state(self, path: Path, state: dict) -> None:
        trained = state.get("steps_per_epoch", self.steps_per_epoch)
        if trained != self.steps_per_epoch:  # the schedules are laid out over epochs of this many steps
            raise ckpt.CheckpointError(f"checkpoint {path} was trained on epochs of {trained} steps; data.path="
                                       f"{self.cfg.data.path} makes {self.steps_per_epoch}: resume on the same data")
        self.runner.check_checkpoint_fits(path, state)  # same launch kind, world size and ZeRO stage
        try:
            self.teacher.load_state_dict(state["teacher"])
            self.dino_loss.load_state_dict(state["dino_loss"])
            rng = self.runner.load(path, state, self.dist.rank)
        except ckpt.CheckpointError:  # the safe DeepSpeed engine's refusals say what is wrong already
            raise
        except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
            # torch's messages put the mismatch on the lines after "...for VisionTransformer:"
            reason = " ".join(str(exc).split())
            reason = reason if len(reason) <= 600 else reason[:600] + "..."
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run: {reason}") from None
        ckpt.set_rng_state(rng)
        self.start_step = int(state["step"])
        self.knn_history = list(state.get("knn_history", []))
        logger.info("resumed from %s at step %d", path, self.start_step)

    def save(self, step: int) -> Path:
        """Collective under DeepSpeed: every rank calls it at the same step (the runner writes its
        own layout: a step file, or a folder of shards)."""
        payload = {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "config": OmegaConf.to_yaml(self.cfg),
            "knn_history": self.knn_history,
            "steps_per_epoch": self.steps_per_epoch,
        }
        path = self.runner.save(self.checkpoint_dir, step, payload, self.cfg.keep_checkpoints, self.dist.rank, barrier)
        logger.info("checkpoint %s", path)
        return path

    # ---- evaluation --------------------------------------------------------------------------------
    def knn_enabled(self) -> bool:
        return bool(self.cfg.eval.knn_train_path and self.cfg.eval.knn_val_path)

    def evaluate_knn(self, step: int) -> dict:
        """The teacher's k-NN accuracy on eval.knn_train_path / knn_val_path (fastdino.eval.knn),
        appended to the run's k-NN history."""
        ev = self.cfg.eval
        result = knn_accuracy(self.teacher.backbone, ev.knn_train_path, ev.knn_val_path, size=ev.eval_size,
                              batch_size=max(self.cfg.data.batch_size, 64), device=self.device, ks=(ev.knn_k,),
                              temperature=ev.knn_temperature)[ev.knn_k]
        record = {"step": step, "knn_top1": result["top1"], "knn_top5": result.get("top5")}
        self.knn_history.append(record)
        logger.info("k-NN (teacher, k=%d) at step %d: top-1 %.2f%%", ev.knn_k, step, result["top1"])
        return record

    # ---- training ----------------------------------------------------------------------------------
    def _apply_schedules(self, step: int) -> dict:
        values = self.schedules.at(step)
        frozen = values["epoch"] < self.cfg.optim.freeze_last_layer
        for group in self.runner.param_groups:
            group["lr"] = values["lr"]
            group["weight_decay"] = values["wd"] if group["decay"] else 0.0
            group["frozen"] = frozen and group["last_layer"]
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
        if self._stop_signal:
            raise InterruptedNow(signum, self.checkpoint_dir if ckpt.list_checkpoints(self.checkpoint_dir) else None)
        logger.warning("signal %d: stopping after this step and writing a checkpoint (again to stop now)", signum)
        self._stop_signal = signum

    def train(self) -> dict:
        """Runs the steps from start_step to the end; releases the run folder when it ends, however it ends."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        cfg = self.cfg
        log_path = self.output_dir / "log.jsonl"
        logger.info("training steps %d..%d of %d (%d per epoch), %s, %.1f GFLOP per image",
                    self.start_step, self.total_steps, self.schedules.total_steps, self.steps_per_epoch,
                    self.device, self.flops_per_image / 1e9)
        if self.knn_enabled() and not self.knn_history:  # the teacher as it starts (a resume may turn k-NN on)
            self._run_knn(log_path, step=self.start_step, epoch=self.start_step // self.steps_per_epoch)
        previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        progress = tqdm(total=self.total_steps, initial=self.start_step, disable=not (cfg.progress and self.is_main),
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
                stop = 0

                def accept(loss: torch.Tensor) -> bool:
                    """The one place a step is decided, before anything it changes for good (centre,
                    weights, optimizer, teacher) has moved. Deciding needs the answer now: a host sync."""
                    nonlocal stop
                    nonfinite, stop = self._check_step(loss)
                    return not nonfinite

                # forward, loss, centre, backward; then clipping per parameter, the last-layer freeze,
                # AdamW, and the EMA teacher (fastdino.ssl.DINOMetaArch)
                out = self.step.train_step(crops, values["teacher_temp"], values["momentum"],
                                           accept=accept if cfg.on_nonfinite_loss == "skip" else None)
                loss, student_output, teacher_output = out.loss, out.student_output, out.teacher_output
                nonfinite = not out.accepted
                if nonfinite:
                    logger.warning("%s: skipping this step's update", self._nonfinite_message(step))
                    self.skipped_steps.append(step)
                elif cfg.on_nonfinite_loss != "skip":
                    self._note_nonfinite(loss, step)
                images_since_log += crops[0].shape[0] * self.dist.world_size
                done = step + 1
                progress.update(1)

                logged = done % cfg.log_every == 0 or step == self.start_step or done == self.total_steps or nonfinite
                run_knn = cfg.eval.knn_every > 0 and self.knn_enabled() and done % cfg.eval.knn_every == 0 \
                    and done < self.total_steps
                save = done % cfg.checkpoint_every == 0 or done == self.total_steps
                # Every rank reaches the same check points (a local stop request only counts on one rank).
                local_stop = self.dist.world_size == 1 and self._stop_signal
                if cfg.on_nonfinite_loss == "error" and (logged or run_knn or save or local_stop):
                    stop = self._deferred_check()  # before anything is logged, evaluated or saved
                if logged:
                    loss_value = self._mean_over_ranks(loss)
                    elapsed = time.perf_counter() - time_since_log
                    img_per_s = images_since_log / max(elapsed, 1e-9)
                    stats = collapse_stats(student_output.detach(), teacher_output.detach(), self.dino_loss.center,
                                           cfg.dino.student_temp, values["teacher_temp"], out.teacher_features)
                    warnings = collapse_warnings(stats, cfg.monitor)
                    # img/s is the whole job's; MFU is per accelerator, against one device's peak
                    model_mfu = metrics.mfu(img_per_s / self.dist.world_size, self.flops_per_image, self.peak_flops)
                    last_record = json_safe({
                        "step": step, "epoch": epoch, "loss": loss_value, "lr": values["lr"], "wd": values["wd"],
                        "momentum": values["momentum"], "teacher_temp": values["teacher_temp"],
                        "img_per_s": img_per_s, "img_per_s_per_rank": img_per_s / self.dist.world_size,
                        "gflops_per_s": img_per_s * self.flops_per_image / 1e9,
                        "mfu": model_mfu, "data_wait_fraction": data_wait / max(elapsed, 1e-9),
                        **stats, "collapse_warnings": warnings, "skipped": nonfinite,
                    })
                    if self.device.type == "cuda":
                        last_record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                    if self.is_main:
                        with open(log_path, "a") as f:
                            f.write(json_line(last_record))
                        self.tensorboard.record(last_record)
                    postfix = {"loss": f"{loss_value:.4f}", "img/s": f"{img_per_s:.1f}",
                               "H/lnK": f"{stats['teacher_entropy'] / stats['log_k']:.2f}"}
                    if model_mfu is not None:
                        postfix["MFU"] = f"{model_mfu:.1%}"
                    if warnings:
                        postfix["WARN"] = warnings[0].split(":")[0]
                        for w in warnings if self.is_main else []:
                            logger.warning("step %d: %s", step, w)
                    progress.set_postfix(postfix, refresh=False)
                    if not cfg.progress and self.is_main:
                        logger.info("step %d/%d loss %.4f lr %.2e img/s %.1f", done, self.total_steps,
                                    loss_value, values["lr"], img_per_s)
                    images_since_log, time_since_log, data_wait = 0, time.perf_counter(), 0.0

                if run_knn:
                    self._run_knn(log_path, done, epoch)
                if save or stop:
                    self.save(done)
                if stop:
                    raise TrainingInterrupted(f"interrupted after step {done}; checkpoint saved in "
                                              f"{self.checkpoint_dir}; continue with `fastdino train --resume auto "
                                              f"output_dir={self.output_dir}`", stop)
                fetch_start = time.perf_counter()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            progress.close()
        final_knn = None
        if self.knn_enabled():
            final_knn = self._run_knn(log_path, self.total_steps, self.total_steps // self.steps_per_epoch)
        return {"steps": self.total_steps, "last": last_record, "knn": self.knn_history,
                "final_knn": final_knn, "collapse_warnings": warnings, "memory": memory_bytes(self.runner),
                "skipped_steps": self.skipped_steps}

    def _run_knn(self, log_path: Path, step: int, epoch: int) -> dict | None:
        """Rank 0 evaluates the teacher (identical on every rank) while the others wait."""
        record = None
        if self.is_main:
            record = self.evaluate_knn(step)
            with open(log_path, "a") as f:
                f.write(json_line({**record, "epoch": epoch, "kind": "eval"}))
            self.tensorboard.knn(record, self.teacher.backbone, self.cfg.model.patch_size, self.cfg.eval.eval_size)
        barrier()
        return record

    def _nonfinite_message(self, step: int) -> str:
        where = "" if self.dist.world_size == 1 else " on at least one rank"
        return f"non-finite loss{where} at step {step} (epoch {step // self.steps_per_epoch})"

    def _note_nonfinite(self, loss: torch.Tensor, step: int) -> None:
        """on_nonfinite_loss=error: remembers the first non-finite step on the device, without
        a host sync; _deferred_check reads it before anything is logged, evaluated or saved."""
        bad = ~torch.isfinite(loss.detach())
        self._first_nonfinite = torch.where(bad & (self._first_nonfinite == NO_STEP), step, self._first_nonfinite)

    def _deferred_check(self) -> int:
        """Raises NonFiniteLossError naming the first non-finite step since the start (the steps
        after it ran on NaN weights, but nothing of theirs was saved); else returns the signal
        that asked to stop (0: none), agreed by every rank (one tiny all-reduce of both)."""
        flags = torch.stack([self._first_nonfinite, torch.tensor(-self._stop_signal, device=self.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        first_nonfinite, stop = flags.tolist()
        if first_nonfinite != NO_STEP:
            raise NonFiniteLossError(self._nonfinite_message(first_nonfinite) +
                                     "; the last checkpoint is intact (resume with --resume auto)")
        return -stop

    def _check_step(self, loss: torch.Tensor) -> tuple[bool, int]:
        """on_nonfinite_loss=skip: (loss is non-finite, signal that asked to stop or 0), the same on
        every rank. One process: the finiteness check is a host sync every step. Several ranks: one
        tiny all-reduce, so every rank skips or stops at the same step (a rank that went on alone would hang)."""
        if self.dist.world_size == 1:
            return not bool(torch.isfinite(loss)), self._stop_signal
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(self._stop_signal), device=loss.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = flags.tolist()
        return nonfinite > 0, int(stop)

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        """The loss of the whole (all-rank) batch: every rank's loss is its local batch mean."""
        if self.dist.world_size == 1:
            return loss.item()
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        return total.item() / self.dist.world_size
