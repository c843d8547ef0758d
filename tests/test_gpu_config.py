"""The configuration `auto` picks on a GPU, trained end to end on whatever machine runs the tests.

On a CPU every `auto` picks the PyTorch twin, so a fault in a fast path stays invisible
unless a test forces the GPU's choices through the public entry point, in the trainer's
order. A fused loss that passed all its kernel tests crashed this way at the first
backward (it saved a view of the centre, which DINOLoss then updates in place). Here
`fastdino train` runs, as users launch it, with every fast path switched on by name
(`GPU_CHOICES`): on a CPU the Triton kernels run under the interpreter
(TRITON_INTERPRET=1), on a GPU compiled. Each launch (one process; DeepSpeed ZeRO-2 on 2
ranks, over gloo on a CPU) trains 4 steps

- with the fast paths: the losses must track the same run with the PyTorch twins
  (`TWINS`), within `LOSS_TOLERANCE`;
- for 2 steps, then `--resume auto` to step 4: the losses, the teacher and the centre
  must equal those of the uninterrupted run exactly (on CUDA, within rounding: atomics).

Every fast path that exists, or is added later, gets an entry in `GPU_CHOICES`.
Two GPU paths cannot run on a CPU at all, and are covered around their edges instead:
- nvJPEG decode (`data.decode=nvjpeg`): on a CPU the CPU decoder hands `data.crops=torch`
  the same `[B, max_h, max_w, 3]` uint8 canvas nvJPEG would; here we check that the
  stored-bytes rows and sizes nvJPEG is given decode to exactly that canvas
  (`test_stored_bytes_decode_to_the_cpu_canvas`); the choice of decoder by decoding is in
  test_gpu_decode.py, the GPU decode itself in its CUDA tests.
- xformers kernels (`model.attn_backend=auto`): on a CPU auto falls back to SDPA with the
  same packed layout (asserted from the log here); the BlockDiagonalMask construction is
  compared with a dense mask in test_packed.py, the kernels in its CUDA test.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import TINY

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()

GPU_CHOICES = [
    "dino.loss_impl=triton",  # fused DINO loss, forward and backward (Triton)
    "dino.ema_impl=triton",  # fused multi-tensor EMA of the teacher (Triton)
    "data.crops=torch",  # batched tensor multi-crop, auto's choice on a GPU
    f"data.decode={'auto' if CUDA else 'cpu'}",  # nvJPEG where it decodes; a CPU cannot (see the docstring)
    "model.packed_crops=true",  # all crops in one packed student pass
    "model.drop_path_impl=subset",  # stochastic depth runs only the kept samples
    "model.drop_path_rate=0.2",
    "model.attn_backend=auto",  # xformers where its kernels load, else SDPA (the CPU)
    "precision=bf16",  # bf16 autocast and bf16 crops, auto's choice on a GPU
]
TWINS = ["dino.loss_impl=torch", "dino.ema_impl=torch"]
# The fused and the PyTorch loss see the same bf16 logits at step 0 and agree to fp32 rounding
# (1e-6); afterwards their gradients differ by bf16 rounding (one ulp, 2^-8, in some entries),
# so the weights and the losses drift apart slowly: 2e-3 relative over 4 steps.
LOSS_TOLERANCE = 2e-3
# Exact on a CPU. On CUDA, atomic adds (subset stochastic depth's index_add_, attention
# backward) make two runs of the same steps differ by rounding: there the resumed run must
# stay within the twins' tolerance.
RESUME_TOLERANCE = 2e-3 if CUDA else 0.0
STEPS = 4
LAUNCHES = {
    "one_process": [],
    "zero2_two_ranks": ["parallel.zero_stage=2", "data.batch_size=8"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, launch: str, *extra: str, resume: bool = False) -> subprocess.CompletedProcess:
    """`fastdino train` as users launch it; ZeRO-2 through torchrun with 2 ranks."""
    command = ["-m", "fastdino", "train", *TINY, f"device={'cuda' if CUDA else 'cpu'}",
               f"output_dir={run_dir}", *LAUNCHES[launch], *extra, *(["--resume", "auto"] if resume else [])]
    if launch == "zero2_two_ranks":
        command = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cuda" if CUDA else "cpu"}
    if CUDA:
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{launch} {' '.join(extra)}:\n{result.stderr[-5000:]}"
    return result


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") != "eval"}


def final_state(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    path = path / "fastdino.pt" if path.is_dir() else path.with_suffix(".pt")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("launch", [
    "one_process",
    pytest.param("zero2_two_ranks", marks=pytest.mark.skipif(
        CUDA and torch.cuda.device_count() < 2, reason="2 ranks on CUDA need 2 GPUs (on a CPU they run over gloo)")),
])
def test_gpu_choices_train_track_the_twins_and_resume_exactly(tmp_path, digits_betons, launch):
    data = f"data.path={digits_betons[0]}"
    run = lambda name, *extra, **kw: train(tmp_path / name, launch, data, *extra, **kw)  # noqa: E731
    run("fast", *GPU_CHOICES, f"max_steps={STEPS}", "checkpoint_every=100")
    run("twins", *GPU_CHOICES, *TWINS, f"max_steps={STEPS}", "checkpoint_every=100")
    run("cut", *GPU_CHOICES, "max_steps=2", "checkpoint_every=100")
    run("cut", *GPU_CHOICES, f"max_steps={STEPS}", "checkpoint_every=100", resume=True)

    log = (tmp_path / "fast" / "train.log").read_text()
    for chosen in ("DINOLoss: using the triton implementation", "ema_update_: using the triton implementation"):
        assert chosen in log, chosen
    if not CUDA:
        assert "attention backend" in log and "sdpa" in log.split("attention backend", 1)[1].splitlines()[0]
    config = (tmp_path / "fast" / "config.yaml").read_text()
    for choice in GPU_CHOICES:
        key, value = choice.split("=")
        assert f"{key.split('.')[-1]}: {value}" in config, choice

    fast, twins, cut = (losses(tmp_path / name) for name in ("fast", "twins", "cut"))
    assert sorted(fast) == sorted(twins) == sorted(cut) == list(range(STEPS))
    for step in range(STEPS):
        assert all(np.isfinite([fast[step], twins[step]])), step
        assert abs(fast[step] - twins[step]) <= LOSS_TOLERANCE * abs(twins[step]), (step, fast[step], twins[step])
        assert abs(cut[step] - fast[step]) <= RESUME_TOLERANCE * abs(fast[step]), (step, cut[step], fast[step])
    assert fast[STEPS - 1] != fast[0]  # the run moved

    full, resumed = final_state(tmp_path / "fast"), final_state(tmp_path / "cut")
    same = (lambda a, b: torch.allclose(a, b, rtol=1e-3, atol=1e-5)) if CUDA else torch.equal
    assert same(full["dino_loss"]["center"], resumed["dino_loss"]["center"])
    for key, value in full["teacher"].items():
        assert same(value, resumed["teacher"][key]), key


STORED_BYTES_CHECK = """
import sys
import numpy as np
import torch
from fastdino.data.decode import BetonImages, decode_jpeg

beton, order = sys.argv[1], np.arange(20)
canvases = BetonImages(beton, 10, 1)
stored = BetonImages(beton, 10, 1, stored_bytes=True)
for (canvas, sizes, labels), (rows, row_sizes, row_labels) in zip(canvases.batches(order), stored.batches(order)):
    assert torch.equal(labels, row_labels)
    assert torch.equal(sizes[:, :2], row_sizes[:, :2])
    for i, (height, width, length, is_jpeg) in enumerate(row_sizes.tolist()):
        assert is_jpeg, i
        decoded = np.zeros((height, width, 3), np.uint8)
        decode_jpeg(rows[i, :length].numpy().copy(), decoded, height, width, height, width, 0, 0, 1, 1, False, False)
        assert np.array_equal(decoded, canvas[i, :height, :width].numpy()), i
print("same")
"""


def test_stored_bytes_decode_to_the_cpu_canvas(digits_betons):
    """The rows nvJPEG is handed (`BetonImages(stored_bytes=True)`: JPEG bytes and their
    (height, width, length, is_jpeg)) hold exactly the images the CPU decoder puts into the
    canvas that data.crops=torch consumes: FFCV's libjpeg-turbo call on the row gives the
    canvas bit for bit (nvJPEG against the CPU decoder is test_gpu_decode.py's CUDA test).
    In a child process: calling FFCV's numba decoder from Python with a writable array adds a
    signature that FFCV's later read-only flip of the shared array type corrupts, killing the
    decode threads of every later loader in the process (KeyError in numba)."""
    result = subprocess.run([sys.executable, "-c", STORED_BYTES_CHECK, str(digits_betons[0])], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "same" in result.stdout, result.stderr[-3000:]
