"""Preparing shards: outputs, ground truth files, and every kind of bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vlm_mamba.data.coco import infer_split, prepare_coco
from vlm_mamba.data.images import load_image
from vlm_mamba.data.records import AnnotationError
from vlm_mamba.data.shapes import build_shapes_dataset, generate_shapes
from vlm_mamba.data.shards import PrepareError, read_manifest
from vlm_mamba.data.vqav2 import image_file_candidates, prepare_vqav2


def _cli(name):
    """The thin CLI script's ``main`` (data/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


coco_main, vqa_main = _cli("prepare_coco"), _cli("prepare_vqav2")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("raw"), num_train=30, num_val=12, num_test=0, seed=0)


def _copy_raw(raw, dst):
    """A private, mutable copy of the val files for a bad-input test."""
    import shutil

    shutil.copytree(raw["images"]["val"], dst / "images")
    shutil.copy(raw["captions"]["val"], dst / "captions_val.json")
    shutil.copy(raw["questions"]["val"], dst / "q_val.json")
    shutil.copy(raw["annotations"]["val"], dst / "a_val.json")
    return dst


def _tar_members(split_dir):
    names = []
    for shard in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as t:
            names += t.getnames()
    return names


def test_coco_prepare_writes_shards_manifest_and_ground_truth(raw, tmp_path):
    out = prepare_coco(
        images=raw["images"]["train"],
        out=tmp_path,
        annotations=raw["captions"]["train"],
        shard_size=8,
        progress=False,
    )
    split = out["train"]
    manifest = read_manifest(split, "captions")
    assert manifest["num_samples"] == 30 and manifest["num_texts"] == 150 and manifest["num_skipped"] == 0
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 8, 6]
    names = _tar_members(split)
    assert len(names) == 60 and sum(n.endswith(".jpg") for n in names) == 30
    # original bytes are stored untouched
    src = json.loads(raw["captions"]["train"].read_text())
    first = src["images"][0]
    with tarfile.open(split / "shard-000000.tar") as t:
        stored = t.extractfile(f"{first['id']:012d}.jpg").read()
        meta = json.loads(t.extractfile(f"{first['id']:012d}.json").read())
    assert stored == (raw["images"]["train"] / first["file_name"]).read_bytes()
    assert meta["captions"] == [a["caption"] for a in src["annotations"] if a["image_id"] == first["id"]]
    gt = json.loads((split / "captions.json").read_text())
    assert len(gt["images"]) == 30 and len(gt["annotations"]) == 150
    assert out["tokenizer"].is_file()


def test_karpathy_prepare_writes_all_splits(raw, tmp_path):
    out = prepare_coco(
        images=raw["root"] / "images",
        out=tmp_path,
        karpathy=raw["karpathy"],
        splits=("train", "val"),
        progress=False,
    )
    assert read_manifest(out["train"])["num_samples"] == 30
    assert read_manifest(out["val"])["num_samples"] == 12


def test_vqa_prepare_groups_questions_by_image(raw, tmp_path):
    out = prepare_vqav2(
        questions=raw["questions"]["val"],
        annotations=raw["annotations"]["val"],
        images=raw["images"]["val"],
        out=tmp_path,
        progress=False,
    )
    assert set(out) == {"val"}  # no tokenizer for a val split
    manifest = read_manifest(out["val"], "vqa")
    assert manifest["num_samples"] == 12 and manifest["num_texts"] == 60
    q = json.loads((out["val"] / "questions.json").read_text())
    a = json.loads((out["val"] / "annotations.json").read_text())
    assert len(q["questions"]) == len(a["annotations"]) == 60 and q["data_subtype"] == "val"
    with tarfile.open(out["val"] / "shard-000000.tar") as t:
        meta = json.loads(t.extractfile(t.getnames()[1]).read())
    assert len(meta["questions"]) == 5 and len(meta["questions"][0]["answers"]) == 10
    with pytest.raises(ValueError, match="holds .vqa. samples, this loader needs .captions."):
        read_manifest(out["val"], "captions")


def test_vqa_test_split_without_annotations(raw, tmp_path):
    out = prepare_vqav2(
        questions=raw["questions"]["val"],
        images=raw["images"]["val"],
        out=tmp_path,
        split="test-dev",
        progress=False,
    )
    assert not (out["test-dev"] / "annotations.json").exists()
    with tarfile.open(out["test-dev"] / "shard-000000.tar") as t:
        meta = json.loads(t.extractfile(t.getnames()[1]).read())
    assert set(meta["questions"][0]) == {"question_id", "question"}


def test_split_and_image_name_inference():
    assert infer_split("captions_val2014.json") == "val"
    assert infer_split("v2_OpenEnded_mscoco_test-dev2015_questions.json") == "test-dev"
    assert infer_split("x.json", "train2014") == "train"
    with pytest.raises(AnnotationError, match="--split"):
        infer_split("annotations.json")
    assert image_file_candidates(9, "test-dev2015", None)[0] == "COCO_test2015_000000000009.jpg"
    assert image_file_candidates(9, "val2014", None) == ["COCO_val2014_000000000009.jpg", "000000000009.jpg"]


# -- bad input -----------------------------------------------------------------------------------------
def test_missing_and_corrupt_images_are_skipped_and_listed(raw, tmp_path):
    src = _copy_raw(raw, tmp_path / "src")
    imgs = sorted((src / "images").iterdir())
    imgs[0].unlink()  # missing
    data = imgs[1].read_bytes()
    imgs[1].write_bytes(data[: len(data) // 2])  # truncated JPEG
    imgs[2].write_bytes(b"not an image at all")
    out = prepare_coco(
        images=src / "images", out=tmp_path / "out", annotations=src / "captions_val.json", progress=False
    )
    m = read_manifest(out["val"])
    assert m["num_samples"] == 9 and m["num_skipped"] == 3
    reasons = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in m["skipped"]}
    assert reasons[imgs[0].name] == "missing file"
    assert reasons[imgs[1].name].startswith("undecodable image") and reasons[imgs[2].name].startswith(
        "undecodable image"
    )
    gt = json.loads((out["val"] / "captions.json").read_text())
    assert len(gt["images"]) == 9  # the ground truth holds only what was written


def test_strict_turns_a_bad_image_into_an_error(raw, tmp_path, capsys):
    src = _copy_raw(raw, tmp_path / "src")
    sorted((src / "images").iterdir())[3].unlink()
    args = [
        "--questions",
        str(src / "q_val.json"),
        "--annotations",
        str(src / "a_val.json"),
        "--images",
        str(src / "images"),
    ]
    rc = vqa_main([*args, "--out", str(tmp_path / "out"), "--strict", "--quiet"])
    assert rc == 1 and "missing file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "vqav2" / "val").exists()
    assert list((tmp_path / "out" / "vqav2").iterdir()) == []  # no temporary folder left behind
    assert vqa_main([*args, "--out", str(tmp_path / "out"), "--quiet"]) == 0  # without --strict: skipped
    assert read_manifest(tmp_path / "out" / "vqav2" / "val")["num_skipped"] == 1


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (
            lambda d: d["annotations"][4].pop("caption"),
            r"captions_val\.json: annotations\[4\] \(id=\d+\): missing field 'caption'",
        ),
        (
            lambda d: d["annotations"][2].update(image_id="7"),
            r"annotations\[2\] \(id=\d+\): field 'image_id' must be int, got str",
        ),
        (lambda d: d["images"][1].pop("file_name"), r"images\[1\] \(id=\d+\): missing field 'file_name'"),
        (
            lambda d: d["annotations"][0].update(image_id=999),
            r"annotations\[0\] .*'image_id'=999 names no entry of 'images'",
        ),
        (lambda d: d.pop("images"), r"missing top-level field 'images'"),
    ],
)
def test_malformed_caption_json_names_file_record_field(raw, tmp_path, mutate, expect):
    doc = json.loads(raw["captions"]["val"].read_text())
    mutate(doc)
    bad = tmp_path / "captions_val.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match=expect):
        prepare_coco(images=raw["images"]["val"], out=tmp_path / "out", annotations=bad, progress=False)
    assert not (tmp_path / "out" / "coco").exists() or not any((tmp_path / "out" / "coco").iterdir())


def test_malformed_json_syntax_and_vqa_fields(raw, tmp_path, capsys):
    bad = tmp_path / "captions_val.json"
    bad.write_text('{"images": [}')
    rc = coco_main(
        ["--annotations", str(bad), "--images", str(raw["images"]["val"]), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "captions_val.json: not valid JSON" in err and "line 1" in err
    adoc = json.loads(raw["annotations"]["val"].read_text())
    adoc["annotations"][3]["answers"] = adoc["annotations"][3]["answers"][:9]
    (tmp_path / "a.json").write_text(json.dumps(adoc))
    with pytest.raises(
        AnnotationError, match=r"a\.json: annotations\[3\] \(question_id=\d+\): field 'answers' must hold 10"
    ):
        prepare_vqav2(
            raw["questions"]["val"], raw["images"]["val"], tmp_path / "o", annotations=tmp_path / "a.json"
        )
    adoc = json.loads(raw["annotations"]["val"].read_text())
    del adoc["annotations"][5]
    (tmp_path / "a.json").write_text(json.dumps(adoc))
    with pytest.raises(AnnotationError, match="1 questions without an annotation"):
        prepare_vqav2(
            raw["questions"]["val"], raw["images"]["val"], tmp_path / "o", annotations=tmp_path / "a.json"
        )


def test_interrupted_prepare_leaves_no_half_split_and_rerun_is_safe(raw, tmp_path, monkeypatch):
    import vlm_mamba.data.shards as shards

    kw = dict(
        images=raw["images"]["val"],
        out=tmp_path,
        annotations=raw["captions"]["val"],
        shard_size=4,
        progress=False,
    )
    prepare_coco(**kw)
    before = read_manifest(tmp_path / "coco" / "val")["created"]
    real_write, calls = shards.SplitWriter.write, []

    def crash_midway(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # like Ctrl-C halfway through the second shard
        return real_write(self, *a, **k)

    monkeypatch.setattr(shards.SplitWriter, "write", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_coco(**kw)
    # the complete earlier split is untouched; no temporary folder is left
    assert read_manifest(tmp_path / "coco" / "val")["created"] == before
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["val"]
    # a crash that kills the process leaves its temporary folder: the rerun removes it
    (tmp_path / "coco" / ".val.tmp-1-2").mkdir()
    (tmp_path / "coco" / ".val.tmp-1-2" / "shard-000000.tar").write_bytes(b"partial")
    monkeypatch.setattr(shards.SplitWriter, "write", real_write)
    prepare_coco(**kw)
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["val"]
    assert read_manifest(tmp_path / "coco" / "val")["num_samples"] == 12


def test_no_sample_written_is_an_error(raw, tmp_path):
    doc = json.loads(raw["captions"]["val"].read_text())
    for im in doc["images"]:
        im["file_name"] = "nope_" + im["file_name"]
    (tmp_path / "captions_val.json").write_text(json.dumps(doc))
    with pytest.raises(PrepareError, match="no sample was written"):
        prepare_coco(
            images=raw["images"]["val"],
            out=tmp_path / "o",
            annotations=tmp_path / "captions_val.json",
            progress=False,
        )
    assert not (tmp_path / "o" / "coco" / "val").exists()


def test_build_shapes_is_idempotent(tmp_path):
    a = build_shapes_dataset(tmp_path, 10, 4, 0, seed=0, shard_size=4)
    stamp = (a["shapes"]["train"] / "manifest.json").stat().st_mtime_ns
    b = build_shapes_dataset(tmp_path, 10, 4, 0, seed=0, shard_size=4)
    assert (
        b["shapes"]["train"] / "manifest.json"
    ).stat().st_mtime_ns == stamp  # second call: nothing rebuilt
    assert (tmp_path / "shapes" / "tokenizer.json").read_bytes() == (
        tmp_path / "shapes_vqa" / "tokenizer.json"
    ).read_bytes()
    assert read_manifest(a["shapes_vqa"]["val"], "vqa")["num_samples"] == 4


# -- image conversion ----------------------------------------------------------------------------------
def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_exif_rotated_image_is_upright():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, right half red (upright)
    rotated = img.rotate(90, expand=True)  # stored rotated (20 x 40) ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with "rotate 90 CW to display"
    out = load_image(_jpeg(rotated, exif=exif, quality=95))
    assert out.size == (40, 20)
    assert out.getpixel((5, 10))[2] > 200 and out.getpixel((35, 10))[0] > 200
    # JPEG draft (DCT downscaling) is asked in upright terms and still yields an upright image
    small = load_image(_jpeg(rotated, exif=exif, quality=95), draft_size=(20, 10))
    assert small.size == (20, 10)
    assert small.getpixel((2, 5))[2] > 200 and small.getpixel((17, 5))[0] > 200


def test_grayscale_cmyk_palette_rgba_become_rgb():
    gray = load_image(_jpeg(Image.new("L", (8, 8), 128)))
    assert gray.mode == "RGB" and abs(gray.getpixel((4, 4))[0] - 128) <= 2
    cmyk = load_image(_jpeg(Image.new("CMYK", (8, 8), (0, 255, 255, 0))))  # pure red in CMYK
    r, g, b = cmyk.getpixel((4, 4))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((1, 1)) == (255, 255, 255)  # transparent -> white, not black
    pal = Image.new("P", (8, 8), 3)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert load_image(buf.getvalue()).mode == "RGB"
