"""ovdiff eval: metrics by hand, dataset layouts built here file by file, pred-dir, shards and merge."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from planted import TINY_SEGMENT
from typer.testing import CliRunner

from ovdiff_cli import datasets, evaluation
from ovdiff_cli.classes import build_class_list
from ovdiff_cli.cli import app
from ovdiff_cli.outputs import write_labels

runner = CliRunner()
TINY = TINY_SEGMENT


def invoke(*args: str):
    return runner.invoke(app, list(args))


# --- metrics ------------------------------------------------------------------------------------------------------


def test_miou_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [4, 0, 7, 0]])  # 7 sits on an ignored pixel: never looked at
    conf = evaluation.confusion(pred, gt, 5)
    # pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,4) (2,0) (1,0)
    expected = np.zeros((5, 5), np.int64)
    for g, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 4), (2, 0), (1, 0)]:
        expected[g, p] += 1
    assert np.array_equal(conf, expected)
    m = evaluation.metrics(conf, ["a", "b", "c", "d", "e"])
    # IoU a = 1 / (2 + 3 - 1), b = 2 / (3 + 3 - 2), c = 0 / 2, d absent everywhere (left out), e only predicted: 0
    assert m["per_class"] == {"a": 0.25, "b": 0.5, "c": 0.0, "d": None, "e": 0.0}
    assert m["miou"] == pytest.approx((0.25 + 0.5 + 0 + 0) / 4)
    assert m["pixel_acc"] == pytest.approx(3 / 7) and m["pixels"] == 7


def test_confusion_rejects_bad_ids():
    with pytest.raises(ValueError, match="prediction holds label 9"):
        evaluation.confusion(np.array([[9]]), np.array([[1]]), 3)
    with pytest.raises(ValueError, match="ground truth holds label 4"):
        evaluation.confusion(np.array([[0]]), np.array([[4]]), 3)
    with pytest.raises(ValueError, match="prediction is 2 x 1"):
        evaluation.confusion(np.zeros((1, 2)), np.zeros((2, 1)), 3)


def test_seed_summary():
    assert evaluation.summarise_seeds([0.4, 0.5]) == pytest.approx({"miou": 0.45, "miou_std": 0.05})


# --- dataset layouts, written out here path by path (not from the specs under test) --------------------------------

LAYOUTS = {
    # name: (image path, label path, list file or None) for one id, under the folder --root points at
    "voc": ("VOCdevkit/VOC2012/JPEGImages/{id}.jpg", "VOCdevkit/VOC2012/SegmentationClass/{id}.png",
            "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
    "voc20": ("VOCdevkit/VOC2012/JPEGImages/{id}.jpg", "VOCdevkit/VOC2012/SegmentationClass/{id}.png",
              "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
    "context": ("VOCdevkit/VOC2010/JPEGImages/{id}.jpg", "VOCdevkit/VOC2010/SegmentationClassContext/{id}.png",
                "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
    "context59": ("VOCdevkit/VOC2010/JPEGImages/{id}.jpg", "VOCdevkit/VOC2010/SegmentationClassContext/{id}.png",
                  "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
    "object": ("coco_stuff164k/images/val2017/{id}.jpg",
               "coco_stuff164k/annotations/val2017/{id}_instanceTrainIds.png", None),
    "stuff": ("coco_stuff164k/images/val2017/{id}.jpg", "coco_stuff164k/annotations/val2017/{id}_labelTrainIds.png",
              None),
    "ade": ("ade/ADEChallengeData2016/images/validation/{id}.jpg",
            "ade/ADEChallengeData2016/annotations/validation/{id}.png", None),
    "cityscapes": ("cityscapes/leftImg8bit/val/{id}_leftImg8bit.png",
                   "cityscapes/gtFine/val/{id}_gtFine_labelTrainIds.png", None),
}  # fmt: skip
IDS = {
    "cityscapes": ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019", "munster/munster_000002_000019"],
    "object": ["000000000139", "000000000285", "000000000632"],
    "stuff": ["000000000139", "000000000285", "000000000632"],
    "ade": ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"],
}
RAW_CLASSES = {"voc": 21, "voc20": 21, "context": 60, "context59": 60, "object": 81, "stuff": 171, "ade": 151}
RAW_CLASSES["cityscapes"] = 19


def split_path(template: str, split: str) -> str:
    """A path of LAYOUTS (written for val) for the train split, as mmseg lays that out."""
    assert split in ("val", "train")
    if split == "val":
        return template
    for val, train in (
        ("validation", "training"),
        ("val2017", "train2017"),
        ("/val/", "/train/"),
        ("/val.txt", "/train.txt"),
    ):
        template = template.replace(val, train)
    return template


def make_dataset(
    top: Path,
    name: str,
    n: int = 3,
    seed: int = 0,
    size: tuple[int, int] = (40, 30),
    *,
    split: str = "val",
    ids: list[str] | None = None,
    labels: Callable[[str], np.ndarray] | None = None,
) -> list[str]:
    """Random images and label maps (raw ids as the benchmark stores them, some 255) in ``name``'s layout, for
    ``split``; ``labels(id)`` plants an image's (H, W) raw label map instead."""
    rng = np.random.default_rng(seed)
    image_t, label_t, listing = (split_path(t, split) if t else t for t in LAYOUTS[name])
    ids = ids or IDS.get(name, [f"2008_{i:06d}" for i in range(n)])[:n]
    for i in ids:
        img, lab = top / image_t.format(id=i), top / label_t.format(id=i)
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(img)
        if labels is not None:
            raw = labels(i)
        else:
            raw = rng.integers(0, RAW_CLASSES[name], (size[1], size[0]))
            raw[0, :5] = 255
        write_labels(lab, raw, 256)
    if listing:
        (top / listing).parent.mkdir(parents=True, exist_ok=True)
        (top / listing).write_text("\n".join(ids) + "\n")
    return ids


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loaders_find_the_pairs_and_classes(tmp_path, name):
    ids = make_dataset(tmp_path, name)
    spec = datasets.get_dataset(name)
    expected_classes = {"voc": 21, "voc20": 20, "context": 60, "context59": 59, "object": 81, "stuff": 171}
    expected_classes |= {"ade": 150, "cityscapes": 19}
    assert spec.num_classes == expected_classes[name]
    for names in ("paper", "plain"):  # valid, distinct prompts
        assert len(build_class_list(spec.vocabulary(names))) == spec.num_classes - spec.background
    image_t, label_t, _ = LAYOUTS[name]
    folder = Path(image_t).parts[0] if name not in ("ade",) else Path("ade")
    for root in {tmp_path, tmp_path / folder, tmp_path / spec.folder}:  # mmseg's data/, the parent, the folder
        samples = datasets.list_samples(spec, root)
        assert [s.id for s in samples] == sorted(ids)
        for s in samples:
            assert s.image == tmp_path / image_t.format(id=s.id) and s.label == tmp_path / label_t.format(id=s.id)
    raw = np.array(Image.open(samples[0].label)).astype(np.int64)
    gt = spec.read_labels(samples[0].label)
    if spec.reduce_zero_label:  # 0 -> ignored, k -> k - 1, 255 stays
        assert np.array_equal(gt, np.where(raw == 0, 255, np.where(raw == 255, 255, raw - 1)))
    else:
        assert np.array_equal(gt, raw)


def test_paper_prompt_names_and_plain_ones():
    voc = datasets.get_dataset("voc")
    paper = voc.vocabulary()
    assert [paper[i] for i in (0, 10, 15, 19)] == ["airplane", "table", "potted plant", "monitor"]
    assert [voc.vocabulary("plain")[i] for i in (0, 10, 15, 19)] == [
        "aeroplane",
        "dining table",
        "potted plant",
        "tv monitor",
    ]
    context = datasets.get_dataset("context59").vocabulary()
    assert {"airplane", "plant", "monitor", "computer keyboard"} <= set(context) and "pottedplant" not in context
    ade = datasets.get_dataset("ade").vocabulary()
    overrides = {"liquid tank", "window blinds", "cooker hood", "wastebin", "shop case", "clothing"}
    assert overrides <= set(ade) and not {"tank", "blind", "hood", "ashcan", "case", "apparel"} & set(ade)
    stuff = datasets.get_dataset("stuff").vocabulary()
    assert {"sky", "brick wall", "desk", "window blind", "playing field"} <= set(stuff)
    with pytest.raises(ValueError, match="--prompt-names 'odd'"):
        voc.vocabulary("odd")


def test_benchmarks_use_the_paper_stuff_table():
    specs = build_class_list(datasets.get_dataset("context").vocabulary())
    stuff = {c.name for c in specs if c.stuff}
    assert {"sky", "grass", "wall", "road", "water", "bedclothes"} <= stuff
    assert not {"building", "tree", "airplane"} & stuff


@pytest.mark.parametrize(
    ("name", "breakage", "needle"),
    [
        ("voc", lambda t: shutil.rmtree(t / "VOCdevkit/VOC2012/JPEGImages"), "JPEGImages/ inside"),
        ("voc", lambda t: (t / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink(), "split file"),
        ("voc", lambda t: (t / "VOCdevkit/VOC2012/SegmentationClass/2008_000001.png").unlink(), "2008_000001.png"),
        ("object", lambda t: shutil.rmtree(t / "coco_stuff164k/annotations"), "ovdiff eval prepare object"),
    ],
)
def test_malformed_roots_say_what_was_expected(tmp_path, name, breakage, needle):
    make_dataset(tmp_path, name)
    breakage(tmp_path)
    result = invoke("eval", name, "--root", str(tmp_path), "--pred-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], lines


# --- scoring files, shards and merge (no model) -------------------------------------------------------------------


def copy_gt_as_predictions(tmp_path: Path, name: str) -> Path:
    spec = datasets.get_dataset(name)
    preds = tmp_path / "preds"
    for s in datasets.list_samples(spec, tmp_path):
        gt = spec.read_labels(s.label)
        (preds / s.id).parent.mkdir(parents=True, exist_ok=True)
        write_labels(preds / f"{s.id}.png", np.where(gt == 255, 0, gt), 256)
    return preds


@pytest.mark.parametrize("name", ["voc", "ade", "cityscapes"])
def test_pred_dir_with_ground_truth_scores_one(tmp_path, name):
    make_dataset(tmp_path, name, n=3)
    preds = copy_gt_as_predictions(tmp_path, name)
    out = tmp_path / "r.json"
    result = invoke("eval", name, "--root", str(tmp_path), "--pred-dir", str(preds), "--save", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["miou"] == 1.0 and doc["pixel_acc"] == 1.0 and doc["n_images"] == 3 and doc["models"] is None
    assert "mIoU=100.00% pixel_acc=100.00%" in result.stdout


def test_a_pred_dir_without_any_prediction_is_one_line(tmp_path):
    make_dataset(tmp_path, "voc", n=3)
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    write_labels(wrong / "unrelated.png", np.zeros((4, 4), dtype=np.uint8), 256)
    result = invoke("eval", "voc", "--root", str(tmp_path), "--pred-dir", str(wrong), "--quiet")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: --pred-dir {wrong}: no prediction for any of the 3 images (1 PNG files there; expected names such"
        " as 2008_000000.png)"
    ]


def test_pred_dir_missing_and_wrong_predictions_fail_per_image(tmp_path):
    make_dataset(tmp_path, "voc", n=3)
    preds = copy_gt_as_predictions(tmp_path, "voc")
    (preds / "2008_000000.png").unlink()
    write_labels(preds / "2008_000001.png", np.full((30, 40), 21), 256)  # 21 is not a VOC id
    result = invoke("eval", "voc", "--root", str(tmp_path), "--pred-dir", str(preds), "--save", str(tmp_path / "r"))
    assert result.exit_code == 1
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert "2008_000000: no prediction" in errors[0] and "label 21" in errors[1] and "2 of 3 images" in errors[2]
    doc = json.loads((tmp_path / "r").read_text())
    assert (
        doc["n_images"] == 1
        and doc["miou"] == 1.0
        and [f["id"] for f in doc["failed"]] == ["2008_000000", "2008_000001"]
    )


def test_shards_merge_to_the_unsharded_result_bit_for_bit(tmp_path):
    make_dataset(tmp_path, "voc", n=7)
    preds = copy_gt_as_predictions(tmp_path, "voc")
    rng = np.random.default_rng(1)
    for p in preds.glob("*.png"):  # imperfect predictions, so the matrices are not trivial
        write_labels(p, rng.integers(0, 21, (30, 40)), 256)
    common = ["eval", "voc", "--root", str(tmp_path), "--pred-dir", str(preds), "--quiet"]
    assert invoke(*common, "--save", str(tmp_path / "all.json")).exit_code == 0
    for k in range(3):
        assert invoke(*common, "--shard", f"{k}/3", "--save", str(tmp_path / f"p{k}.json")).exit_code == 0
    shown = invoke(*common[:-1], "--shard", "1/3", "--save", str(tmp_path / "p1.json"))
    assert "(partial: shard 1/3 from --shard 1/3: 2 of 7 images)" in shown.stdout, shown.stdout
    part = json.loads((tmp_path / "p1.json").read_text())
    assert part["shard"] == {"index": 1, "count": 3, "partial": True} and part["n_images"] == 2
    parts = [str(tmp_path / f"p{k}.json") for k in (2, 0, 1)]
    merged = invoke("eval", "merge", *parts, "--save", str(tmp_path / "merged.json"), "--quiet")
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged.json").read_bytes() == (tmp_path / "all.json").read_bytes()


def test_merge_refuses_incomplete_or_mixed_parts(tmp_path):
    make_dataset(tmp_path, "voc", n=4)
    preds = copy_gt_as_predictions(tmp_path, "voc")
    common = ["eval", "voc", "--root", str(tmp_path), "--pred-dir", str(preds), "--quiet"]
    for k in range(2):
        invoke(*common, "--shard", f"{k}/2", "--save", str(tmp_path / f"p{k}.json"))
    invoke(*common, "--limit", "2", "--shard", "1/2", "--save", str(tmp_path / "other.json"))
    cases = [
        ([tmp_path / "p0.json"], "shard 1/2 is missing"),
        ([tmp_path / "p0.json", tmp_path / "p0.json"], "both shard 0/2"),
        ([tmp_path / "p0.json", tmp_path / "other.json"], "'limit' differ"),
        ([tmp_path / "nope.json"], "no such file"),
    ]
    for files, needle in cases:
        result = invoke("eval", "merge", *map(str, files))
        assert result.exit_code == 2 and needle in result.output, result.output
    assert "give --save FILE" in invoke(*common, "--shard", "0/2").output


def test_prepare_coco_object(tmp_path):
    ann = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    ann.mkdir(parents=True)
    raw = np.array([[0, 12, 89, 90], [91, 181, 255, 11]], dtype=np.uint8)  # person, stop sign, toothbrush, ...
    Image.fromarray(raw).save(ann / "000000000139.png")
    Image.fromarray(raw).save(ann / "000000000139_labelTrainIds.png")  # mmseg's stuff labels: not an input
    result = invoke("eval", "prepare", "object", "--coco-stuff-root", str(tmp_path))
    assert result.exit_code == 0 and "1 label maps written" in result.output, result.output
    out = np.array(Image.open(ann / "000000000139_instanceTrainIds.png"))
    obj = datasets.get_dataset("object").classes
    assert [obj[v] for v in out[0]] == ["person", "stop sign", "toothbrush", "background"]
    assert out[1].tolist() == [0, 0, 0, 0]  # stuff, unlabeled and unused ids are all background
    again = invoke("eval", "prepare", "object", "--coco-stuff-root", str(tmp_path / "coco_stuff164k"))
    assert "0 label maps written, 1 already there" in again.output
    assert invoke("eval", "prepare", "voc", "--coco-stuff-root", str(tmp_path)).exit_code == 2


# --- with the tiny models -----------------------------------------------------------------------------------------


def test_tiny_eval_json_and_save_pred(tmp_path):
    make_dataset(tmp_path, "voc", n=3, size=(64, 48))
    out = tmp_path / "r.json"
    result = invoke(
        "eval", "voc", "--root", str(tmp_path), *TINY, "--save", str(out), "--save-pred", str(tmp_path / "sp")
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {"dataset", "split", "n_images", "miou", "per_class", "pixel_acc", "seeds", "models", "options"} <= set(doc)
    assert doc["models"]["name"] == "tiny" and doc["options"]["segment"]["background"] is True
    assert len(doc["confusion"]) == 21 and sum(map(sum, doc["confusion"])) == doc["seeds"][0]["pixels"]
    assert doc["seeds"][0]["seed"] == 42 and len(doc["per_class"]) == 21
    # the saved predictions score exactly as the run did
    rescored = invoke(
        "eval", "voc", "--root", str(tmp_path), "--pred-dir", str(tmp_path / "sp"), "--save", str(tmp_path / "x")
    )
    assert rescored.exit_code == 0
    assert json.loads((tmp_path / "x").read_text())["confusion"] == doc["confusion"]


def test_tiny_eval_two_seeds_and_protocol_errors(tmp_path):
    make_dataset(tmp_path, "voc20", n=2, size=(64, 48))
    out = tmp_path / "r.json"
    result = invoke("eval", "voc20", "--root", str(tmp_path), *TINY, "--seeds", "1,2", "--save", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [s["seed"] for s in doc["seeds"]] == [1, 2] and "miou_std" in doc and "over 2 seeds" in result.stdout
    assert doc["options"]["segment"]["background"] is False
    bad = invoke("eval", "voc20", "--root", str(tmp_path), *TINY, "--background")
    assert bad.exit_code == 2 and "always evaluated without background" in bad.output
    assert (
        "give one of them"
        in invoke("eval", "voc20", "--root", str(tmp_path), *TINY, "--seed", "1", "--seeds", "2").output
    )


def test_json_prints_and_save_writes_through_links_fifos_and_stdout(tmp_path):
    """--json prints the document to stdout (pipeable); --save FILE writes it: a regular file atomically, a
    symlink through to its target (the link stays), a FIFO and "-" in place (never replaced by a file)."""
    import os
    import threading

    make_dataset(tmp_path, "voc", n=2)
    preds = copy_gt_as_predictions(tmp_path, "voc")
    common = ["eval", "voc", "--root", str(tmp_path), "--pred-dir", str(preds), "--quiet"]
    printed = invoke(*common, "--json")
    assert printed.exit_code == 0 and json.loads(printed.stdout)["miou"] == 1.0  # stdout is the document alone
    regular = tmp_path / "r.json"
    assert invoke(*common, "--save", str(regular)).exit_code == 0
    text = regular.read_text()
    assert json.loads(text) == json.loads(printed.stdout)
    # A link: the target gets the document, the link is still a link.
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    assert invoke(*common, "--save", str(link)).exit_code == 0
    assert link.is_symlink() and target.read_text() == text
    # "-": stdout, and no file named "-".
    dash = invoke(*common, "--save", "-")
    assert dash.exit_code == 0 and json.loads(dash.stdout) == json.loads(text) and not Path("-").exists()
    # A FIFO: a reader gets the bytes, the FIFO is still a FIFO.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    assert invoke(*common, "--save", str(fifo)).exit_code == 0
    reader.join(10)
    assert got == [text.encode()] and fifo.is_fifo()


def test_per_class_table_off_a_terminal_is_tab_separated(tmp_path):
    """Piped or logged: the per-class table is a header and one tab-separated line per class, names whole; the
    summary line follows it."""
    make_dataset(tmp_path, "ade", n=2)
    preds = copy_gt_as_predictions(tmp_path, "ade")
    result = invoke("eval", "ade", "--root", str(tmp_path), "--pred-dir", str(preds))
    assert result.exit_code == 0, result.output
    *table, summary = result.stdout.splitlines()
    rows = [line.split("\t") for line in table]
    assert rows[0] == ["class", "IoU"] and all(len(r) == 2 for r in rows)
    spec = datasets.get_dataset("ade")
    assert [r[0] for r in rows[1:]] == list(spec.classes)  # every name whole, however long
    assert max(map(len, spec.classes)) > 15 and "…" not in result.stdout and "┃" not in result.stdout
    assert {r[1] for r in rows[1:]} <= {"n/a", "100.00%"} and summary.startswith("mIoU=100.00% ")


# --- support sets from the training split (--support-from train) ---------------------------------------------------

# Eight VOC training images, each planted with whole blocks of some classes on background 0 (a 255 row on top):
# aeroplane (1) in images 0-4, bicycle (2) and every class from boat (4) to tvmonitor (20) in images 5 and 6, bird
# (3) in image 7 alone. Images are named by their last digit below.
TRAIN_IDS = [f"2009_{j:06d}" for j in range(8)]
TRAIN_CLASSES = {j: {1} for j in range(5)} | {5: {2, *range(4, 21)}, 6: {2, *range(4, 21)}, 7: {3}}
# sha256 of "<seed>:<id>" orders them (by last digit) 7 4 1 3 0 6 5 2 for seed 1 and 2 7 1 4 0 3 5 6 for seed 2.
TRAIN_ONLY = ["--models", "tiny", "--k", "3", "--short-side", "64", "--scales", "64,48", "--stride", "32"]


def plant_train(top: Path, without: int | None = None) -> None:
    """The training split above (64 x 48), with class ``without`` nowhere; a val split of one random image."""
    make_dataset(top, "voc", n=1, size=(64, 48))

    def labels(image_id: str) -> np.ndarray:
        raw = np.zeros((48, 64), dtype=np.int64)
        for c in TRAIN_CLASSES[int(image_id[-1])] - {without}:
            y, x = divmod(c - 1, 5)
            raw[4 + 11 * y : 12 + 11 * y, 2 + 12 * x : 12 + 12 * x] = c
        raw[0] = 255
        return raw

    make_dataset(top, "voc", size=(64, 48), split="train", ids=TRAIN_IDS, labels=labels, seed=1)


def digits(shots: datasets.Shots, names: tuple[str, ...]) -> dict[str, str]:
    """class -> the last digits of its picked images' ids, in pick order."""
    return {name: "".join(s.id[-1] for s in p) for name, p in zip(names, shots.picked, strict=True)}


def test_train_shots_follow_each_seeds_order_of_the_planted_labels(tmp_path):
    plant_train(tmp_path)
    voc = datasets.get_dataset("voc")
    train = datasets.list_samples(voc, tmp_path, "train")
    names = voc.classes[1:]  # the vocabulary: background is no class to pick for
    others = dict.fromkeys(names[3:], "65")
    one = datasets.pick_shots(voc, train, 2, 1)
    assert digits(one, names) == {"aeroplane": "41", "bicycle": "65", "bird": "7", **others}
    assert one.looked_at == one.total == 8  # bird never gets its second image: every map is read
    two = datasets.pick_shots(voc, train, 2, 2)
    assert digits(two, names) == {"aeroplane": "21", "bicycle": "56", "bird": "7", **dict.fromkeys(names[3:], "56")}
    # Without background (reduce-zero-label: stored id c is class c - 1 of 20) the same images hold the same classes.
    voc20 = datasets.get_dataset("voc20")
    assert datasets.vocabulary_ids(voc).tolist() == list(range(1, 21))
    assert datasets.vocabulary_ids(voc20).tolist() == list(range(20))
    assert digits(datasets.pick_shots(voc20, train, 2, 1), voc20.classes) == digits(one, names)
    # One shot: a pick stops once every class has it; a second seed reads only the maps the first did not.
    index = datasets.ClassIndex(voc)
    first = datasets.pick_shots(voc, train, 1, 1, index=index)
    assert (first.looked_at, index.reads) == (6, 6)  # 7 4 1 3 0 6: bird, aeroplane, then bicycle and the rest
    assert digits(first, names) == {"aeroplane": "4", "bicycle": "6", "bird": "7", **dict.fromkeys(names[3:], "6")}
    second = datasets.pick_shots(voc, train, 1, 2, index=index)
    assert (second.looked_at, index.reads) == (7, 8)  # 2 7 1 4 0 3 5: only images 2 and 5 were new (not 6 + 7)
    assert digits(second, names)["aeroplane"] == "2"
    # A label map that cannot be read holds no class (and is remembered with why): bird is then nowhere.
    (tmp_path / f"VOCdevkit/VOC2012/SegmentationClass/{TRAIN_IDS[7]}.png").write_bytes(b"not a png")
    index = datasets.ClassIndex(voc)
    assert datasets.pick_shots(voc, train, 2, 1, index=index).picked[2] == ()
    assert [i for i, _ in index.unreadable] == [TRAIN_IDS[7]]


def test_support_from_train_runs_end_to_end(tmp_path):
    """Two seeds through the CLI with the tiny models: each seed's banks are made of its own training images with
    their ground truth as masks, and the result records where its supports came from."""
    from ovdiff_cli.cache import Cache
    from ovdiff_cli.pipeline.synth import cached_banks

    plant_train(tmp_path)
    out = tmp_path / "r.json"
    args = ["eval", "voc", "--root", str(tmp_path), "--support-from", "train", "--shots", "2", "--seeds", "1,2"]
    result = invoke(*args, *TRAIN_ONLY, "--save", str(out))
    assert result.exit_code == 0, result.output
    assert "note: --shots 2: the train split holds fewer images of 1 class, which get them all: bird (1)" in (
        result.output
    )
    options = json.loads(out.read_text())["options"]
    assert options["support_from"] == "train" and options["shots"] == 2 and options["synth"]["n"] == 0
    digests = options["shots_sha256"]
    assert [d["seed"] for d in digests] == [1, 2] and digests[0]["sha256"] != digests[1]["sha256"]

    def sha(j: int) -> str:
        return hashlib.sha256((tmp_path / f"VOCdevkit/VOC2012/JPEGImages/{TRAIN_IDS[j]}.jpg").read_bytes()).hexdigest()

    cache = Cache(tmp_path / "cache")
    try:
        # airplane (VOC's aeroplane) picked other images for each seed; bicycle and bird had no choice: one bank.
        for name, picks in {"airplane": ["14", "12"], "bicycle": ["56"], "bird": ["7"]}.items():
            banks = cached_banks(cache, name)
            found = sorted("".join(sorted(p["file"][-1] for p in b.meta["photos"])) for b in banks)
            assert found == sorted(picks), name
            for bank in banks:
                assert bank.meta["n"] == 0
                for photo in bank.meta["photos"]:
                    assert photo == {
                        "file": photo["file"],
                        "sha256": sha(int(photo["file"][-1])),
                        "route": "user",
                        "mask": "user",
                    }
    finally:
        cache.close()


def test_support_from_train_mistakes_are_one_line(tmp_path):
    plant_train(tmp_path, without=20)
    root = ["eval", "voc", "--root", str(tmp_path), "--quiet"]
    cases = [
        (
            ["--support-from", "train", "--shots", "2", "--models", "tiny"],
            "--support-from train: no image of the train split (8 images) holds class tvmonitor; such a class has no"
            " support set",
        ),
        (["--support-from", "val"], "--support-from 'val': expected one of synthetic, train"),
        (["--shots", "2"], "--shots 2: only with --support-from train"),
        (["--support-from", "train", "--shots", "0"], "--shots 0: must be at least 1"),
        (["--support-from", "train", "--pred-dir", str(tmp_path)], "--support-from train and --pred-dir:"),
    ]
    for extra, message in cases:
        result = invoke(*root, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert result.output.splitlines() == [result.output.splitlines()[0]], result.output
        assert result.output.startswith(f"error: {message}"), result.output
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").unlink()
    result = invoke(*root, "--support-from", "train")
    assert result.exit_code == 2 and result.output.startswith("error: --support-from train needs the voc train split")
    assert "--split" not in result.output
