"""Data parallelism on CPU: 2 ranks over gloo (torchrun and the deepspeed launcher), ZeRO 0/1/2.

One torchrun launch trains the same tiny run under stages 0, 1 and 2 (module fixture);
the tests compare it with one process on the full batch, check the optimizer-state
bytes, the frozen last layer, a 2-node rendezvous on loopback, kill -9 of a rank, an
exact resume and a NaN loss under ZeRO. Augmentations are switched off (full-image crops, no flips or
colour changes) so that 2 ranks x 32 images see exactly the images of 1 rank x 64.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastdino.config import load_config
from fastdino.parallel import SHARD_PICKLED_CLASSES
from fastdino.ssl import build_student_teacher
from fastdino.train.checkpoint import list_checkpoints, load_checkpoint
from fastdino.train.trainer import Trainer

from test_train import TINY

ROOT = Path(__file__).resolve().parent.parent
DETERMINISTIC = ["model.drop_path_rate=0.0", "data.augment.global_scale=[1.0,1.0]", "data.augment.local_scale=[1.0,1.0]",
                 "data.augment.ratio=[1.0,1.0]", "data.augment.flip_p=0.0", "data.augment.color_jitter_p=0.0",
                 "data.augment.grayscale_p=0.0", "data.augment.blur_p=[0.0,0.0,0.0]",
                 "data.augment.solarize_p=[0.0,0.0,0.0]", "optim.lr=0.005", "optim.warmup_epochs=0.1",
                 "optim.clip_grad=0.01"]  # small, so that per-parameter clipping acts on most parameters
STEPS_PER_EPOCH = 21  # 1347 digits // 64 images per step
STEPS = STEPS_PER_EPOCH + 2  # the whole frozen first epoch, then two steps with the last layer training
TOL = 1e-5


def overrides(output_dir, beton, per_rank_batch, *extra):
    return [*TINY, *DETERMINISTIC, f"output_dir={output_dir}", f"data.path={beton}",
            f"data.batch_size={per_rank_batch}", f"max_steps={STEPS}", f"checkpoint_every={STEPS_PER_EPOCH}",
            "keep_checkpoints=3", *extra]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def torchrun(*args, port, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            *args]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines())
            if r.get("kind") != "eval"}


def assert_close_losses(got, want, steps):
    for step in steps:
        assert abs(got[step] - want[step]) <= TOL * abs(want[step]), (step, got[step], want[step])


CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fastdino.config import load_config
    from fastdino.train.trainer import Trainer
    root, args = Path(sys.argv[1]), sys.argv[2:]
    for stage in (0, 1, 2):
        trainer = Trainer(load_config(None, [*args, f"output_dir={root / f'stage{stage}'}", f"parallel.zero_stage={stage}"]))
        summary = trainer.train()
        (root / f"stage{stage}" / f"memory_rank{trainer.dist.rank}.json").write_text(json.dumps(summary["memory"]))
""")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, digits_betons):
    """The same run under ZeRO 0, 1 and 2 on 2 ranks x 32 images, and on 1 process x 64 images."""
    train, _ = digits_betons
    root = tmp_path_factory.mktemp("two_ranks")
    script = root / "child.py"
    script.write_text(CHILD)
    result = subprocess.run(torchrun(str(script), str(root), *overrides("unused", train, 32), port=29651),
                            capture_output=True, text=True, timeout=900, env=env())
    assert result.returncode == 0, result.stderr[-4000:]
    Trainer(load_config(None, overrides(root / "single", train, 64))).train()
    return root


def test_two_ranks_match_one_rank_under_every_stage(two_rank_runs):
    single = losses(two_rank_runs / "single")
    assert sorted(single) == list(range(STEPS))
    for stage in (0, 1, 2):
        assert_close_losses(losses(two_rank_runs / f"stage{stage}"), single, range(STEPS))
    # and the runs moved: a loss that stayed put would match trivially
    assert abs(single[STEPS - 1] - single[0]) > 0.05


def test_last_layer_frozen_for_the_first_epoch_then_trains(two_rank_runs, digits_betons):
    cfg = load_config(None, overrides("unused", digits_betons[0], 64))
    torch.manual_seed(cfg.seed)
    initial = build_student_teacher(cfg.model).student.state_dict()
    last_layer = [k for k in initial if "last_layer" in k]
    for run in ("single", "stage0", "stage1", "stage2"):
        checkpoints = list_checkpoints(two_rank_runs / run / "checkpoints")
        assert [c.name.split(".")[0] for c in checkpoints] == ["step_00000021", "step_00000023"], run
        end_of_epoch0, later = (load_checkpoint(c, shard_classes=SHARD_PICKLED_CLASSES)["student"] for c in checkpoints)
        trainable = [k for k in last_layer if not torch.equal(initial[k], later[k])]
        assert trainable, f"{run}: the last layer never trained"
        for key in last_layer:
            assert torch.equal(end_of_epoch0[key], initial[key]), (run, key)
        other = "head.mlp.0.weight"
        assert not torch.equal(end_of_epoch0[other], initial[other]), run


def test_optimizer_state_is_sharded(two_rank_runs):
    """AdamW moments per rank: stage 1 and 2 hold half of stage 0's (measured after training)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_memory import per_rank_bytes

    cfg = load_config(None, overrides("unused", "unused", 32))
    memory = {stage: [json.loads((two_rank_runs / f"stage{stage}" / f"memory_rank{r}.json").read_text())
                      for r in (0, 1)] for stage in (0, 1, 2)}
    full = memory[0][0]["optimizer_state"]
    assert full == 2 * memory[0][0]["trainable_params"] and memory[0][1]["optimizer_state"] == full
    for stage in (1, 2):
        for rank_memory in memory[stage]:
            assert 0.49 * full <= rank_memory["optimizer_state"] <= 0.51 * full, (stage, rank_memory)
            assert 0.49 * full / 2 <= rank_memory["master_params"] <= 0.51 * full / 2, (stage, rank_memory)
    for stage in (0, 1, 2):
        analytic = per_rank_bytes(memory[0][0]["trainable_params"] // 4, stage, world_size=2, weight_bytes=4)
        measured = sum(m["optimizer_state"] for m in memory[stage]) / 2
        assert abs(measured - analytic["optimizer_state"]) <= 0.01 * analytic["optimizer_state"], stage


def test_two_node_rendezvous_on_loopback(tmp_path, digits_betons, two_rank_runs):
    """Two torchrun agents (--nnodes 2, one rank each) meet at a c10d rendezvous on 127.0.0.1."""
    args = ["-m", "fastdino", "train", *overrides(tmp_path, digits_betons[0], 32, "max_steps=3",
                                                  "parallel.zero_stage=1")]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29661",
                               "--rdzv_id", "fastdino-test", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    summary = json.loads([line for out, _ in outputs for line in out.splitlines() if line.startswith("{")][0])
    assert summary["world_size"] == 2
    assert_close_losses(losses(tmp_path), losses(two_rank_runs / "stage1"), range(3))


def child_pids(pid):
    return [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                           text=True).stdout.split()]


def test_kill_a_rank_then_resume_exactly(tmp_path, digits_betons, two_rank_runs):
    """kill -9 of one rank mid-run (checkpoints every step, so likely mid-write): the launcher
    exits non-zero in bounded time, the newest complete checkpoint loads, and the resumed run's
    losses equal the uninterrupted run's."""
    train, _ = digits_betons
    args = ["-m", "fastdino", "train", *overrides(tmp_path, train, 32, "parallel.zero_stage=2", "checkpoint_every=1",
                                                  "max_steps=8", "keep_checkpoints=2")]
    job = subprocess.Popen(torchrun(*args, port=29671), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env())
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "step_00000003").exists():
        assert job.poll() is None and time.time() < deadline, "the run ended before its third checkpoint"
        time.sleep(0.05)
    workers = child_pids(job.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    killed_at = time.time()
    _, err = job.communicate(timeout=180)
    assert job.returncode != 0 and time.time() - killed_at < 180
    assert "SIGKILL" in err or "Signal 9" in err, err[-3000:]

    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert load_checkpoint(newest, shard_classes=SHARD_PICKLED_CLASSES)["step"] >= 3
    resumed = subprocess.run(torchrun(*args, "--resume", "auto", port=29672), capture_output=True, text=True,
                             timeout=600, env=env())
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {newest}" in resumed.stderr
    got = losses(tmp_path)
    assert sorted(got) == list(range(8))
    assert_close_losses(got, losses(two_rank_runs / "stage2"), range(8))


def test_deepspeed_launcher_single_node(tmp_path, digits_betons, two_rank_runs):
    deepspeed = Path(sys.executable).with_name("deepspeed")
    if not deepspeed.exists():
        pytest.skip("the deepspeed launcher script is not installed next to this python")
    result = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", "29681", "--module", "fastdino",
                             "train", *overrides(tmp_path, digits_betons[0], 32, "max_steps=3",
                                                 "parallel.zero_stage=0")],
                            capture_output=True, text=True, timeout=600, env=env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert_close_losses(losses(tmp_path), losses(two_rank_runs / "stage0"), range(3))


def test_incomplete_checkpoints_are_ignored(tmp_path):
    """A write killed before its rename leaves a .tmp- folder; a folder without fastdino.pt
    is not a checkpoint; --resume auto takes the newest complete one."""
    checkpoints = tmp_path / "checkpoints"
    complete = checkpoints / "step_00000004"
    complete.mkdir(parents=True)
    torch.save({"version": 1, "step": 4}, complete / "fastdino.pt")
    (checkpoints / ".tmp-step_00000006").mkdir()
    (checkpoints / ".tmp-step_00000006" / "fastdino.pt").write_bytes(b"partial")
    (checkpoints / "step_00000005").mkdir()
    assert list_checkpoints(checkpoints) == [complete]
    assert load_checkpoint(complete, shard_classes=SHARD_PICKLED_CLASSES)["step"] == 4


def official_param_groups(model):
    """main_dino.py's utils.get_params_groups: biases and 1-D parameters get no weight decay."""
    regularized = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or p.ndim <= 1)]
    not_regularized = [p for n, p in model.named_parameters() if n.endswith(".bias") or p.ndim <= 1]
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def official_clip_and_cancel(model, clip, frozen):
    """main_dino.py's utils.clip_gradients (each parameter on its own) then cancel_gradients_last_layer."""
    for p in model.parameters():
        if p.grad is not None:
            coef = clip / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    for name, p in model.named_parameters():
        if frozen and "last_layer" in name:
            p.grad = None


def test_dino_adamw_matches_official_clipping_and_frozen_last_layer():
    """DINOAdamW (clipping and freezing inside step) against the official sequence: per-parameter
    clipping, grad=None on the last layer while frozen, torch AdamW; random gradients, 6 steps."""
    from fastdino.models import DINOHead
    from fastdino.parallel import DINOAdamW
    from fastdino.ssl import param_groups

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    ours.add_module("head", DINOHead(5, 11, hidden_dim=9, bottleneck_dim=3))
    reference = __import__("copy").deepcopy(ours)
    optimizer = DINOAdamW(param_groups(ours), lr=0.0, clip_grad=0.5)
    official = torch.optim.AdamW(official_param_groups(reference), lr=0.0)
    for step in range(6):
        frozen, lr, wd = step < 3, 0.01 * (step + 1), 0.04 + 0.01 * step
        for group in optimizer.param_groups:
            group.update(lr=lr, weight_decay=wd if group["decay"] else 0.0, frozen=frozen and group["last_layer"])
        for i, group in enumerate(official.param_groups):
            group.update(lr=lr, weight_decay=wd if i == 0 else 0.0)
        for a, b in zip(ours.parameters(), reference.parameters()):
            if a.requires_grad:
                a.grad = torch.randn_like(a) * (3.0 if step % 2 else 0.1)
                b.grad = a.grad.clone()
        optimizer.step()
        official_clip_and_cancel(reference, 0.5, frozen)
        official.step()
        for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {step}: {name}")


def test_param_groups_tag_decay_and_last_layer():
    from fastdino.models import DINOHead
    from fastdino.ssl import param_groups

    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    net.add_module("head", DINOHead(5, 11, nlayers=2, hidden_dim=9, bottleneck_dim=3, norm_last_layer=True))
    net[0].weight.requires_grad_(False)
    shapes = {(g["decay"], g["last_layer"]): sorted(tuple(p.shape) for p in g["params"]) for g in param_groups(net)}
    # weight_g of a normalised last layer is frozen (requires_grad False) and left out
    assert shapes == {(True, False): [(3, 9), (9, 5)], (False, False): [(3,), (5,), (5,), (5,), (9,)],
                      (True, True): [(11, 3)]}
    assert all(g["weight_decay"] == 0.0 and not g["frozen"] for g in param_groups(net))


NONFINITE_CHILD = textwrap.dedent("""
    import json, sys
    from fastdino.config import load_config
    from fastdino.ssl.loss import DINOLoss
    from fastdino.train.trainer import NonFiniteLossError, Trainer
    original, calls = DINOLoss.forward, {"n": 0}
    def poisoned(self, student, teacher, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, student, teacher, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss
    DINOLoss.forward = poisoned
    out, args = sys.argv[1], sys.argv[2:]
    try:
        Trainer(load_config(None, [*args, f"output_dir={out}/error"])).train()
        error = None
    except NonFiniteLossError as exc:
        error = str(exc)
    calls["n"] = 0
    summary = Trainer(load_config(None, [*args, f"output_dir={out}/skip", "on_nonfinite_loss=skip"])).train()
    print(json.dumps({"error": error, "skip_steps": summary["steps"]}))
""")


def test_nonfinite_loss_under_zero_on_one_rank(tmp_path, digits_betons):
    """ZeRO-1 with one rank (DeepSpeed under a plain `python`): a NaN loss at step 2 stops the run
    naming the step, or with on_nonfinite_loss=skip the run goes on."""
    script = tmp_path / "child.py"
    script.write_text(NONFINITE_CHILD)
    result = subprocess.run([sys.executable, str(script), str(tmp_path),
                             *overrides(tmp_path, digits_betons[0], 16, "max_steps=4", "parallel.zero_stage=1")],
                            capture_output=True, text=True, timeout=600, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] and "at step 2" in report["error"], report
    assert report["skip_steps"] == 4
