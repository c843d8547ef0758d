"""`fastdino data scenes`: complete layouts, exact masks, determinism, the command line."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter

from fastdino.data.scenes import CLASSES, make_retrieval_set, make_scene, make_video, write_scenes

SMALL = dict(count=6, size=64, videos=2, frames=4, video_size=(64, 48), instances=3, seed=1, progress=False)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "out"
    write_scenes(root, **SMALL)
    return root


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _check_exact(scene) -> None:
    """Each pixel holds the colour of what its label names: the background where 0, else the
    topmost object covering it (whose label must be the pixel's)."""
    top = np.full(scene.labels.shape, -1)
    for j, item in enumerate(scene.objects):
        h, w = item.mask.shape
        top[item.top:item.top + h, item.left:item.left + w][item.mask] = j
    assert np.array_equal(scene.labels == 0, top == -1)
    assert np.array_equal(scene.image[top == -1], scene.background[top == -1])
    for j, item in enumerate(scene.objects):
        h, w = item.mask.shape
        mine = top[item.top:item.top + h, item.left:item.left + w] == j
        assert np.all(scene.labels[item.top:item.top + h, item.left:item.left + w][mine] == item.label)
        assert np.array_equal(scene.image[item.top:item.top + h, item.left:item.left + w][mine], item.pixels[mine])


def test_voc_layout_is_complete(out):
    voc = out / "voc"
    splits = {name: (voc / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()
              for name in ("train", "val")}
    assert len(splits["train"]) == 4 and len(splits["val"]) == 2 and not set(splits["train"]) & set(splits["val"])
    ids = splits["train"] + splits["val"]
    assert sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg")) == sorted(ids)
    assert sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png")) == sorted(ids)
    assert (voc / "labels.txt").read_text().split() == ["background", *CLASSES]
    for scene_id in ids:
        image = Image.open(voc / "JPEGImages" / f"{scene_id}.jpg")
        mask = Image.open(voc / "SegmentationClass" / f"{scene_id}.png")
        assert image.mode == "RGB" and mask.mode == "P" and image.size == mask.size == (64, 64)
        assert set(np.unique(np.asarray(mask))) <= set(range(len(CLASSES) + 1)) | {255}
        palette = mask.getpalette()  # the VOC colours: 1 dark red, 2 green, 15 person pink, 255 void cream
        assert palette[3:6] == [128, 0, 0] and palette[6:9] == [0, 128, 0] and palette[45:48] == [192, 128, 128]
        assert palette[765:768] == [224, 224, 192]


def test_pairs_are_the_voc_scenes_without_the_ignore_band(out):
    names = sorted(p.stem for p in (out / "pairs" / "images").glob("*.png"))
    assert names == sorted(p.stem for p in (out / "pairs" / "masks").glob("*.png"))
    for split in ("train", "val"):
        ids = (out / "voc" / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert (out / "pairs" / f"{split}.txt").read_text().split() == ids
    assert names[:4] == (out / "pairs" / "train.txt").read_text().split()
    for name in names:
        image = _read(out / "pairs" / "images" / f"{name}.png")
        mask = Image.open(out / "pairs" / "masks" / f"{name}.png")
        assert mask.mode == "P" and image.shape[:2] == mask.size[::-1]
        labels = np.asarray(mask)
        assert set(np.unique(labels)) <= set(range(len(CLASSES) + 1)) and labels.any()
        voc_labels = _read(out / "voc" / "SegmentationClass" / f"{name}.png")
        ignored = voc_labels == 255
        assert np.array_equal(voc_labels[~ignored], labels[~ignored])
        # VOC's band: every label change is ignored, and nothing farther than 2 px from one is.
        changes = (maximum_filter(labels, size=3, mode="nearest") != minimum_filter(labels, size=3, mode="nearest"))
        near_change = maximum_filter(labels, size=5, mode="nearest") != minimum_filter(labels, size=5, mode="nearest")
        inner_change = np.zeros_like(changes)
        inner_change[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        inner_change[:, :-1] |= labels[:, 1:] != labels[:, :-1]
        inner_change[1:] |= labels[1:] != labels[:-1]
        inner_change[:-1] |= labels[1:] != labels[:-1]
        assert np.all(ignored[inner_change]) and not np.any(ignored & ~near_change) and changes.any()
        jpeg = _read(out / "voc" / "JPEGImages" / f"{name}.jpg").astype(int)
        assert np.abs(jpeg - image).mean() < 4


def test_scene_masks_are_exact(out):
    for i in range(SMALL["count"]):
        scene = make_scene(SMALL["seed"], i, SMALL["size"])
        _check_exact(scene)
        assert np.array_equal(_read(out / "pairs" / "images" / f"scene_{i:04d}.png"), scene.image)
        assert np.array_equal(_read(out / "pairs" / "masks" / f"scene_{i:04d}.png"), scene.labels)
    # The check above notices a mask one pixel off.
    shifted = make_scene(SMALL["seed"], 0, SMALL["size"])
    shifted.labels = np.roll(shifted.labels, 1, axis=1)
    with pytest.raises(AssertionError):
        _check_exact(shifted)


def test_class_fills_have_their_colours(tmp_path):
    """Labels name the fill: over many scenes, brick pixels are red, grass green, gravel blue."""
    sums = {label: np.zeros(3) for label in (1, 2, 3)}
    for i in range(40):
        scene = make_scene(7, i, 48)
        for label in sums:
            sums[label] += scene.image[scene.labels == label].astype(float).sum(0)
    assert all(sums[label].sum() > 0 for label in sums)
    assert np.argmax(sums[1]) == 0 and np.argmax(sums[2]) == 1 and np.argmax(sums[3]) == 2


def test_davis_layout_and_exact_annotations(out):
    davis = out / "davis"
    videos = (davis / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert len(videos) == SMALL["videos"]
    for v, video in enumerate(videos):
        frames = sorted((davis / "JPEGImages" / "480p" / video).glob("*.jpg"))
        annotations = sorted((davis / "Annotations" / "480p" / video).glob("*.png"))
        assert [p.stem for p in frames] == [p.stem for p in annotations] == [f"{t:05d}" for t in range(4)]
        scenes = make_video(SMALL["seed"], v, *SMALL["video_size"], SMALL["frames"])
        first = np.asarray(Image.open(annotations[0]))
        n_objects = int(first.max())
        assert n_objects == (2 if v % 2 == 0 else 1) and set(np.unique(first)) == set(range(n_objects + 1))
        for frame, annotation, scene in zip(frames, annotations, scenes):
            image, mask = Image.open(frame), Image.open(annotation)
            assert image.size == mask.size == SMALL["video_size"] and mask.mode == "P"
            assert mask.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]
            assert np.array_equal(np.asarray(mask), scene.labels)
            assert np.abs(np.asarray(image).astype(int) - scene.image).mean() < 6
            _check_exact(scene)
        assert not np.array_equal(scenes[0].labels, scenes[-1].labels)  # the objects move


def test_oxford_ground_truth(out):
    oxford = out / "oxford"
    with open(oxford / "gnd_synth.pkl", "rb") as file:
        cfg = pickle.load(file)
    assert set(cfg) == {"imlist", "qimlist", "gnd"} and len(cfg["gnd"]) == len(cfg["qimlist"]) == 3 * 2
    assert not set(cfg["imlist"]) & set(cfg["qimlist"])
    assert sorted(p.stem for p in (oxford / "jpg").glob("*.jpg")) == sorted(cfg["imlist"] + cfg["qimlist"])
    for query, entry in zip(cfg["qimlist"], cfg["gnd"]):
        instance = query.removeprefix("query_").rsplit("_", 1)[0]
        x1, y1, x2, y2 = entry["bbx"]
        width, height = Image.open(oxford / "jpg" / f"{query}.jpg").size
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        lists = [entry["easy"], entry["hard"], entry["junk"]]
        flat = [i for kind in lists for i in kind]
        assert all(isinstance(i, int) and 0 <= i < len(cfg["imlist"]) for i in flat) and len(set(flat)) == len(flat)
        assert entry["easy"] or entry["hard"]
        # Exactly this instance's database images, no distractor and no other instance.
        mine = sorted(name for name in cfg["imlist"] if name.startswith(f"{instance}_"))
        assert sorted(cfg["imlist"][i] for i in flat) == mine


def test_query_box_holds_the_instance(out):
    import skimage.data

    retrieval = make_retrieval_set(SMALL["seed"], SMALL["size"], SMALL["instances"])
    for query, entry in zip(retrieval.qimlist, retrieval.gnd):
        x1, y1, x2, y2 = (int(v) for v in entry["bbx"])
        assert np.array_equal(retrieval.queries[query][y1:y2, x1:x2], retrieval.query_pixels[query])
        photo = Image.fromarray(getattr(skimage.data, retrieval.query_instance[query])())
        expected = np.asarray(photo.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.BILINEAR)).astype(int)
        on_disk = Image.open(out / "oxford" / "jpg" / f"{query}.jpg").crop(entry["bbx"])
        assert np.abs(np.asarray(on_disk).astype(int) - expected).mean() < 8


def test_instance_folders(out):
    with open(out / "oxford" / "gnd_synth.pkl", "rb") as file:
        cfg = pickle.load(file)
    folders = sorted(p for p in (out / "instances").iterdir())
    assert [p.name for p in folders] == sorted({n.rsplit("_", 1)[0] for n in cfg["imlist"]} - {"distractor"})
    for folder in folders:
        images = sorted(folder.glob("*.jpg"))
        assert len(images) >= 2
        for image in images:
            assert image.read_bytes() == (out / "oxford" / "jpg" / image.name).read_bytes()
        positives = {cfg["imlist"][i] for q, entry in zip(cfg["qimlist"], cfg["gnd"])
                     if q.startswith(f"query_{folder.name}_") for i in entry["easy"] + entry["hard"]}
        assert {p.stem for p in images} == positives


def test_deterministic_for_a_seed(out, tmp_path):
    write_scenes(tmp_path / "same", **SMALL)
    assert _files(tmp_path / "same") == _files(out)
    write_scenes(tmp_path / "other", **{**SMALL, "seed": 2, "count": 3})
    other = _files(tmp_path / "other")
    assert other["pairs/images/scene_0000.png"] != _files(out)["pairs/images/scene_0000.png"]
    # Scene i does not depend on --count.
    assert np.array_equal(make_scene(2, 1, 64).image, _read(tmp_path / "other" / "pairs" / "images" / "scene_0001.png"))


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "fastdino", "data", "scenes", "OUT", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: fastdino data scenes" in result.stdout and "--overwrite" in result.stdout


def test_cli_writes_refuses_and_overwrites(tmp_path, capsys):
    from fastdino.cli import main

    target = tmp_path / "out"
    argv = ["data", "scenes", str(target), "--count", "2", "--size", "48", "--videos", "1", "--frames", "2",
            "--video-size", "48x32", "--instances", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith(str(target / "voc"))
    assert (target / "README.txt").is_file()

    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not empty" in error[0] and "--overwrite" in error[0]

    (target / "notes.txt").write_text("mine")
    (target / "voc" / "stray.txt").write_text("old")
    assert main(argv + ["--overwrite"]) == 0
    assert (target / "notes.txt").read_text() == "mine" and not (target / "voc" / "stray.txt").exists()

    assert main(argv[:3] + ["--instances", "1"]) == 1
    assert "--instances must be between 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--video-size", "48"])
