"""`fastdino eval retrieval`: revisitop's AP and mP@k against hand-computed values and a plain
per-query implementation, the Easy/Medium/Hard sets, ties, the image preparation and batching,
and the command end to end on tiny revisited and instance-folder data sets."""
import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score

from fastdino import cli
from fastdino.data.images import load_rgb
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.eval.retrieval import (MULTISCALE, RetrievalImages, crop_box, embed_batch, embed_images,
                                     evaluate_instances, evaluate_revisited, protocol_ground_truth, rank_database,
                                     ranked_metrics, read_retrieval_set, shrink_to_fit, summarise)
from fastdino.models import vit_tiny

KS = (1, 5, 10)


def masks(ranking, positives, junk=()):
    """ranked_metrics' [1, N] masks of one ranked list of database ids."""
    return (np.array([[i in set(positives) for i in ranking]]), np.array([[i in set(junk) for i in ranking]]))


def plain_revisitop(ranking, positives, junk, ks=KS):
    """revisitop's AP and mP@k for one query, written out: junk dropped from the list, then each
    positive's trapezoid between precision j/r (1 at r = 0) and (j+1)/(r+1); the k of P@k is cut
    to the 1-based rank of the last positive."""
    kept = [i for i in ranking if i not in junk]
    ranks = [r for r, i in enumerate(kept) if i in positives]
    ap = sum(((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 for j, r in enumerate(ranks)) / len(positives)
    last = ranks[-1] + 1
    precision = [sum(r + 1 <= min(last, k) for r in ranks) / min(last, k) for k in ks]
    return ap, precision


# ---------------------------------------------------------------------------------------------- AP by hand


def test_one_positive_first_has_ap_one():
    metrics = ranked_metrics(*masks([4, 0, 1, 2], positives=[4]), KS)
    assert metrics["ap"][0] == 1.0
    assert metrics["revisited_precision"][0].tolist() == [1.0, 1.0, 1.0]  # k cut to the last positive's rank
    assert metrics["precision"][0].tolist() == [1.0, 1 / 4, 1 / 4]  # plain: k cut to the 4 images ranked


def test_positive_second_of_three_is_a_quarter_not_a_half():
    # revisitop: the trapezoid from precision 0/1 (before it) to 1/2 (at it) over recall 0..1: (0 + 1/2) / 2.
    metrics = ranked_metrics(*masks([7, 3, 5], positives=[3]), KS)
    assert metrics["ap"][0] == pytest.approx(0.25)
    # The non-interpolated AP (sklearn) is the precision at the positive: 1/2.
    assert average_precision_score([0, 1, 0], [3, 2, 1]) == pytest.approx(0.5)
    assert metrics["revisited_precision"][0].tolist() == [0.0, 0.5, 0.5]  # P@1 = 0; P@5, P@10 cut to k' = 2
    assert metrics["recall"][0].tolist() == [0.0, 1.0, 1.0]


def test_two_positives_by_hand():
    # Positives at ranks 0 and 2: (1 + 1)/2 / 2 + (1/2 + 2/3)/2 / 2 = 1/2 + 7/24.
    metrics = ranked_metrics(*masks([1, 9, 2, 8], positives=[1, 2]), KS)
    assert metrics["ap"][0] == pytest.approx(0.5 + 7 / 24)
    assert metrics["revisited_precision"][0].tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])


def test_positives_at_ranks_one_and_seven_precision_at_k():
    ranking = [0, 10, 11, 12, 13, 14, 1, 15, 16, 17, 18]
    metrics = ranked_metrics(*masks(ranking, positives=[0, 1]), KS)
    # k' = min(7, k): P@1 = 1, P@5 = 1/5, P@10 = 2/7 (revisitop) against plain 2/10.
    assert metrics["revisited_precision"][0].tolist() == pytest.approx([1.0, 1 / 5, 2 / 7])
    assert metrics["precision"][0].tolist() == pytest.approx([1.0, 1 / 5, 2 / 10])


def test_junk_is_taken_out_of_the_ranking():
    assert ranked_metrics(*masks([6, 3, 5], positives=[3], junk=[6]), KS)["ap"][0] == 1.0
    assert ranked_metrics(*masks([5, 6, 3], positives=[3], junk=[6]), KS)["ap"][0] == pytest.approx(0.25)
    # Junk below the last positive changes nothing; the plain precision counts only the images ranked.
    metrics = ranked_metrics(*masks([3, 5, 6], positives=[3], junk=[6]), KS)
    assert metrics["ap"][0] == 1.0
    assert metrics["precision"][0].tolist() == pytest.approx([1.0, 1 / 2, 1 / 2])


def test_query_without_positives_is_skipped_and_counted():
    positive = np.array([[True, False, False], [False, False, False]])
    metrics = ranked_metrics(positive, np.zeros_like(positive), KS)
    assert metrics["ap"][0] == 1.0 and np.isnan(metrics["ap"][1])
    assert np.isnan(metrics["revisited_precision"][1]).all()
    summary = summarise(metrics, KS, revisited=True)
    assert summary["mAP"] == 100.0 and summary["mP@1"] == 100.0
    assert summary["queries"] == 1 and summary["queries_without_positives"] == 1
    none = summarise(ranked_metrics(positive[1:], positive[1:], KS), KS, revisited=False)
    assert none["mAP"] is None and none["R@1"] is None and none["queries_without_positives"] == 1


def test_ties_keep_database_order():
    """Equal similarities rank the lower database index first (a stable sort)."""
    database = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), dim=1)
    query = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    _, order = next(rank_database(query, database))
    assert order[0].tolist()[:2] == [0, 2]
    # So a positive tied with a negative listed before it comes second: AP 1/4.
    assert ranked_metrics(*masks(order[0].tolist(), positives=[2]), KS)["ap"][0] == pytest.approx(0.25)


# ---------------------------------------------------------------------- against a plain implementation


def test_matches_plain_revisitop_and_relates_to_sklearn():
    rng = np.random.default_rng(0)
    n, queries = 40, 25
    order = np.stack([rng.permutation(n) for _ in range(queries)])
    positive_sets, junk_sets = [], []
    for q in range(queries):
        chosen = rng.permutation(n)
        positive_sets.append(set(chosen[: 1 + q % 6].tolist()))
        junk_sets.append(set(chosen[10: 10 + q % 5].tolist()))
    positive = np.stack([np.isin(row, list(p)) for row, p in zip(order, positive_sets)])
    junk = np.stack([np.isin(row, list(j)) for row, j in zip(order, junk_sets)])
    metrics = ranked_metrics(positive, junk, KS)
    for q in range(queries):
        ap, precision = plain_revisitop(order[q].tolist(), positive_sets[q], junk_sets[q])
        assert metrics["ap"][q] == pytest.approx(ap)
        assert metrics["revisited_precision"][q].tolist() == pytest.approx(precision)
        # sklearn's AP is the mean precision at each positive, (j+1)/(r+1); revisitop averages it with
        # the precision just before each positive, j/r, so it is never higher, equal only when perfect.
        kept = [i for i in order[q].tolist() if i not in junk_sets[q]]
        labels = [i in positive_sets[q] for i in kept]
        plain = average_precision_score(labels, -np.arange(len(kept)))
        ranks = [r for r, label in enumerate(labels) if label]
        before = np.mean([j / r if r else 1.0 for j, r in enumerate(ranks)])
        assert metrics["ap"][q] == pytest.approx((plain + before) / 2)
        assert metrics["ap"][q] <= plain + 1e-12
        assert (metrics["ap"][q] == pytest.approx(plain)) == (ranks == list(range(len(ranks))))
    summary = summarise(metrics, KS, revisited=True)
    assert summary["mAP"] == pytest.approx(100 * np.mean([plain_revisitop(order[q].tolist(), positive_sets[q],
                                                                           junk_sets[q])[0] for q in range(queries)]))


def test_protocol_sets():
    entry = {"easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([3])}
    sets = {p: protocol_ground_truth([entry], p)[0] for p in ("easy", "medium", "hard")}
    assert {p: (sorted(ok.tolist()), sorted(junk.tolist())) for p, (ok, junk) in sets.items()} == {
        "easy": ([0, 1], [2, 3]), "medium": ([0, 1, 2], [3]), "hard": ([2], [0, 1, 3])}
    # Ranking hard, junk, easy, easy, negative: Easy drops the hard image as junk, Hard the easy ones.
    results = evaluate_revisited(np.array([[2, 3, 0, 1, 4]]), [entry], KS)
    assert results["easy"]["mAP"] == pytest.approx(100.0)
    assert results["hard"]["mAP"] == pytest.approx(100.0)
    assert results["medium"]["mAP"] == pytest.approx(100 * plain_revisitop([2, 3, 0, 1, 4], {0, 1, 2}, {3})[0])
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_ground_truth([entry], "extreme")


def test_instances_match_plain_loop():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(12, 8), dim=1)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1, 0])
    result = evaluate_instances(features, labels, KS)
    aps, p5, hits = [], [], []
    for q in range(len(labels)):
        ranking = torch.argsort(features @ features[q], descending=True, stable=True).tolist()
        ranking.remove(q)
        positives = {i for i in range(len(labels)) if labels[i] == labels[q] and i != q}
        if not positives:
            continue
        aps.append(plain_revisitop(ranking, positives, set())[0])
        p5.append(sum(i in positives for i in ranking[:5]) / 5)
        hits.append(ranking[0] in positives)
    assert result["mAP"] == pytest.approx(100 * np.mean(aps))
    assert result["mP@5"] == pytest.approx(100 * np.mean(p5))
    assert result["R@1"] == pytest.approx(100 * np.mean(hits)) == pytest.approx(result["mP@1"])
    assert result["queries"] == 11 and result["queries_without_positives"] == 1


# ------------------------------------------------------------------------------------ images, batching


def test_crop_rounds_as_pil_and_shrink_is_thumbnail():
    pixels = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    for box in [(1.4, 2.6, 10.5, 12.49), (0.0, 0.0, 50.0, 40.0), (3.5, 4.5, 20.5, 30.5)]:
        assert np.array_equal(crop_box(pixels, box), np.asarray(Image.fromarray(pixels).crop(box)))
    with pytest.raises(ValueError, match="outside"):
        crop_box(pixels, (60, 0, 70, 10))
    assert shrink_to_fit(pixels, 25).shape == (20, 25, 3)
    assert shrink_to_fit(pixels, 64) is pixels  # never enlarged, as PIL's thumbnail


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return vit_tiny(patch_size=8, depth=2, img_size=32).eval()


def test_multiscale_matches_the_official_uncut_input(backbone):
    """Cutting to whole patches gives what the official strided patch convolution gives uncut."""
    pixels = torch.randint(0, 256, (2, 3, 45, 61), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    images = (pixels.float() / 255 - mean) / std
    with torch.no_grad():
        reference = sum(backbone(images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear",
                                                                     align_corners=False)) for s in MULTISCALE)
    assert torch.allclose(embed_batch(backbone, pixels, MULTISCALE), F.normalize(reference, dim=1), atol=1e-5)
    with pytest.raises(ValueError, match="less than one 8-pixel patch"):
        embed_batch(backbone, torch.zeros(1, 3, 12, 40, dtype=torch.uint8), MULTISCALE)


def test_batches_by_size_keep_order(backbone, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(32, 48), (40, 32), (32, 48), (40, 32), (32, 48)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    images = RetrievalImages(paths, size=0)
    batched = embed_images(backbone, images, batch_size=2)
    single = torch.cat([embed_batch(backbone, images[i][1][None]) for i in range(len(paths))])
    assert torch.allclose(batched, single, atol=1e-5)


# -------------------------------------------------------------------------------------- the command


def save_jpeg(pixels, path):
    # 4:4:4 JPEG: 8x8 blocks are coded independently, so a block-aligned crop of the decoded
    # image is the decoded crop (lets the test build database images equal to query crops).
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)


def texture(rng, height, width):
    return np.kron(rng.integers(0, 256, (height // 8, width // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "w.pth"
    torch.save(vit_tiny(patch_size=8, depth=2, img_size=32).state_dict(), path)
    return path


def write_revisited(root, rng):
    """3 queries (64x80, box = a 32x40 block-aligned window) and 6 database images: d0..d2 equal
    to the query crops, d3..d5 other textures. Easy: d_q; no hard positives; d5 junk of q0."""
    (root / "jpg").mkdir(parents=True)
    for q in range(3):
        canvas = texture(rng, 64, 80)
        save_jpeg(canvas, root / "jpg" / f"q{q}.jpg")
        save_jpeg(canvas[16:48, 24:64], root / "jpg" / f"d{q}.jpg")
    for d in range(3, 6):
        save_jpeg(texture(rng, 48, 40), root / "jpg" / f"d{d}.jpg")
    gnd = [{"bbx": [24.0, 16.0, 64.0, 48.0], "easy": [q], "hard": [], "junk": [5] if q == 0 else []}
           for q in range(3)]
    with open(root / "gnd_tiny.pkl", "wb") as file:
        pickle.dump({"imlist": [f"d{d}" for d in range(6)], "qimlist": [f"q{q}" for q in range(3)], "gnd": gnd}, file)
    for q in range(3):  # what the perfect-retrieval test relies on
        assert np.array_equal(load_rgb(root / "jpg" / f"q{q}.jpg")[16:48, 24:64], load_rgb(root / "jpg" / f"d{q}.jpg"))


def run(weights, data, *argv):
    return cli.main(["eval", "retrieval", str(weights), "--data", str(data), *map(str, argv), "--device", "cpu",
                     "--workers", "0"])


def test_revisited_end_to_end_perfect_retrieval(tmp_path, weights):
    write_revisited(tmp_path / "tiny", np.random.default_rng(0))
    out = tmp_path / "out.json"
    assert run(weights, tmp_path / "tiny", "--json", out, "--png", tmp_path / "ranks.png", "--top", "4") == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "revisited" and result["dataset"] == "tiny"
    for protocol in ("easy", "medium"):
        assert result[protocol]["mAP"] == pytest.approx(100.0)
        assert result[protocol]["mP@1"] == pytest.approx(100.0)
        assert result[protocol]["queries"] == 3
    assert result["hard"] == {"mAP": None, "mP@1": None, "mP@5": None, "mP@10": None, "queries": 0,
                              "queries_without_positives": 3}
    assert result["counts"] == {"database": 6, "queries": 3}
    assert result["settings"]["query_crop"] and result["settings"]["size"] == 224
    assert result["checkpoint"]["arch"] == "vit_tiny" and result["checkpoint"]["patch_size"] == 8
    with Image.open(tmp_path / "ranks.png") as png:
        assert png.format == "PNG" and png.width > png.height > 0
    assert result["png"] == str(tmp_path / "ranks.png") and not (tmp_path / "out.png").exists()


def test_revisited_options_and_full_queries(tmp_path, weights):
    write_revisited(tmp_path / "tiny", np.random.default_rng(1))
    out = tmp_path / "out.json"
    assert run(weights, tmp_path / "tiny", "--json", out, "--multiscale", "--full-queries", "--drop-high-variance",
               "4", "--size", "48", "--ks", "1", "2", "--protocol", "revisited") == 0
    result = json.loads(out.read_text())
    assert result["settings"]["multiscale"] and not result["settings"]["query_crop"]
    assert len(result["settings"]["scales"]) == 3 and result["settings"]["drop_high_variance"] == 4
    assert set(result["medium"]) == {"mAP", "mP@1", "mP@2", "queries", "queries_without_positives"}
    assert 0 <= result["medium"]["mAP"] <= 100
    assert result["png"] == str(tmp_path / "out.png")  # without --png: beside the JSON
    with Image.open(tmp_path / "out.png") as png:
        assert png.format == "PNG"


def test_instances_end_to_end(tmp_path, weights):
    """Two identical copies per instance: each image's copy is its first neighbour (mAP 100);
    a one-image instance has no positives and is counted, not scored."""
    rng = np.random.default_rng(2)
    root = tmp_path / "instances"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        pixels = texture(rng, 40, 48)
        Image.fromarray(pixels).save(root / name / "1.png")
        Image.fromarray(pixels).save(root / name / "2.png")
    (root / "lonely").mkdir()
    save_jpeg(texture(rng, 32, 32), root / "lonely" / "only.jpg")
    (root / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "out.json"
    assert run(weights, root, "--json", out, "--png", tmp_path / "ranks.png", "--show", "2") == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "instances"
    scores = result["instances"]
    assert scores["mAP"] == pytest.approx(100.0) and scores["R@1"] == pytest.approx(100.0)
    assert scores["mP@1"] == pytest.approx(100.0) and scores["mP@5"] == pytest.approx(20.0)
    assert scores["queries"] == 6 and scores["queries_without_positives"] == 1
    assert result["counts"] == {"database": 7, "queries": 7, "instances": 4}
    assert (tmp_path / "ranks.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ bad input


def test_layout_errors(tmp_path, weights, capsys):
    assert run(weights, tmp_path / "missing") == 1
    assert "data folder not found" in capsys.readouterr().err
    (tmp_path / "nognd" / "jpg").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--gnd FILE"):
        read_retrieval_set(tmp_path / "nognd")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        read_retrieval_set(tmp_path / "empty")


def test_ground_truth_errors(tmp_path):
    root = tmp_path / "ox"
    write_revisited(root, np.random.default_rng(3))
    (root / "jpg" / "d4.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 6 database images .*\(first: d4\.jpg\)"):
        read_retrieval_set(root)
    with open(root / "gnd_other.pkl", "wb") as file:
        pickle.dump({"imlist": ["d0"], "qimlist": ["q0"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}, file)
    with pytest.raises(ValueError, match="choose one with --gnd"):
        read_retrieval_set(root)
    with pytest.raises(ValueError, match=r"easy indices outside 0\.\.0"):
        read_retrieval_set(root, root / "gnd_other.pkl")
    with open(root / "gnd_other.pkl", "wb") as file:
        pickle.dump(OrderedDict(imlist=["d0"], qimlist=["q0"], gnd=[]), file)
    with pytest.raises(ValueError, match="collections.OrderedDict"):  # only plain data is unpickled
        read_retrieval_set(root, root / "gnd_other.pkl")


def test_instance_folders_that_cannot_rank_are_refused(tmp_path):
    """One instance folder (every other image a positive) or one image per instance (no positive at
    all) would score a number that means nothing."""
    rng = np.random.default_rng(0)
    (tmp_path / "one" / "only").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "one" / "only" / f"{i}.png")
    with pytest.raises(ValueError, match="holds one instance folder"):
        read_retrieval_set(tmp_path / "one")
    for i in range(3):
        (tmp_path / "singles" / f"i{i}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "singles" / f"i{i}" / "a.png")
    with pytest.raises(ValueError, match="no query has a positive"):
        read_retrieval_set(tmp_path / "singles")
