"""Loader benchmark: DINO multi-crop images per second, CPU cores used, and images per CPU-second.

    (a) pil       the official DataAugmentationDINO recipe in PIL (JPEG decode, RandomResizedCrop bicubic,
                  flip, colour jitter in random order, grayscale, Gaussian blur, solarize, to float and
                  normalise; no torchvision) in this one process, through a torch DataLoader without workers
    (b) pil       the same recipe as the official main_dino.py runs it: a torch DataLoader with --workers
                  worker processes that collate batches into shared memory (--only pil runs (a) and (b))
    (c) fastdino  fastdino.data.multicrop_loader on the CPU (FFCV decode + OpenCV uint8 crops in threads)
    (d) gpu       fastdino.data.multicrop_loader on a CUDA GPU (nvJPEG decode + batched tensor crops, bf16,
                  made ahead on a CUDA stream of their own), where a GPU is present
    (e) gpu-bytes what (d) does after FFCV's reader, without FFCV (for GPU hosts that cannot build it):
                  NvJpegDecoder + fastdino.data.multicrop.TorchMultiCrop on batches of JPEG bytes held in
                  memory, made ahead as in (d); also the decode alone. Run only when asked for
                  (--only gpu-bytes), as no FFCV page reading is in it.

Every pipeline reads ImageNet-like JPEGs (500 x 375 or 375 x 500 px, quality 90, random crops of
scikit-image's sample photos) and produces 2 global + N local crops per image. (c) and (d) read them
from a .beton (FFCV re-encodes at quality 90) and need FFCV; (a) and (b) read the JPEG files and run
without it. Each pipeline is set up once, warmed up by one pass (FFCV's JIT compile, page cache),
then timed over one pass (steady state). CPU time is this process's and its reaped children's (user
+ system), so img/s per CPU-second compares the work each pipeline does per core and stays fair
under other load; the 1-minute load average is recorded with each row. (a) is the honest baseline
of the work itself; (b) adds what worker processes cost (start-up, collation into shared memory).

    python bench/bench_loader.py                      # 2 x 224 + 10 x 96, 512 images
    python bench/bench_loader.py --json cpu_loader.jsonl
    python bench/bench_loader.py --only gpu-bytes --images 2048 --batch-size 128 --workers 4
    fastdino bench loader --images 128 --local-crops 10
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

# As `fastdino bench` and `fastdino train` run (fastdino/cli.py): idle OpenMP threads sleep rather than
# spin, which would otherwise cost fastdino ~10% of its CPU time here; set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PIL_ONE_PROCESS = "pil (official DataAugmentationDINO recipe), one process"
PIL_WORKERS = "pil (official DataAugmentationDINO recipe), DataLoader worker processes"
FASTDINO_CPU = "fastdino CPU (FFCV decode + OpenCV uint8 multi-crop threads)"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="distinct JPEGs (default 512)")
    p.add_argument("--local-crops", type=int, default=10, help="local crops per image (default 10)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="PIL worker processes / FFCV threads")
    p.add_argument("--only", choices=["pil", "fastdino", "gpu", "gpu-bytes"],
                   help="run one pipeline (gpu-bytes runs only when named)")
    p.add_argument("--json", metavar="FILE", help="append one JSON row per measurement to FILE "
                                                  "(a relative path goes under bench/results/)")
    return p.parse_args(argv)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`imagenet_like_jpegs` written as JPEG files into folder/images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, blob in enumerate(imagenet_like_jpegs(count, seed)[0]):
        path = folder / "images" / f"{i:05d}.jpg"
        path.write_bytes(blob)
        paths.append(path)
    return paths


def source_photos(rng) -> list[np.ndarray]:
    """scikit-image's sample photos (uint8 HWC), or where scikit-image is missing, smooth random
    images (bicubically upsampled noise drawn from `rng`)."""
    try:
        from fastdino.data.sample_data import sample_photos

        return list(sample_photos().values())
    except ImportError:
        return [np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
                           .resize((640, 480), Image.BICUBIC)) for _ in range(4)]


def random_crop(photo: np.ndarray, rng) -> np.ndarray:
    """A crop of `photo` covering 1/2 to all of its height and of its width, at a random place."""
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return photo[top:top + ch, left:left + cw]


def imagenet_like_jpegs(count: int, seed: int = 0) -> tuple[list[bytes], list[tuple[int, int]]]:
    """JPEG bytes (quality 90) of `count` images of 500 x 375 or 375 x 500 px, the typical ImageNet
    size, made from random photo crops in memory; and each image's (height, width)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    photos = source_photos(rng)
    crops = [random_crop(photos[i % len(photos)], rng) for i in range(count)]
    portrait = rng.random(count) < 0.25

    def encode(i):
        size = (375, 500) if portrait[i] else (500, 375)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crops[i])).resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=90)
        return buffer.getvalue(), size[::-1]

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # PIL releases the GIL while encoding
        encoded = list(pool.map(encode, range(count)))
    return [blob for blob, _ in encoded], [shape for _, shape in encoded]


# ---- (a) the official pipeline, in PIL ---------------------------------------------------------
def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> Image.Image:
    width, height = image.size
    area = width * height
    log_ratio = (np.log(3 / 4), np.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        w, h = min(width, height), min(width, height)
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def shift_hue(image: Image.Image, factor: float) -> Image.Image:
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(factor * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
           lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
           lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2)),
           lambda im: shift_hue(im, rng.uniform(-0.1, 0.1))]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def official_view(image: Image.Image, size: int, scale, blur_p: float, solarize_p: float,
                  rng: random.Random) -> np.ndarray:
    view = random_resized_crop(image, size, scale, rng)
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    if rng.random() < 0.8:
        view = color_jitter(view, rng)
    if rng.random() < 0.2:
        view = ImageOps.grayscale(view).convert("RGB")
    if rng.random() < blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < solarize_p:
        view = ImageOps.solarize(view, 128)
    pixels = np.asarray(view, dtype=np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def official_crops(job: tuple[str, int, int, int, int]) -> list[np.ndarray]:
    path, index, n_local, global_size, local_size = job
    rng = random.Random(index)
    with Image.open(path) as f:
        image = f.convert("RGB")
    views = [official_view(image, global_size, (0.4, 1.0), 1.0, 0.0, rng),
             official_view(image, global_size, (0.4, 1.0), 0.1, 0.2, rng)]
    views += [official_view(image, local_size, (0.05, 0.4), 0.5, 0.0, rng) for _ in range(n_local)]
    return views


class OfficialViews(torch.utils.data.Dataset):
    """The JPEG files as the official ImageFolder + DataAugmentationDINO give them: a list of 2 + N
    float tensors [3, H, W] per image (the label is left out: it costs nothing)."""

    def __init__(self, paths: list[Path], args):
        self.jobs = [(str(p), i, args.local_crops, args.global_size, args.local_size) for i, p in enumerate(paths)]

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, index):
        return [torch.from_numpy(view) for view in official_crops(self.jobs[index])]


def run_pil(paths: list[Path], args, workers: int) -> int:
    """One pass of the official recipe through a torch DataLoader, as main_dino.py runs it (batches,
    drop_last off here so that every image counts); workers=0 runs it in this process. The workers
    live for the pass, so their CPU time is counted once they are reaped (starting them costs
    milliseconds)."""
    loader = torch.utils.data.DataLoader(OfficialViews(paths, args), batch_size=args.batch_size, num_workers=workers)
    done = 0
    for views in loader:
        done += len(views[0])
        assert len(views) == 2 + args.local_crops
    return done


# ---- (b) fastdino ------------------------------------------------------------------------------
def fastdino_loader(beton: Path, args, device: str):
    from fastdino.data import multicrop_loader

    return multicrop_loader(beton, args.batch_size, n_local_crops=args.local_crops, global_size=args.global_size,
                            local_size=args.local_size, num_workers=args.workers, drop_last=False, device=device,
                            dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def run_fastdino(loader) -> int:
    done = 0
    for crops, _labels in loader:
        done += crops[0].shape[0]
        assert len(crops) == 2 + loader.recipe.n_local_crops
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    return done


# ---- (d) GPU decode + crops from JPEG bytes in memory, no FFCV ------------------------------------
def gpu_bytes_runs(args) -> dict:
    """{label: run} for NvJpegDecoder + multicrop over in-memory JPEG batches, made ahead on their own
    CUDA stream and handed over as the training loader does (fastdino.data.loader.prefetched), and
    the decode alone; each run is one pass over all images, synchronised at its end."""
    from fastdino.data.gpu_decode import NvJpegDecoder, jpeg_rows
    from fastdino.data.loader import prefetched
    from fastdino.data.multicrop import TorchMultiCrop
    from fastdino.data.recipe import ViewRecipe

    blobs, shapes = imagenet_like_jpegs(args.images)
    batches = [jpeg_rows(blobs[i:i + args.batch_size], shapes[i:i + args.batch_size])
               for i in range(0, len(blobs), args.batch_size)]
    decoder = NvJpegDecoder("cuda", cpu_threads=args.workers)
    multicrop = TorchMultiCrop(ViewRecipe(args.local_crops, args.global_size, args.local_size), device="cuda",
                               dtype=torch.bfloat16)

    def crops():
        for index, (rows, sizes) in enumerate(batches):
            views = multicrop(decoder(rows, sizes), sizes[:, :2], torch.Generator().manual_seed(index))
            yield views, torch.zeros(len(sizes), device="cuda")

    def run_crops() -> int:
        done = 0
        for views, _labels in prefetched(crops(), 3, "cuda"):
            assert len(views) == 2 + args.local_crops
            done += len(views[0])
        torch.cuda.synchronize()
        return done

    def run_decode() -> int:
        for rows, sizes in batches:
            decoder(rows, sizes)
        torch.cuda.synchronize()
        return args.images

    source = "no FFCV: ImageNet-like JPEG bytes in memory"
    return {f"gpu-bytes nvJPEG decode + batched tensor multi-crop, bf16, made ahead ({source})": run_crops,
            f"gpu-bytes nvJPEG decode only ({source})": run_decode}


def cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure(name: str, run) -> dict:
    """Times one pass over the images after a warm-up pass (FFCV's JIT compile, CUDA start, page cache).
    img_per_s_per_core is images per CPU-second; load_avg the 1-minute load average after the pass."""
    run()
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    images = run()
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    return {"pipeline": name, "images": images, "seconds": wall, "img_per_s": images / wall,
            "cores_used": cpu / wall, "img_per_s_per_core": images / cpu, "load_avg": os.getloadavg()[0]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only in ("gpu", "gpu-bytes") and not torch.cuda.is_available():
        sys.exit(f"bench_loader.py --only {args.only}: needs a CUDA GPU")
    if args.only == "gpu-bytes":
        rows = [measure(name, run) for name, run in gpu_bytes_runs(args).items()]
    else:
        rows = file_pipelines(args)
    report(rows, args)


def ffcv_missing(args) -> str | None:
    """Why the .beton pipelines (b) and (c) cannot run here (one line naming FFCV and how to
    install it), or None. Exits with that line where only they were asked for."""
    from fastdino._requires import MissingPackageError, require_ffcv

    try:
        require_ffcv(f"bench loader --only {args.only}" if args.only else
                     "bench loader (its fastdino CPU and GPU pipelines)")
    except MissingPackageError as error:
        if args.only:
            sys.exit(str(error))
        return str(error)
    return None


def file_pipelines(args) -> list[dict]:
    """Rows of pipelines (a) to (d), over JPEG files and a .beton of them written to a temporary folder."""
    beton_wanted = args.only in (None, "fastdino", "gpu")
    missing = ffcv_missing(args) if beton_wanted else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_jpegs(folder, args.images)
        rows = []
        if args.only in (None, "pil"):
            rows.append(measure(PIL_ONE_PROCESS, lambda: run_pil(paths, args, 0)))
            rows.append(measure(f"{PIL_WORKERS} ({args.workers} workers)", lambda: run_pil(paths, args, args.workers)))
        if missing:
            print(f"PIL pipeline only: {missing}")
        if not beton_wanted or missing:
            return rows
        from fastdino.data import convert_folder

        beton = folder / "bench.beton"
        convert_folder(folder / "images", beton, max_resolution=512, jpeg_quality=90, progress=False)
        if args.only in (None, "fastdino"):
            loader = fastdino_loader(beton, args, "cpu")
            rows.append(measure(FASTDINO_CPU, lambda: run_fastdino(loader)))
        if args.only in (None, "gpu") and torch.cuda.is_available():
            loader = fastdino_loader(beton, args, "cuda")
            rows.append(measure(f"fastdino GPU ({loader.decode} decode + batched tensor multi-crop, bf16)",
                                lambda: run_fastdino(loader)))
    return rows


def ratios(rows: list[dict]) -> list[str]:
    """'fastdino CPU / <baseline>: R x' lines, images per CPU-second, against each PIL baseline measured."""
    def row(prefix):
        return next((r for r in rows if r["pipeline"].startswith(prefix)), None)

    ours, lines = row(FASTDINO_CPU), []
    baselines = ((row(PIL_ONE_PROCESS), "PIL in one process"), (row(PIL_WORKERS), "PIL in DataLoader workers"))
    for baseline, what in baselines:
        if ours and baseline:
            ratio = ours["img_per_s_per_core"] / baseline["img_per_s_per_core"]
            lines.append(f"fastdino CPU / {what}, images per CPU-second: {ratio:.2f}x")
    return lines


def report(rows: list[dict], args) -> None:
    """Prints the table and the ratios, and appends the JSON rows (--json)."""
    crops = f"2 x {args.global_size} + {args.local_crops} x {args.local_size}"
    print(f"\nmulti-crop loading, {crops} px crops, {args.images} ImageNet-like JPEGs (500x375), {args.workers} "
          f"workers, {os.cpu_count()} CPU cores")
    width = max([62] + [len(row["pipeline"]) for row in rows])
    print(f"{'pipeline':<{width}} {'img/s':>8} {'cores':>6} {'img/cpu-s':>10} {'load':>5}")
    for row in rows:
        print(f"{row['pipeline']:<{width}} {row['img_per_s']:>8.1f} {row['cores_used']:>6.2f} "
              f"{row['img_per_s_per_core']:>10.1f} {row['load_avg']:>5.1f}")
    for line in ratios(rows):
        print(line)
    if args.json:
        RESULTS_DIR.mkdir(exist_ok=True)
        from fastdino.runinfo import benchmark_context

        base = benchmark_context(torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                 [sys.executable, *sys.argv])
        base.pop("load_average_1min_at_start")  # each row carries the load while it was measured
        with open(RESULTS_DIR / args.json, "a") as f:
            for row in rows:
                for what, unit in (("img_per_s", "img/s"), ("cores_used", "cores"),
                                   ("img_per_s_per_core", "img/s/core")):
                    f.write(json.dumps({"what": f"loader {row['pipeline']}, {crops} crops, {what}",
                                        "value": round(row[what], 2), "unit": unit,
                                        "load_avg_1m": round(row["load_avg"], 2), **base}) + "\n")


if __name__ == "__main__":
    main()
