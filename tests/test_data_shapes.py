"""The synthetic shapes generator: deterministic, official formats, text consistent with the scene."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from vlm_mamba.data.images import load_image
from vlm_mamba.data.shapes import COLORS, SHAPES, generate_image, generate_shapes, make_answers, sample_scene


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_raw")
    return generate_shapes(root, num_train=40, num_val=10, num_test=6, seed=3)


def test_same_seed_same_bytes_other_seed_differs():
    a, b = generate_image(7, "train", 5), generate_image(7, "train", 5)
    assert a["jpeg"] == b["jpeg"] and a["captions"] == b["captions"] and a["questions"] == b["questions"]
    c = generate_image(8, "train", 5)
    assert (c["jpeg"], c["captions"]) != (a["jpeg"], a["captions"])


def test_generate_is_independent_of_worker_count(tmp_path):
    one = generate_shapes(tmp_path / "a", 12, 3, 0, seed=1, workers=0)
    two = generate_shapes(tmp_path / "b", 12, 3, 0, seed=1, workers=2)
    for split in ("train", "val"):
        assert one["captions"][split].read_bytes() == two["captions"][split].read_bytes()
        for f in sorted(one["images"][split].iterdir()):
            assert f.read_bytes() == (two["images"][split] / f.name).read_bytes()


def test_caption_file_is_official_format(raw):
    doc = json.loads(raw["captions"]["train"].read_text())
    assert {"info", "licenses", "images", "annotations"} <= set(doc)
    assert len(doc["images"]) == 40
    ids = {im["id"] for im in doc["images"]}
    for im in doc["images"]:
        assert isinstance(im["id"], int) and im["file_name"] == f"{im['id']:012d}.jpg"
        assert (raw["images"]["train"] / im["file_name"]).is_file()
        assert im["width"] == im["height"] == 64
    per_image = Counter(a["image_id"] for a in doc["annotations"])
    assert set(per_image) == ids and set(per_image.values()) == {5}
    assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])


def test_vqa_files_are_official_format(raw):
    qdoc = json.loads(raw["questions"]["val"].read_text())
    adoc = json.loads(raw["annotations"]["val"].read_text())
    assert qdoc["task_type"] == "Open-Ended" and qdoc["data_subtype"] == "val"
    anns = {a["question_id"]: a for a in adoc["annotations"]}
    assert {q["question_id"] for q in qdoc["questions"]} == set(anns)
    for q in qdoc["questions"]:
        a = anns[q["question_id"]]
        assert a["image_id"] == q["image_id"]
        assert a["answer_type"] in ("yes/no", "number", "other")
        assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
        counts = Counter(x["answer"] for x in a["answers"])
        # the right answer is the strict plurality, i.e. the official multiple_choice_answer
        assert counts.most_common(1)[0][0] == a["multiple_choice_answer"]
        assert counts[a["multiple_choice_answer"]] > max(
            [c for t, c in counts.items() if t != a["multiple_choice_answer"]] or [0]
        )
    types = Counter(a["question_type"] for a in adoc["annotations"])
    assert set(types) == {"what color is the", "what shape is the", "how many", "where is the", "is there a"}


def test_karpathy_file_lists_every_image(raw):
    doc = json.loads(raw["karpathy"].read_text())
    splits = Counter(im["split"] for im in doc["images"])
    assert splits == {"train": 40, "val": 10, "test": 6}
    im = doc["images"][0]
    assert (raw["root"] / "images" / im["filepath"] / im["filename"]).is_file()
    assert len(im["sentences"]) == 5 and im["sentids"] == [s["sentid"] for s in im["sentences"]]


def test_text_matches_the_scene():
    for index in range(60):
        rec = generate_image(0, "train", index)
        present_colors = {c for _, c, _, _ in rec["shapes"]}
        for cap in rec["captions"]:
            mentioned = {c for c in COLORS if c in cap.split() or f"{c}," in cap or f"{c}." in cap}
            assert mentioned <= present_colors, (cap, rec["shapes"])
        by_type = {q["question_type"]: q for q in rec["questions"]}
        q = by_type["what shape is the"]
        color = q["question"].split()[4]
        assert q["multiple_choice_answer"] == next(k for k, c, _, _ in rec["shapes"] if c == color)
        q = by_type["where is the"]
        _, _, _, color, kind = q["question"].rstrip("?").split(maxsplit=4)
        assert q["multiple_choice_answer"] == next(
            p for k, c, _, p in rec["shapes"] if c == color and k == kind
        )
        q = by_type["is there a"]
        words = q["question"].rstrip("?").split()
        want = "yes" if (words[-2], words[-1]) in {(c, k) for k, c, _, _ in rec["shapes"]} else "no"
        assert q["multiple_choice_answer"] == want
        q = by_type["how many"]
        kind = q["question"].split()[2].rstrip("s")
        n = len(rec["shapes"]) if kind == "shape" else sum(k == kind for k, _, _, _ in rec["shapes"])
        assert q["multiple_choice_answer"] == str(n)


def test_pixels_show_the_described_colour():
    """The centre pixel of each shape has its palette colour (the image is what the text says)."""
    rec = generate_image(0, "val", 11)
    img = load_image(rec["jpeg"])
    shapes = sample_scene(random.Random("shapes/0/val/11"), 64)
    for sh in shapes:
        px = img.getpixel((int(sh.x), int(sh.y + (sh.r * 0.2 if sh.kind == "triangle" else 0))))
        want = COLORS[sh.color]
        assert max(abs(a - b) for a, b in zip(px, want)) < 40, (sh, px, want)


def test_yes_no_balanced_and_answers_disagree_sometimes():
    recs = [generate_image(0, "train", i) for i in range(200)]
    yn = Counter(
        q["multiple_choice_answer"] for r in recs for q in r["questions"] if q["answer_type"] == "yes/no"
    )
    assert 0.35 < yn["yes"] / sum(yn.values()) < 0.65
    unanimous = [len({a["answer"] for a in q["answers"]}) == 1 for r in recs for q in r["questions"]]
    assert 0.05 < sum(unanimous) / len(unanimous) < 0.9
    assert {k for r in recs for k, _, _, _ in r["shapes"]} == set(SHAPES)


def test_make_answers_plurality_for_every_kind():
    rng = random.Random(0)
    for ans, kind in [
        ("red", "color"),
        ("3", "number"),
        ("center", "position"),
        ("yes", "yesno"),
        ("circle", "shape"),
    ]:
        for _ in range(50):
            texts = [a["answer"] for a in make_answers(rng, ans, kind)]
            c = Counter(texts)
            assert c[ans] >= 5 and all(v < c[ans] for t, v in c.items() if t != ans)
