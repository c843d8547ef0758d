"""What users hand the commands: every checkpoint kind through one reader, data mistakes as one
clear line, and 16/32-bit images read as `data convert` reads them."""
import argparse
import re
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fastdino.cli import main
from fastdino.config import load_config
from fastdino.data import DataError, convert_folder, eval_loader, multicrop_loader
from fastdino.data.convert import load_rgb
from fastdino.data.decode import check_beton
from fastdino.eval.draw import load_image
from fastdino.eval.export import ARCH_BY_WIDTH, export_weights, read_backbone
from fastdino.ssl import build_student_teacher
from fastdino.train.checkpoint import SHARDED_PAYLOAD, CheckpointError, load_checkpoint, save_checkpoint

TINY_MODEL = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=4", "model.img_size=16", "model.out_dim=64",
              "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "eval.eval_size=16", "data.path=unused"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fastdino: error: ") and "\x1b" not in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with checkpoints at steps 3 and 7 (different weights; student != teacher)."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL)
    nets = build_student_teacher(cfg.model)
    run = tmp_path_factory.mktemp("run")
    for step in (3, 7):
        with torch.no_grad():
            for param in nets.student.parameters():
                param.add_(0.05 * torch.randn_like(param))
        payload = {"student": nets.student.state_dict(), "teacher": nets.teacher.state_dict(), "dino_loss": {},
                   "optimizer": {}, "config": OmegaConf.to_yaml(cfg)}
        save_checkpoint(run / "checkpoints", step, payload, keep=2)
        nets.teacher.load_state_dict(nets.student.state_dict())
    return run


@pytest.fixture(scope="module")
def every_kind(run_dir, tmp_path_factory):
    """{kind: path} of every checkpoint kind the reader takes, all holding step 7's teacher backbone."""
    root = tmp_path_factory.mktemp("kinds")
    step_file = run_dir / "checkpoints" / "step_00000007.pt"
    step_folder = root / "deepspeed" / "checkpoints" / "step_00000007"
    step_folder.mkdir(parents=True)
    shutil.copy(step_file, step_folder / SHARDED_PAYLOAD)
    state = torch.load(step_file, weights_only=True)
    torch.save({"student": {f"module.{k}": v for k, v in state["student"].items()}, "teacher": state["teacher"],
                "optimizer": {}, "epoch": 3, "args": argparse.Namespace(arch="vit_tiny", patch_size=4)},
               root / "official_full.pth")
    kinds = {"step file": step_file, "run folder": run_dir, "deepspeed step folder": step_folder,
             "deepspeed run folder": root / "deepspeed", "official full": root / "official_full.pth"}
    for fmt in ("official", "timm", "safetensors"):
        kinds[f"export {fmt}"] = root / f"export.{fmt}"
        export_weights(step_file, kinds[f"export {fmt}"], fmt)
    for fmt in ("official", "safetensors"):
        kinds[f"export {fmt} with head"] = root / f"export_head.{fmt}"
        export_weights(step_file, kinds[f"export {fmt} with head"], fmt, with_head=True)
    return kinds


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- one checkpoint reader

def test_every_kind_gives_the_same_backbone(every_kind, images):
    expected, weights = read_backbone(every_kind["step file"])
    assert weights.config.model.arch == "vit_tiny"
    with torch.no_grad():
        reference = expected(images)
        for kind, path in every_kind.items():
            backbone, weights = read_backbone(path)
            assert torch.equal(backbone(images), reference), kind
            assert (weights.config is not None) == (kind in ("step file", "run folder") or "deepspeed" in kind), kind


def test_run_folder_reads_its_newest_checkpoint_and_says_so(run_dir, caplog):
    with caplog.at_level("INFO", logger="fastdino.train.checkpoint"):
        _, weights = read_backbone(run_dir)
    assert weights.step == 7 and weights.source == run_dir / "checkpoints" / "step_00000007.pt"
    assert "newest checkpoint, step_00000007.pt" in caplog.text
    assert read_backbone(run_dir / "checkpoints")[1].step == 7


def test_official_full_checkpoint_student_and_teacher(every_kind, images):
    with torch.no_grad():
        for which in ("teacher", "student"):
            expected = read_backbone(every_kind["step file"], which)[0](images)
            assert torch.equal(read_backbone(every_kind["official full"], which)[0](images), expected)


def test_arch_width_table_matches_the_factories():
    from fastdino import models

    for width, arch in ARCH_BY_WIDTH.items():
        assert getattr(models, arch)(depth=1).embed_dim == width


def test_viz_attention_reads_every_kind(every_kind, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image)
    for kind, path in every_kind.items():
        out = tmp_path / kind.replace(" ", "_")
        assert main(["viz", "attention", str(path), str(image), "--out", str(out), "--size", "16"]) == 0, kind
        captured = capsys.readouterr()
        assert captured.out.strip() == str(out / "attention_photo.png")
        assert (out / "attention_photo.png").read_bytes().startswith(b"\x89PNG")
        assert ("reading" in captured.err) == path.is_dir(), kind


def test_eval_commands_read_run_folders_and_official_checkpoints(every_kind, digits_betons, tmp_path, capsys):
    train, val = digits_betons
    assert main(["eval", "knn", str(every_kind["run folder"]), "--train", str(train), "--val", str(val),
                 "--k", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "teacher k-NN k=5" in captured.out and "step_00000007.pt" in captured.err
    assert main(["eval", "linear", str(every_kind["official full"]), "--train", str(train), "--val", str(val),
                 "--epochs", "1", "--device", "cpu"]) == 0
    assert "linear probe" in capsys.readouterr().out
    out = tmp_path / "from_run.safetensors"
    assert main(["export", str(every_kind["run folder"]), "--format", "safetensors", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "of step 7" in captured.out and "step_00000007.pt" in captured.err


def test_unsafe_pickles_are_refused_in_one_line(every_kind, tmp_path, capsys):
    state = torch.load(every_kind["step file"], weights_only=True)
    path = tmp_path / "numpy_inside.pth"
    torch.save({"teacher": state["teacher"], "args": argparse.Namespace(lr=np.float64(0.1))}, path)
    with pytest.raises(CheckpointError, match=r"pickles a numpy\S*scalar object.*plain state_dict"):
        read_backbone(path)
    assert main(["viz", "attention", str(path), str(path), "--out", str(tmp_path)]) == 1
    assert "pickles a numpy" in one_line_error(capsys)
    # --resume reads the official checkpoint safely too, then says what it is not
    with pytest.raises(CheckpointError, match="not a fastdino v1 training checkpoint"):
        load_checkpoint(every_kind["official full"])


def test_folders_without_checkpoints_are_one_line(tmp_path, capsys):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    for folder in (tmp_path / "empty_run", tmp_path / "empty_run" / "checkpoints"):
        with pytest.raises(CheckpointError, match="is a folder without a checkpoint"):
            read_backbone(folder)
    assert main(["export", str(tmp_path / "empty_run"), "--format", "official", "--out", str(tmp_path / "x")]) == 1
    assert "without a checkpoint" in one_line_error(capsys)


# ---------------------------------------------------------------- data mistakes

@pytest.fixture(scope="module")
def unlabelled_beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(root / f"{i}.png")
    out = root.parent / "flat.beton"
    convert_folder(root, out, max_resolution=16, num_workers=1, progress=False)
    return out


def test_data_mistakes_in_eval_knn_are_one_line(run_dir, digits_betons, unlabelled_beton, tmp_path, capsys):
    train, val = digits_betons
    step_file = run_dir / "checkpoints" / "step_00000007.pt"
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg)
    text = tmp_path / "notes.beton"
    text.write_text("not a beton\n")
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(val.read_bytes()[:-3000])
    cases = {unlabelled_beton: "--train=.* has 4 of 4 images without a label.*one sub-folder per class",
             train.parent: "is a folder, not a .beton file: convert it first with `fastdino data convert",
             tmp_path / "absent.beton": "no such .beton file .*fastdino data convert",
             jpeg: "is a JPEG image, not a .beton file",
             text: "is not an FFCV .beton file",
             truncated: "is truncated .*convert it again"}
    for bad, message in cases.items():
        assert main(["eval", "knn", str(step_file), "--train", str(bad), "--val", str(val), "--device", "cpu"]) == 1
        assert re.search(message, one_line_error(capsys)), bad
    assert main(["eval", "linear", str(step_file), "--train", str(train), "--val", str(unlabelled_beton)]) == 1
    assert "--val=" in one_line_error(capsys)


def test_check_beton_for_the_trainer(digits_betons, unlabelled_beton):
    train, _ = digits_betons
    check_beton(train, source="data.path")
    check_beton(unlabelled_beton, source="data.path")  # training needs no labels
    with pytest.raises(DataError, match=r"^data.path is empty: give a .beton file"):
        check_beton("", source="data.path")
    with pytest.raises(DataError, match="without a label"):
        check_beton(unlabelled_beton, need_labels=True)
    for make in (multicrop_loader, eval_loader):
        with pytest.raises(DataError, match="is a folder, not a .beton file"):
            make(train.parent, 4)


def test_knn_refuses_unlabelled_features():
    from fastdino.eval.knn import knn_classify

    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match="k-NN needs labelled images"):
        knn_classify(features, torch.tensor([0, 1, -1, 1]), features, torch.tensor([0, 1, 0, 1]), k=2)


# ---------------------------------------------------------------- one image reader

def wide_images(folder):
    """{file: mode} of one 8-bit gradient saved with wider samples, and the 8-bit grey it stands for."""
    grey = (np.arange(20 * 24).reshape(20, 24) % 256).astype(np.uint8)
    wide = {"sixteen.png": grey.astype(np.uint16) * 257,  # PIL mode I;16
            "sixteen_as_int32.tif": grey.astype(np.int32) * 257,  # mode I, 16-bit values
            "int32.tif": (grey.astype(np.int64) * (2**31 - 1) // 255).astype(np.int32),  # mode I, full range
            "float.tif": grey.astype(np.float32) / 255}  # mode F in [0, 1]
    modes = {}
    for name, array in wide.items():
        Image.fromarray(array).save(folder / name)
        with Image.open(folder / name) as image:
            modes[name] = image.mode
    return modes, np.dstack([grey] * 3)


def test_wide_images_scale_to_8_bits_in_convert_and_viz(tmp_path):
    modes, expected = wide_images(tmp_path)
    assert set(modes.values()) == {"I;16", "I", "F"}
    for name in modes:
        for pixels in (load_rgb(tmp_path / name), load_image(tmp_path / name)):
            assert pixels.dtype == np.uint8 and np.abs(pixels.astype(int) - expected).max() <= 1, name


def test_viz_attention_on_a_16_bit_image(every_kind, tmp_path, monkeypatch):
    from fastdino.eval import draw

    wide_images(tmp_path)
    seen = []
    draw_attention = draw.draw_attention
    monkeypatch.setattr(draw, "draw_attention", lambda backbone, patch_size, image, *args, **kwargs: (
        seen.append(image), draw_attention(backbone, patch_size, image, *args, **kwargs))[1])
    assert main(["viz", "attention", str(every_kind["step file"]), str(tmp_path / "sixteen.png"),
                 "--out", str(tmp_path / "out"), "--size", "16"]) == 0
    assert (seen[0] < 255).mean() > 0.9  # not the white picture of a clipping convert("RGB")


def test_photo_library_albums_and_loose_photos(tmp_path, capsys):
    """Sub-folders read as classes drop the photos beside them, and the summary says how to keep
    them; --labels none keeps every photo, unlabelled."""
    library = tmp_path / "photos"
    for i, folder in enumerate([library, library / "2023", library / "2024"]):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(folder / "IMG_0001.png")
    assert main(["data", "convert", str(library), str(tmp_path / "albums.beton"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 images in 2 classes" in out and "1 of them lie outside the class folders: --labels none" in out
    assert main(["data", "convert", str(library), str(tmp_path / "all.beton"), "--workers", "1",
                 "--labels", "none"]) == 0
    assert "wrote 3 images to" in capsys.readouterr().out
    labels = torch.cat([batch_labels for _, batch_labels in eval_loader(tmp_path / "all.beton", 8, size=16)])
    assert labels.tolist() == [-1, -1, -1]


def test_viz_attention_keeps_same_named_photos_apart(every_kind, tmp_path, capsys):
    photos = []
    for album in ("2023", "2024"):
        (tmp_path / album).mkdir()
        photos.append(tmp_path / album / "IMG_0001.png")
        Image.fromarray(np.random.default_rng(len(photos)).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(photos[-1])
    out = tmp_path / "pictures"
    assert main(["viz", "attention", str(every_kind["step file"]), *map(str, photos), "--out", str(out),
                 "--size", "16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention_2023_IMG_0001.png", "attention_2024_IMG_0001.png"]
    capsys.readouterr()
    # a missing photo is named before anything is drawn
    assert main(["viz", "attention", str(every_kind["step file"]), str(photos[0]), str(tmp_path / "gone.png"),
                 "--out", str(tmp_path / "none"), "--size", "16"]) == 1
    assert "image not found" in one_line_error(capsys) and not (tmp_path / "none").exists()


def test_student_only_where_the_file_holds_one(every_kind):
    """--which student on an export or released weights would relabel the one network they hold."""
    paired = {"step file", "run folder", "deepspeed step folder", "deepspeed run folder", "official full"}
    for kind, path in every_kind.items():
        if kind in paired:
            read_backbone(path, "student")
        else:
            with pytest.raises(CheckpointError, match="holds one network's weights|has no 'student' entry"):
                read_backbone(path, "student")


def test_viz_attention_sizes_and_folders_are_one_line(every_kind, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    for size in ("4", "100000"):  # patch 4: at least 8 px
        assert main(["viz", "attention", str(every_kind["step file"]), str(image), "--size", size,
                     "--out", str(tmp_path / "out")]) == 1
        assert f"--size {size}: give 8 to" in one_line_error(capsys)
    assert main(["viz", "attention", str(every_kind["step file"]), str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "is a folder" in one_line_error(capsys)
