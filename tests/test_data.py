"""fastdino.data: folder -> .beton conversion, decoding, multi-crop augmentation, loaders.

One small folder of photo crops (variable sizes, odd modes, bad files) is converted
once per module; FFCV's JIT cost is paid once per process.
"""
import colorsys
import dataclasses
import json
import queue
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from omegaconf import OmegaConf
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from fastdino.cli import main as fastdino_main
from fastdino.data import DataError, convert_folder, eval_loader, multicrop_loader
from fastdino.data.convert import load_rgb
from fastdino.data import multicrop as mc
from fastdino.data import pixels as px
from fastdino.data import recipe as rc
from fastdino.data.decode import BetonImages, _wait_for_batch
from fastdino.data.loader import epoch_order
from fastdino.data.recipe import seeded_generator
from fastdino.data.resample import resize
from fastdino.data.sample_data import sample_photos, write_digits_folders

PHOTOS = sample_photos()
CROP_SIZES = [(40, 56), (64, 48), (50, 50), (72, 36), (45, 80), (60, 66)]  # (h, w)
BAD_FILES = {"corrupt.jpg": "not an image", "truncated.jpg": "unreadable", "empty.png": "empty file",
             "notes.txt": "not an image", "bomb.png": "decompression bomb"}


def decompression_bomb_png(side=30000):
    """A tiny PNG whose header claims side x side pixels (PIL refuses it when opening)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Class folders of photo crops, odd modes and bad files: (folder, [(name, expected pixels, label)])."""
    root = tmp_path_factory.mktemp("photos")
    expected = []  # file order: classes sorted, files sorted within each
    for label, name in enumerate(["astronaut", "coffee"]):
        class_dir = root / name
        class_dir.mkdir()
        for i, (h, w) in enumerate(CROP_SIZES):
            crop = np.ascontiguousarray(PHOTOS[name][100 + 10 * i: 100 + 10 * i + h, 150: 150 + w])
            Image.fromarray(crop).save(class_dir / f"crop{i}.jpg", quality=98)
            expected.append((f"{name}/crop{i}.jpg", crop, label))
    odd = root / "coffee"
    chelsea = PHOTOS["chelsea"][60:108, 200:264]  # 48 x 64
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels must be turned 90 degrees clockwise to display
    Image.fromarray(chelsea).save(odd / "x_exif6.jpg", quality=98, exif=exif.tobytes())
    gray = chelsea[..., 1]
    Image.fromarray(gray).save(odd / "y_gray.png")
    Image.fromarray(np.dstack([chelsea, np.full(chelsea.shape[:2], 128, np.uint8)])).save(odd / "y_rgba.png")
    palette = Image.fromarray(chelsea).quantize(16)
    palette.save(odd / "y_palette.png")
    sixteen = gray.astype(np.uint16) * 257
    Image.fromarray(sixteen).save(odd / "y_sixteen.png")
    Image.fromarray(chelsea).convert("CMYK").save(odd / "z_cmyk.jpg", quality=98)  # a print shop's JPEG
    expected += [("coffee/x_exif6.jpg", np.rot90(chelsea, k=-1), 1),
                 ("coffee/y_gray.png", np.dstack([gray] * 3), 1),
                 ("coffee/y_palette.png", np.asarray(palette.convert("RGB")), 1),
                 ("coffee/y_rgba.png", chelsea, 1),
                 ("coffee/y_sixteen.png", np.dstack([gray] * 3), 1),
                 ("coffee/z_cmyk.jpg", chelsea, 1)]
    expected.sort(key=lambda item: item[0])

    jpeg = (root / "astronaut" / "crop0.jpg").read_bytes()
    (root / "astronaut" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "astronaut" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "astronaut" / "empty.png").write_bytes(b"")
    (root / "coffee" / "notes.txt").write_text("not a picture\n")
    (root / "coffee" / "bomb.png").write_bytes(decompression_bomb_png())
    Image.fromarray(chelsea).save(root / "loose.png")
    (root / ".hidden").mkdir()
    return root, expected


@pytest.fixture(scope="module")
def converted(photo_folder, tmp_path_factory):
    src, expected = photo_folder
    out = tmp_path_factory.mktemp("beton") / "photos.beton"
    report = convert_folder(src, out, max_resolution=512, jpeg_quality=95, num_workers=2, progress=False)
    return out, report, expected


@pytest.fixture(scope="module")
def decoded(converted):
    """Every image of the .beton in file order: [(uint8 [h, w, 3], label)]."""
    path, _, _ = converted
    images = BetonImages(path, batch_size=8)
    out = []
    for canvases, sizes, labels in images.batches(np.arange(images.num_images)):
        out += [(canvases[i, :h, :w].numpy().copy(), int(labels[i])) for i, (h, w) in enumerate(sizes.tolist())]
    return out


@pytest.fixture(scope="module")
def train_loader(converted):
    path, _, _ = converted
    return multicrop_loader(path, 4, n_local_crops=3, global_size=32, local_size=16, seed=7)


# ---------------------------------------------------------------- conversion

def test_convert_report(converted):
    path, report, expected = converted
    assert report["written"] == len(expected) == 18
    assert report["classes"] == ["astronaut", "coffee"]
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == set(BAD_FILES) | {"loose.png"}
    for name, reason in BAD_FILES.items():
        assert reason in reasons[name], (name, reasons[name])
    assert json.loads(path.with_name(path.name + ".report.json").read_text()) == report
    assert sorted(p.name for p in path.parent.iterdir()) == ["photos.beton", "photos.beton.report.json"]


def test_convert_round_trip(converted, decoded):
    _, _, expected = converted
    assert [label for _, label in decoded] == [label for _, _, label in expected]
    for (name, source, _), (image, _) in zip(expected, decoded):
        assert image.shape == source.shape, name
        assert np.abs(image.astype(int) - source).mean() < 3, name  # JPEG q95 error


def test_convert_caps_resolution_and_flat_folder(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(PHOTOS["rocket"]).save(tmp_path / "flat" / "rocket.png")  # 427 x 640, no classes: label -1
    report = convert_folder(tmp_path / "flat", tmp_path / "out" / "flat.beton", max_resolution=100, num_workers=1,
                            progress=False)
    assert report == {"written": 1, "skipped": [], "classes": []}
    images = BetonImages(tmp_path / "out" / "flat.beton", batch_size=1)
    assert (images.heights[0], images.widths[0], images.labels[0]) == (67, 100, -1)


def test_convert_default_resolution_raw_storage_and_quality(tmp_path):
    (tmp_path / "flat").mkdir()
    source = tmp_path / "flat" / "rocket.png"
    Image.fromarray(PHOTOS["rocket"]).save(source)  # 427 x 640
    out = tmp_path / "out"
    convert_folder(tmp_path / "flat", out / "raw.beton", storage="raw", num_workers=1, progress=False)
    images = BetonImages(out / "raw.beton", batch_size=1)
    assert (images.heights[0], images.widths[0]) == (342, 512)  # longer side capped at 512 by default
    assert not images.is_jpeg[0]
    (canvas, sizes, _), = images.batches([0])
    assert np.array_equal(canvas[0, :342, :512].numpy(), load_rgb(source, 512))  # raw: exactly the pixels
    with pytest.raises(DataError, match="storage must be"):
        convert_folder(tmp_path / "flat", out / "x.beton", storage="png")
    sizes = {}
    for quality in (30, 95):
        path = out / f"q{quality}.beton"
        convert_folder(tmp_path / "flat", path, jpeg_quality=quality, num_workers=1, progress=False)
        sizes[quality] = int(BetonImages(path, batch_size=1).stored_lengths[0])
    assert sizes[30] < sizes[95] / 2 < sizes[95] < 3 * 342 * 512  # JPEG quality is applied


def test_convert_file_list(photo_folder, tmp_path):
    src, _ = photo_folder
    lines = ["# images and labels", f"{src}/astronaut/crop1.jpg 3", "", f"{src}/coffee/crop 2.jpg",
             f"{src}/coffee/z_cmyk.jpg -1", f"{src}/coffee/notes.txt 1", "missing.jpg 0"]
    Image.open(src / "coffee" / "crop2.jpg").save(src / "coffee" / "crop 2.jpg")  # a space in the name
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    report = convert_folder(tmp_path / "list.txt", tmp_path / "list.beton", num_workers=2, progress=False)
    (src / "coffee" / "crop 2.jpg").unlink()
    assert report["written"] == 3 and report["classes"] == []
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == {"notes.txt", "missing.jpg"} and "no such file (line 7" in reasons["missing.jpg"]
    assert BetonImages(tmp_path / "list.beton", batch_size=1).labels.tolist() == [3, -1, -1]


def test_convert_command_exit_codes(photo_folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8garbage")
    assert fastdino_main(["data", "convert", str(bad), str(tmp_path / "bad.beton"), "--workers", "1"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("fastdino: error: no image")
    assert not (tmp_path / "bad.beton").exists()
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(PHOTOS["chelsea"]).save(good / "cat.jpg")
    (good / "broken.jpg").write_bytes(b"")
    args = ["data", "convert", str(good), str(tmp_path / "good.beton"), "--workers", "2", "--max-resolution", "64",
            "--jpeg-quality", "80", "--storage", "jpg"]
    assert fastdino_main(args) == 0  # something written: success, the skipped file is in the report
    assert "wrote 1 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "good.beton.report.json").read_text())["skipped"][0]["reason"] == "empty file"


def test_convert_nothing_writable(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"\xff\xd8garbage")
    (src / "b.txt").write_text("hello")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="no image .* could be converted") as error:
        convert_folder(src, out / "x.beton", num_workers=1, progress=False)
    assert "\n" not in str(error.value) and list(out.iterdir()) == []
    with pytest.raises(DataError, match="no such image folder or file list"):
        convert_folder(tmp_path / "missing", out / "x.beton")


def test_interrupted_conversion_leaves_nothing(photo_folder, tmp_path, monkeypatch):
    def interrupted(writer, *args, **kwargs):
        Path(writer.fname).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_folder(photo_folder[0], tmp_path / "x.beton", num_workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_decodes_raw_images_from_other_writers(tmp_path):
    """FFCV's own ImageNet recipe stores some images raw ('proportion' mode): those decode too."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 9), (12, 4), (7, 7))]
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    DatasetWriter(str(tmp_path / "raw.beton"), fields, num_workers=1).from_indexed_dataset(
        [(image, i) for i, image in enumerate(images)])
    beton = BetonImages(tmp_path / "raw.beton", batch_size=2)
    batches = list(beton.batches([2, 0, 1]))
    decoded = [(canvases[i, :h, :w].numpy(), int(labels[i]))
               for canvases, sizes, labels in batches for i, (h, w) in enumerate(sizes.tolist())]
    assert [label for _, label in decoded] == [2, 0, 1]
    assert all(np.array_equal(image, images[label]) for image, label in decoded)


def test_dead_decoding_thread_raises():
    class DeadThread:
        output_queue = queue.Queue()

        def is_alive(self):
            return False

    with pytest.raises(RuntimeError, match="decoding thread died"):
        _wait_for_batch(DeadThread())


def test_missing_beton_is_one_clear_error(tmp_path):
    for make in (multicrop_loader, eval_loader):
        with pytest.raises(DataError, match="nope.beton: no such .beton file.*fastdino data convert"):
            make(tmp_path / "nope.beton", 4)


# ---------------------------------------------------------------- sample data

def test_digits_folders(tmp_path):
    train, val = write_digits_folders(tmp_path, size=16, val_fraction=0.25, seed=0)
    train_files, val_files = sorted(train.rglob("*.png")), sorted(val.rglob("*.png"))
    assert len(train_files) + len(val_files) == 1797 and len(val_files) == 450
    assert sorted(p.name for p in train.iterdir()) == [str(d) for d in range(10)]
    assert not {p.name for p in train_files} & {p.name for p in val_files}
    for digit in range(10):  # stratified: every digit about 25% in val
        n_train, n_val = len(list((train / str(digit)).iterdir())), len(list((val / str(digit)).iterdir()))
        assert abs(n_val / (n_train + n_val) - 0.25) < 0.02
    with Image.open(train_files[0]) as image:
        assert (image.size, image.mode) == ((16, 16), "RGB") and image.getextrema()[0][1] > 128


# ---------------------------------------------------------------- random draws

def test_crop_boxes_torchvision_ranges():
    generator = torch.Generator().manual_seed(0)
    n = 20000
    heights = torch.randint(100, 400, (n,), generator=generator)
    widths = torch.randint(100, 400, (n,), generator=generator)
    scale, ratio = (0.05, 0.4), (3 / 4, 4 / 3)
    top, left, h, w = rc.sample_crop_boxes(heights, widths, scale, ratio, generator).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    # w and h are rounded sides of a box whose area and ratio are in range
    h, w, image_area = h.double(), w.double(), (heights * widths).double()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * image_area).all()
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * image_area).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
    area = h * w / image_area
    assert abs(area.mean().item() - sum(scale) / 2) < 0.01  # area fractions are uniform in the range
    assert abs(((top + 0.5) / (heights - h + 1)).mean().item() - 0.5) < 0.01  # positions are uniform too
    # no box fits a 2 x 300 strip: the fallback is its central crop at the widest allowed ratio
    box = rc.sample_crop_boxes(torch.tensor([2]), torch.tensor([300]), scale, ratio, generator)
    assert box.tolist() == [[0, 148, 2, 3]]
    box = rc.sample_crop_boxes(torch.tensor([300]), torch.tensor([2]), (0.9, 1.0), ratio, generator)
    assert box.tolist() == [[148, 0, 3, 2]]


def test_view_draws_statistics():
    recipe = rc.ViewRecipe(n_local_crops=1)
    n = 20000
    sizes = torch.tensor([[64, 80]]).expand(n, 2)
    # global crop 1, global crop 2, a local crop: the official blur and solarize probabilities
    assert [(view.blur_p, view.solarize_p) for view in recipe.views] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]
    for view in recipe.views:
        blur_p, solarize_p = view.blur_p, view.solarize_p
        draws = rc.draw_view(sizes, view, recipe.augment, torch.Generator().manual_seed(1))
        for mask, p in ((draws.flip, 0.5), (draws.jitter, 0.8), (draws.grayscale, 0.2), (draws.blur, blur_p),
                        (draws.solarize, solarize_p)):
            assert abs(mask.float().mean().item() - p) < 0.015
        brightness, contrast, saturation, hue = draws.jitter_factors.unbind(1)
        for factor, low, high in ((brightness, 0.6, 1.4), (contrast, 0.6, 1.4), (saturation, 0.8, 1.2),
                                  (hue, -0.1, 0.1)):
            assert low <= factor.min() and factor.max() <= high
            assert abs(factor.mean().item() - (low + high) / 2) < 0.01
            assert factor.std().item() == pytest.approx((high - low) / 12 ** 0.5, rel=0.05)  # uniform
        assert (draws.jitter_order.sort(dim=1).values == torch.arange(4)).all()
        assert abs((draws.jitter_order[:, 0] == 2).float().mean().item() - 0.25) < 0.015
        assert 0.1 <= draws.blur_sigma.min() and draws.blur_sigma.max() <= 2.0


def test_recipe_settings_and_overrides():
    defaults = rc.augment_config(None)  # the config's data.augment defaults, with tuples
    assert defaults.ratio == pytest.approx((3 / 4, 4 / 3)) and defaults.blur_p == (1.0, 0.1, 0.5)
    config = OmegaConf.create({"flip_p": 0.0, "blur_p": [0.0, 0.0, 0.0]})
    assert rc.augment_config(config) == dataclasses.replace(defaults, flip_p=0.0, blur_p=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="unknown augment keys"):
        rc.augment_config({"flip": 0.5})
    recipe = rc.ViewRecipe(2, 64, 32, config)
    assert recipe.augment == rc.augment_config(config)
    assert [(view.size, view.scale, view.blur_p) for view in recipe.views] == [
        (64, defaults.global_scale, 0.0)] * 2 + [(32, defaults.local_scale, 0.0)] * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.n_local_crops = 3


# ---------------------------------------------------------------- pixel ops against PIL

@pytest.fixture(scope="module")
def chelsea():
    photo = PHOTOS["chelsea"][::2, ::2].copy()  # 150 x 226
    return Image.fromarray(photo), torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255


def as_uint8(x):
    return (x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy().astype(int)


def test_flip_grayscale_solarize_match_pil(chelsea):
    pil, x = chelsea
    assert (as_uint8(x.flip(-1)) == np.asarray(ImageOps.mirror(pil))).all()
    assert (as_uint8(px.grayscale(x).expand(-1, 3, -1, -1)) == np.asarray(pil.convert("L").convert("RGB"))).all()
    assert (as_uint8(px.solarize(x)) == np.asarray(ImageOps.solarize(pil, 128))).all()


def test_resized_crop_matches_pil(chelsea):
    pil, x = chelsea
    top, left, h, w = 20, 30, 100, 130
    ours = resize(x[..., top: top + h, left: left + w] * 255, (48, 48)).clamp(0, 255) / 255
    reference = np.asarray(pil.crop((left, top, left + w, top + h)).resize((48, 48), Image.Resampling.BICUBIC))
    assert np.abs(as_uint8(ours) - reference).max() <= 1


def test_blur_matches_pil_gaussian_blur(chelsea):
    pil, x = chelsea
    for sigma in (0.1, 0.7, 1.3, 2.0):
        ours = as_uint8(px.gaussian_blur(x, torch.tensor([sigma])))
        difference = np.abs(ours - np.asarray(pil.filter(ImageFilter.GaussianBlur(sigma))))
        assert difference.max() <= 3 and difference.mean() < 0.6, sigma  # PIL rounds after each pass
    both = px.gaussian_blur(torch.cat([x, x]), torch.tensor([0.3, 2.0]))  # one batch, two kernel widths
    assert torch.allclose(both[1:], px.gaussian_blur(x, torch.tensor([2.0])), atol=1e-5)


def test_color_jitter_matches_pil_and_colorsys(chelsea):
    pil, x = chelsea
    for op, enhancer in ((px.adjust_brightness, ImageEnhance.Brightness), (px.adjust_contrast, ImageEnhance.Contrast),
                         (px.adjust_saturation, ImageEnhance.Color)):
        for factor in (0.6, 1.3):
            ours = as_uint8(op(x, torch.tensor([factor])))
            assert np.abs(ours - np.asarray(enhancer(pil).enhance(factor))).max() <= 1
    pixels = np.random.default_rng(0).random((500, 3))
    for shift in (-0.1, 0.04, 0.5):
        reference = [colorsys.hsv_to_rgb((hsv[0] + shift) % 1, hsv[1], hsv[2])
                     for hsv in (colorsys.rgb_to_hsv(*p) for p in pixels)]
        ours = px.adjust_hue(torch.tensor(pixels.T[None, :, :, None], dtype=torch.float32), torch.tensor([shift]))
        assert np.allclose(ours[0, :, :, 0].numpy().T, reference, atol=1e-5)


def test_multicrop_views_and_determinism(decoded):
    images = [image for image, _ in decoded[:5]]
    max_h, max_w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    canvases = torch.zeros(5, max_h, max_w, 3, dtype=torch.uint8)
    for i, image in enumerate(images):
        canvases[i, : image.shape[0], : image.shape[1]] = torch.from_numpy(image)
    sizes = torch.tensor([image.shape[:2] for image in images])
    options = dict(n_local_crops=4, global_size=40, local_size=24)
    views = mc.multicrop(canvases, sizes, torch.Generator().manual_seed(3), **options)
    assert [tuple(v.shape) for v in views] == [(5, 3, 40, 40)] * 2 + [(5, 3, 24, 24)] * 4
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    again = mc.multicrop(canvases.clone(), sizes, torch.Generator().manual_seed(3), **options)
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    half = mc.multicrop(canvases, sizes, torch.Generator().manual_seed(3), dtype=torch.bfloat16, **options)
    assert half[0].dtype == torch.bfloat16 and torch.allclose(half[0].float(), views[0], atol=0.05)
    # nothing random switched on: global crop 1 of the whole image is the normalised resize
    plain = rc.augment_config(dict(global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, color_jitter_p=0,
                                   grayscale_p=0, blur_p=(0, 0, 0)))
    square = canvases[2:3, :50, :50].contiguous()  # image 2 of the file order is 50 x 50
    view = mc.multicrop(square, torch.tensor([[50, 50]]), torch.Generator(), n_local_crops=0, global_size=50,
                        augment=plain)[0]
    mean, std = torch.tensor(plain.mean).view(1, 3, 1, 1), torch.tensor(plain.std).view(1, 3, 1, 1)
    assert torch.allclose(view * std + mean, square.permute(0, 3, 1, 2) / 255, atol=1e-5)


# ---------------------------------------------------------------- loaders

def test_loader_shapes_and_labels(train_loader, decoded):
    assert train_loader.num_images == 18 and len(train_loader) == 4
    labels = torch.tensor([label for _, label in decoded])
    batches = list(train_loader)
    assert len(batches) == 4
    order = torch.from_numpy(epoch_order(18, 4, seed=7, epoch=0, rank=0, world_size=1))
    for b, (crops, batch_labels) in enumerate(batches):
        assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
        assert all(c.dtype == torch.float32 for c in crops)
        assert batch_labels.dtype == torch.long
        assert torch.equal(batch_labels, labels[order[4 * b: 4 * b + 4]])


def test_loader_determinism_and_resume(train_loader, converted):
    epoch0 = list(train_loader.iter_epoch(0))
    same = list(multicrop_loader(converted[0], 4, n_local_crops=3, global_size=32, local_size=16, seed=7))
    for (crops, labels), (crops2, labels2) in zip(epoch0, same):
        assert torch.equal(labels, labels2) and all(torch.equal(a, b) for a, b in zip(crops, crops2))
    epoch1 = list(train_loader.iter_epoch(1))
    assert not torch.equal(epoch0[0][0][0], epoch1[0][0][0])
    resumed = list(train_loader.iter_epoch(1, start_batch=2))
    assert len(resumed) == 2
    for (crops, labels), (crops2, labels2) in zip(epoch1[2:], resumed):
        assert torch.equal(labels, labels2) and all(torch.equal(a, b) for a, b in zip(crops, crops2))
    train_loader.set_epoch(1)
    assert torch.equal(next(iter(train_loader))[0][0], epoch1[0][0][0])
    train_loader.set_epoch(0)


def test_rank_shards_are_disjoint_and_cover():
    for num_images, drop_last in ((103, False), (103, True), (96, True)):
        shards = [epoch_order(num_images, 8, seed=0, epoch=3, rank=r, world_size=2, drop_last=drop_last)
                  for r in range(2)]
        assert len(shards[0]) == len(shards[1])
        if drop_last:
            assert not set(shards[0]) & set(shards[1])
            assert len(shards[0]) % 8 == 0 and num_images - 2 * len(shards[0]) < 16
        else:  # wraps around like DistributedSampler: one image seen twice
            assert set(shards[0]) | set(shards[1]) == set(range(num_images))
            assert len(shards[0]) + len(shards[1]) == num_images + 1
    assert not np.array_equal(epoch_order(50, 5, seed=0, epoch=0, rank=0, world_size=1),
                              epoch_order(50, 5, seed=0, epoch=1, rank=0, world_size=1))
    assert seeded_generator(0, 1, 2, 3).initial_seed() != seeded_generator(0, 1, 2, 4).initial_seed()


def test_loader_rank_shard(converted, decoded):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = multicrop_loader(converted[0], 2, n_local_crops=0, global_size=16, seed=7, rank=1, world_size=2,
                                  num_workers=2)
        assert len(loader) == 4
        labels = torch.tensor([label for _, label in decoded])
        order = torch.from_numpy(epoch_order(18, 2, seed=7, epoch=0, rank=1, world_size=2))
        seen = torch.cat([batch_labels for crops, batch_labels in loader])
        assert len(next(iter(loader))[0]) == 2 and torch.equal(seen, labels[order])
        assert torch.get_num_threads() == 1  # FFCV's num_workers did not leak into torch
    finally:
        torch.set_num_threads(threads)


def test_quasi_random_order():
    pages = np.repeat(np.arange(40), 10)  # 400 images, 10 per storage page
    shards = [epoch_order(400, 8, seed=0, epoch=2, rank=r, world_size=2, pages=pages) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 200 and sorted(np.concatenate(shards)) == list(range(400))
    for shard in shards:
        assert len(set(pages[shard])) <= 24  # a rank reads about half the pages (its page groups)
        for start in range(0, 200, 80):  # images mix only within groups of 8 pages...
            assert len(set(pages[shard[start: start + 80]])) <= 16
        assert not np.array_equal(shard, np.sort(shard))  # ...but in random order within them
    again = epoch_order(400, 8, seed=0, epoch=2, rank=0, world_size=2, pages=pages)
    other_epoch = epoch_order(400, 8, seed=0, epoch=3, rank=0, world_size=2, pages=pages)
    assert np.array_equal(again, shards[0]) and not np.array_equal(other_epoch, shards[0])
    dropped = epoch_order(403, 8, seed=0, epoch=0, rank=1, world_size=2, pages=np.repeat(np.arange(31), 13))
    assert len(dropped) == 200


LOADER_OPTIONS = dict(n_local_crops=2, global_size=24, local_size=16, seed=3)
PROCESS_CACHE_EPOCH = """
import sys, torch
from fastdino.data import multicrop_loader
loader = multicrop_loader(sys.argv[1], 4, os_cache=False, batches_ahead=1, **{options})
torch.save(list(loader.iter_epoch(0)), sys.argv[2])
"""


def test_loader_options_keep_the_batches(converted, tmp_path):
    def epoch(**options):
        return list(multicrop_loader(converted[0], 4, **LOADER_OPTIONS, **options).iter_epoch(0))

    def same(batches, other):
        return len(batches) == len(other) and all(
            torch.equal(labels, labels2) and all(torch.equal(a, b) for a, b in zip(crops, crops2))
            for (crops, labels), (crops2, labels2) in zip(batches, other))

    reference = epoch()
    # one decode thread and one batch in flight change the timing, not the batches
    assert same(reference, epoch(num_workers=1, batches_ahead=1))
    # FFCV's own page reader instead of the OS page cache: in a process of its own, since FFCV's two
    # memory managers retype a shared numba array type, and a process that built both can hang
    script = PROCESS_CACHE_EPOCH.format(options=LOADER_OPTIONS)
    subprocess.run([sys.executable, "-c", script, str(converted[0]), str(tmp_path / "epoch.pt")], check=True,
                   timeout=300)
    assert same(reference, torch.load(tmp_path / "epoch.pt"))
    # the torch twin of the OpenCV path: same images, same choices, pixels within uint8 rounding
    for (crops, labels), (crops2, labels2) in zip(reference, epoch(crops="torch")):
        assert torch.equal(labels, labels2)
        assert all((a - b).abs().mean() < 0.03 for a, b in zip(crops, crops2))
    quasi = multicrop_loader(converted[0], 4, n_local_crops=0, global_size=16, order="quasi_random", drop_last=False)
    assert sorted(torch.cat([labels for _, labels in quasi]).tolist()) == sorted(quasi.images.labels.tolist())
    with pytest.raises(ValueError, match="order must be one of"):
        multicrop_loader(converted[0], 4, order="sequential")


def test_eval_loader(converted, decoded):
    loader = eval_loader(converted[0], 5, size=32, rank=1, world_size=2)
    assert len(loader) == 2  # rank 1 reads images 9..17: batches of 5 and 4
    batches = list(loader)
    assert [tuple(images.shape) for images, _ in batches] == [(5, 3, 32, 32), (4, 3, 32, 32)]
    assert torch.cat([labels for _, labels in batches]).tolist() == [label for _, label in decoded[9:]]
    # torchvision's Resize(36) + CenterCrop(32) in PIL, on the decoded pixels
    image = Image.fromarray(decoded[10][0])  # 45 x 80 (h x w) -> 36 x 64 -> 32 x 32 at (2, 16)
    reference = np.asarray(image.resize((64, 36), Image.Resampling.BICUBIC).crop((16, 2, 48, 34)))
    mean, std = torch.tensor(px.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(px.IMAGENET_STD).view(3, 1, 1)
    difference = np.abs(as_uint8((batches[0][0][1] * std + mean)[None]) - reference)
    assert difference.max() <= 2 and difference.mean() < 0.3
