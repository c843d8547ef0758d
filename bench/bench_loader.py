"""Loader benchmark: DINO multi-crop images per second and CPU cores used.

    (a) pil       what the official DataAugmentationDINO does, in PIL, with worker processes
                  (JPEG decode, RandomResizedCrop bicubic, flip, colour jitter in random order,
                  grayscale, Gaussian blur, solarize, to float and normalise), no torchvision
    (b) fastdino  fastdino.data.multicrop_loader on the CPU (FFCV decode + OpenCV uint8 crops in threads)
    (c) gpu       fastdino.data.multicrop_loader on a CUDA GPU (nvJPEG decode + batched tensor crops, bf16),
                  where a GPU is present
    (d) gpu-bytes what (c) does after FFCV's reader, without FFCV (for GPU hosts that cannot build it):
                  NvJpegDecoder + fastdino.data.multicrop.TorchMultiCrop on batches of JPEG bytes held in
                  memory, ImageNet-like (500 x 375 px, quality 90); also the decode alone. Run only
                  when asked for (--only gpu-bytes), as no FFCV page reading is in it.

(a) to (c) read the same JPEGs (scikit-image's sample photos, randomly cropped and resized up to
512 px, written once) and produce 2 global + N local crops per image. (b) and (c) read them
from a .beton and need FFCV; (a) does not, and runs without it. Each pipeline is set up
once (the loader; PIL's worker pool lives for a pass, as its CPU time is counted when its
workers end), warmed up by one pass, then timed over one pass. Cores used is
(process + children CPU time) / wall time, so img/s per core compares the work per core.

    python bench/bench_loader.py                      # 2 x 224 + 10 x 96, 512 images
    python bench/bench_loader.py --json cpu_loader.jsonl
    python bench/bench_loader.py --only gpu-bytes --images 2048 --batch-size 128 --workers 4
    fastdino bench loader --images 128 --local-crops 10
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import random
import resource
import shlex
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

# As `fastdino bench` and `fastdino train` run (fastdino/cli.py): idle OpenMP threads sleep rather than
# spin, which would otherwise cost fastdino ~10% of its CPU time here; set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
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
    """Random crops of scikit-image's photos, longer side 256..512 px, as JPEG files."""
    rng = np.random.default_rng(seed)
    photos = source_photos(rng)
    paths = []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.fromarray(random_crop(photos[i % len(photos)], rng))
        longer = int(rng.integers(256, 513))
        scale = longer / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
        path = folder / "images" / f"{i:05d}.jpg"
        image.save(path, quality=90)
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


def run_pil(paths: list[Path], args) -> int:
    """One pass; the pool lives for the pass, so its workers' CPU time is counted once they are reaped
    (forking them costs milliseconds)."""
    jobs = [(str(p), i, args.local_crops, args.global_size, args.local_size) for i, p in enumerate(paths)]
    with Pool(args.workers) as pool:
        done = 0
        for views in pool.imap_unordered(official_crops, jobs, chunksize=4):
            done += 1
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
    """{label: run} for NvJpegDecoder + multicrop over in-memory JPEG batches, and the decode alone;
    each run is one pass over all images, synchronised at its end."""
    from fastdino.data.gpu_decode import NvJpegDecoder, jpeg_rows
    from fastdino.data.multicrop import TorchMultiCrop
    from fastdino.data.recipe import ViewRecipe

    blobs, shapes = imagenet_like_jpegs(args.images)
    batches = [jpeg_rows(blobs[i:i + args.batch_size], shapes[i:i + args.batch_size])
               for i in range(0, len(blobs), args.batch_size)]
    decoder = NvJpegDecoder("cuda", cpu_threads=args.workers)
    multicrop = TorchMultiCrop(ViewRecipe(args.local_crops, args.global_size, args.local_size), device="cuda",
                               dtype=torch.bfloat16)

    def run(crops: bool) -> int:
        done = 0
        for index, (rows, sizes) in enumerate(batches):
            canvases = decoder(rows, sizes)
            if crops:
                views = multicrop(canvases, sizes[:, :2], torch.Generator().manual_seed(index))
                assert len(views) == 2 + args.local_crops
            done += len(sizes)
        torch.cuda.synchronize()
        return done

    source = "no FFCV: ImageNet-like JPEG bytes in memory"
    return {f"gpu-bytes nvJPEG decode + batched tensor multi-crop, bf16 ({source})": lambda: run(True),
            f"gpu-bytes nvJPEG decode only ({source})": lambda: run(False)}


def cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure(name: str, run) -> dict:
    """Times one pass over the images after a warm-up pass (FFCV's JIT compile, CUDA start, page cache)."""
    run()
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    images = run()
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    return {"pipeline": name, "images": images, "seconds": wall, "img_per_s": images / wall,
            "cores_used": cpu / wall, "img_per_s_per_core": images / cpu}


def main(argv=None) -> None:
    args = parse_args(argv)
    import triton

    if args.only in ("gpu", "gpu-bytes") and not torch.cuda.is_available():
        sys.exit(f"bench_loader.py --only {args.only}: needs a CUDA GPU")
    if args.only == "gpu-bytes":
        rows = [measure(name, run) for name, run in gpu_bytes_runs(args).items()]
    else:
        rows = file_pipelines(args)
    report(rows, args, triton)


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
    """Rows of pipelines (a) to (c), over JPEG files and a .beton of them written to a temporary folder."""
    beton_wanted = args.only in (None, "fastdino", "gpu")
    missing = ffcv_missing(args) if beton_wanted else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_jpegs(folder, args.images)
        rows = []
        if args.only in (None, "pil"):
            rows.append(measure("pil (official DataAugmentationDINO recipe, worker processes)",
                                lambda: run_pil(paths, args)))
        if missing:
            print(f"PIL pipeline only: {missing}")
        if not beton_wanted or missing:
            return rows
        from fastdino.data import convert_folder

        beton = folder / "bench.beton"
        convert_folder(folder / "images", beton, max_resolution=512, progress=False)
        if args.only in (None, "fastdino"):
            loader = fastdino_loader(beton, args, "cpu")
            rows.append(measure("fastdino CPU (FFCV decode + OpenCV uint8 multi-crop threads)",
                                lambda: run_fastdino(loader)))
        if args.only in (None, "gpu") and torch.cuda.is_available():
            loader = fastdino_loader(beton, args, "cuda")
            rows.append(measure(f"fastdino GPU ({loader.decode} decode + batched tensor multi-crop, bf16)",
                                lambda: run_fastdino(loader)))
    return rows


def report(rows: list[dict], args, triton) -> None:
    """Prints the table and appends the JSON rows (--json)."""
    crops = f"2 x {args.global_size} + {args.local_crops} x {args.local_size}"
    images = "ImageNet-like, 500x375" if args.only == "gpu-bytes" else "256-512 px"
    print(f"\nmulti-crop loading, {crops} px crops, {args.images} JPEGs ({images}), {args.workers} workers, "
          f"{os.cpu_count()} CPU cores")
    width = max([62] + [len(row["pipeline"]) for row in rows])
    print(f"{'pipeline':<{width}} {'img/s':>8} {'cores':>6} {'img/s/core':>11}")
    for row in rows:
        print(f"{row['pipeline']:<{width}} {row['img_per_s']:>8.1f} {row['cores_used']:>6.2f} "
              f"{row['img_per_s_per_core']:>11.1f}")
    if len(rows) >= 2 and rows[0]["pipeline"].startswith("pil"):
        print(f"fastdino CPU / pil per core: {rows[1]['img_per_s_per_core'] / rows[0]['img_per_s_per_core']:.2f}x")
    if args.json:
        RESULTS_DIR.mkdir(exist_ok=True)
        device = f"CPU, {os.cpu_count()} cores"
        if torch.cuda.is_available():
            device += f", {torch.cuda.get_device_name()}"
        base = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
                "date": datetime.date.today().isoformat(),
                "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}
        with open(RESULTS_DIR / args.json, "a") as f:
            for row in rows:
                for what, unit in (("img_per_s", "img/s"), ("cores_used", "cores"),
                                   ("img_per_s_per_core", "img/s/core")):
                    f.write(json.dumps({"what": f"loader {row['pipeline']}, {crops} crops, {what}",
                                        "value": round(row[what], 2), "unit": unit, **base}) + "\n")


if __name__ == "__main__":
    main()
