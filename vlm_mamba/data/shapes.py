"""The embedded synthetic shapes dataset: COCO-Captions and VQAv2 files a tiny model learns on a CPU.

Each image (default 64x64, JPEG) shows one to three shapes (circle, square, triangle) in six colours, two
sizes, in distinct cells of a 3x3 grid; the cell gives the coarse position ("top left", "center",
...). Colours are distinct within an image, so "the red object" is always unambiguous. Every image
gets five captions from varied templates that all name every object's colour and shape (objects in
reading order; a colour-free template would make the "most frequent caption" baseline strong), and
five questions, one per type, each with ten answers in the VQAv2 style: mostly right, some synonyms
("violet", "middle", "two"), some wrong, the right one always the plurality (so it is
``multiple_choice_answer``).

Trivial baselines on the default build (val, seed 0): per-question-type majority answer 35.2 VQA
accuracy (colour 22.6, shape 36.0, count 39.7, position 15.4, yes/no 62.2; wrong annotator answers
give partial credit); the most frequent training caption scores CIDEr 0.53, naming the true colours
with random shapes 2.8, the true objects in one template 5.5.

========================  ===================  ===========  ===============================
question type             example              answer type  answers
========================  ===================  ===========  ===============================
what color is the         ... the triangle?    other        6 colours
what shape is the         ... the red object?  other        circle / square / triangle
how many                  ... circles are...?  number       0-3
where is the              ... the blue square? other        9 cells
is there a                ... green circle?    yes/no       balanced; 30% hard negatives
========================  ===================  ===========  ===============================

Everything is a function of (seed, split, index): the same call gives byte-identical files, in any
process count. :func:`build_shapes_dataset` generates, prepares the ``shapes`` (captions) and
``shapes_vqa`` (VQA) shards with the same prepare code as real COCO/VQAv2, and trains one tokenizer
for both.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .coco import prepare_coco
from .prompts import CAPTION_PROMPT, VQA_PROMPT
from .tokenizer import train_bpe_tokenizer
from .vqav2 import prepare_vqav2

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 175),
    "orange": (240, 125, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CELLS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
SPLITS = ("train", "val", "test")
ID_OFFSET = {"train": 1, "val": 1_000_000, "test": 2_000_000}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# Annotator variety: synonyms a human might give, and the plausible mistakes (neighbouring values).
SYNONYMS = {
    "purple": ["violet"],
    "orange": ["dark orange"],
    "circle": ["round", "oval"],
    "square": ["rectangle", "box"],
    "triangle": ["triangular"],
    "center": ["middle"],
    "top left": ["upper left"],
    "top right": ["upper right"],
    "bottom left": ["lower left"],
    "bottom right": ["lower right"],
    "top": ["top middle"],
    "bottom": ["bottom middle"],
    "left": ["left side"],
    "right": ["right side"],
}
CONFUSIONS = {
    "red": ["orange"],
    "orange": ["red", "yellow"],
    "yellow": ["orange", "green"],
    "green": ["yellow", "blue"],
    "blue": ["purple", "green"],
    "purple": ["blue", "red"],
    "circle": ["square"],
    "square": ["circle", "triangle"],
    "triangle": ["square"],
    "yes": ["no"],
    "no": ["yes"],
}


@dataclass
class Shape:
    kind: str
    color: str
    size: str
    cell: tuple[int, int]
    x: float  # centre, pixels
    y: float
    r: float  # radius, pixels

    @property
    def pos(self) -> str:
        return CELLS[self.cell]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(*words: str) -> str:
    """``_a("orange", "circle")`` -> "an orange circle"."""
    return f"{_article(words[0])} {' '.join(words)}"


def sample_scene(rng: random.Random, image_size: int) -> list[Shape]:
    """One to three shapes, distinct colours, distinct cells, jittered inside their cells."""
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample(sorted(CELLS), n)
    colors = rng.sample(sorted(COLORS), n)
    cell = image_size / 3
    out = []
    for (row, col), color in zip(sorted(cells), colors):
        size = rng.choice(SIZES)
        r = cell * (rng.uniform(0.34, 0.43) if size == "large" else rng.uniform(0.2, 0.26))
        slack = max(cell / 2 - r - 1, 0) * 0.8
        x = (col + 0.5) * cell + rng.uniform(-slack, slack)
        y = (row + 0.5) * cell + rng.uniform(-slack, slack)
        out.append(Shape(rng.choice(SHAPES), color, size, (row, col), x, y, r))
    return out


def render(
    shapes: list[Shape], image_size: int, background: tuple[int, int, int], supersample: int = 4
) -> Image.Image:
    """Draw at ``supersample`` x the size and downsample (anti-aliased edges, like a photo)."""
    s = supersample
    img = Image.new("RGB", (image_size * s, image_size * s), background)
    draw = ImageDraw.Draw(img)
    for sh in shapes:
        x, y, r = sh.x * s, sh.y * s, sh.r * s
        fill = COLORS[sh.color]
        if sh.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif sh.kind == "square":
            h = r * 0.85  # equal visual weight to a circle of radius r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:
            draw.polygon(
                [
                    (x, y - r),
                    (x - r * math.sqrt(3) / 2 * 1.05, y + r * 0.6),
                    (x + r * math.sqrt(3) / 2 * 1.05, y + r * 0.6),
                ],
                fill=fill,
            )
    return img.reduce(s)  # box-filter average of s x s blocks: cheap, and anti-aliased


def _counts_phrase(shapes: list[Shape]) -> str:
    """ "two circles and a triangle"."""
    parts = []
    for kind in SHAPES:
        k = sum(sh.kind == kind for sh in shapes)
        if k:
            parts.append(_a(kind) if k == 1 else f"{NUMBER_WORDS[k]} {kind}s")
    return _join(parts)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_captions(rng: random.Random, shapes: list[Shape]) -> list[str]:
    """Five captions from distinct templates; objects in reading order."""
    if len(shapes) == 1:
        sh = shapes[0]
        c, k, z, p = sh.color, sh.kind, sh.size, sh.pos
        pool = [
            f"{_a(c, k)}.",
            f"{_a(z, c, k)} at the {p}.",
            f"there is {_a(c, k)} at the {p}.",
            f"{_a(c, k)} on a plain background.",
            f"a single {z} {c} {k}.",
            f"an image of {_a(c, k)}.",
            f"one {c} {k} at the {p} of the image.",
            f"a picture with {_a(z, c, k)}.",
        ]
    else:
        n = NUMBER_WORDS[len(shapes)]
        plain = _join([_a(sh.color, sh.kind) for sh in shapes])
        with_pos = _join([f"{_a(sh.color, sh.kind)} at the {sh.pos}" for sh in shapes])
        with_size = _join([_a(sh.size, sh.color, sh.kind) for sh in shapes])
        counts = _counts_phrase(shapes)
        pool = [
            f"{plain}.",
            f"{n} shapes: {plain}.",
            f"there are {n} shapes: {plain}.",
            f"{with_pos}.",
            f"an image with {plain}.",
            f"{n} shapes on a plain background: {plain}.",
            f"a picture of {counts}: {plain}.",
            f"{with_size}.",
        ]
    return rng.sample(pool, 5)


def make_answers(rng: random.Random, answer: str, kind: str) -> list[dict[str, Any]]:
    """Ten annotator answers: mostly ``answer``, some synonyms, some plausible mistakes.

    The right answer always holds a strict plurality (at least 5 of 10) so it is the official
    ``multiple_choice_answer``; a model answering it scores 100 on the question.
    """
    while True:
        out = []
        for _ in range(10):
            u = rng.random()
            if u < 0.82:
                out.append((answer, "yes"))
            elif u < 0.93:
                if kind == "number":
                    syn = [NUMBER_WORDS[int(answer)]]
                else:
                    syn = SYNONYMS.get(answer, [])
                out.append((rng.choice(syn), "yes") if syn else (answer, "maybe"))
            else:
                if kind == "number":
                    wrong = [str(v) for v in (int(answer) - 1, int(answer) + 1) if v >= 0]
                elif kind == "position":
                    wrong = [p for p in CELLS.values() if p != answer and (p in answer or answer in p)] or [
                        "center"
                    ]
                else:
                    wrong = CONFUSIONS.get(answer, [])
                out.append((rng.choice(wrong), rng.choice(("maybe", "no"))) if wrong else (answer, "maybe"))
        texts = [a for a, _ in out]
        best = texts.count(answer)
        if best >= 5 and all(texts.count(t) < best for t in set(texts) - {answer}):
            return [{"answer": a, "answer_confidence": c, "answer_id": i + 1} for i, (a, c) in enumerate(out)]


def make_questions(rng: random.Random, shapes: list[Shape]) -> list[dict[str, Any]]:
    """One question of each type: colour, shape, count, position, yes/no."""
    qs = []
    kinds = [sh.kind for sh in shapes]

    sh = rng.choice(shapes)
    q = (
        f"what color is the {sh.kind}?"
        if kinds.count(sh.kind) == 1
        else f"what color is the {sh.kind} at the {sh.pos}?"
    )
    qs.append((q, "what color is the", "other", sh.color, "color"))

    sh = rng.choice(shapes)
    qs.append((f"what shape is the {sh.color} object?", "what shape is the", "other", sh.kind, "shape"))

    if rng.random() < 0.4:
        qs.append(("how many shapes are there?", "how many", "number", str(len(shapes)), "number"))
    else:
        kind = rng.choice(SHAPES)
        qs.append((f"how many {kind}s are there?", "how many", "number", str(kinds.count(kind)), "number"))

    sh = rng.choice(shapes)
    qs.append((f"where is the {sh.color} {sh.kind}?", "where is the", "other", sh.pos, "position"))

    present = {(s.color, s.kind) for s in shapes}
    if rng.random() < 0.5:
        sh = rng.choice(shapes)
        color, kind, ans = sh.color, sh.kind, "yes"
    else:
        ref = rng.choice(shapes)
        absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
        hard = [(c, k) for c, k in absent if c == ref.color or k == ref.kind]  # shares colour or shape
        color, kind = rng.choice(hard if hard and rng.random() < 0.3 else absent)
        ans = "no"
    qs.append((f"is there {_a(color, kind)}?", "is there a", "yes/no", ans, "yesno"))

    return [
        {
            "question": q,
            "question_type": qt,
            "answer_type": at,
            "multiple_choice_answer": a,
            "answers": make_answers(rng, a, kind),
        }
        for q, qt, at, a, kind in qs
    ]


def generate_image(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, Any]:
    """Everything about one image, from (seed, split, index) alone."""
    rng = random.Random(f"shapes/{seed}/{split}/{index}")
    shapes = sample_scene(rng, image_size)
    g = rng.randint(200, 240)
    background = (g + rng.randint(-8, 8), g + rng.randint(-8, 8), g + rng.randint(-8, 8))
    img = render(shapes, image_size, background)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, subsampling=0)
    return {
        "image_id": ID_OFFSET[split] + index,
        "jpeg": buf.getvalue(),
        "width": image_size,
        "height": image_size,
        "captions": make_captions(rng, shapes),
        "questions": make_questions(rng, shapes),
        "shapes": [(s.kind, s.color, s.size, s.pos) for s in shapes],
    }


def _generate_batch(args: tuple[int, str, int, int, int]) -> list[dict[str, Any]]:
    seed, split, start, stop, image_size = args
    return [generate_image(seed, split, i, image_size) for i in range(start, stop)]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def generate_shapes(
    out: str | Path,
    num_train: int = 4000,
    num_val: int = 500,
    num_test: int = 500,
    seed: int = 0,
    image_size: int = 64,
    workers: int = 0,
) -> dict[str, Any]:
    """Write the raw files in the official formats under ``out``::

        images/<split>/<image_id:012d>.jpg
        captions_<split>.json                       COCO Captions
        v2_OpenEnded_shapes_<split>_questions.json  VQAv2 questions
        v2_shapes_<split>_annotations.json          VQAv2 annotations (test too: scored locally)
        dataset_shapes.json                         Karpathy-format split file of all three

    Returns ``{"root", "captions": {split: path}, "questions": {...}, "annotations": {...}, "images": {...}, "karpathy"}``.
    """
    out = Path(out)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, n in counts.items():
        if n < 0 or n >= 1_000_000:
            raise ValueError(f"num_{split}={n} must be in [0, 999999]")
    result: dict[str, Any] = {"root": out, "captions": {}, "questions": {}, "annotations": {}, "images": {}}
    karpathy: list[dict[str, Any]] = []
    info = {
        "description": f"vlm_mamba synthetic shapes (seed={seed}, image_size={image_size})",
        "version": "1.0",
    }
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        for split, n in counts.items():
            if n == 0:
                continue
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            step = 256
            jobs = [(seed, split, s, min(s + step, n), image_size) for s in range(0, n, step)]
            batches = pool.map(_generate_batch, jobs) if pool else map(_generate_batch, jobs)
            images, caps, questions, anns = [], [], [], []
            for batch in batches:
                for rec in batch:
                    iid = rec["image_id"]
                    fname = f"{iid:012d}.jpg"
                    (img_dir / fname).write_bytes(rec["jpeg"])
                    images.append(
                        {"id": iid, "file_name": fname, "width": rec["width"], "height": rec["height"]}
                    )
                    caps += [
                        {"id": iid * 10 + k, "image_id": iid, "caption": c}
                        for k, c in enumerate(rec["captions"])
                    ]
                    for k, q in enumerate(rec["questions"]):
                        qid = iid * 10 + k
                        questions.append({"image_id": iid, "question": q["question"], "question_id": qid})
                        anns.append({"question_id": qid, "image_id": iid, **q})
                    karpathy.append(
                        {
                            "filepath": split,
                            "filename": fname,
                            "cocoid": iid,
                            "imgid": len(karpathy),
                            "split": split,
                            "sentids": [iid * 10 + k for k in range(len(rec["captions"]))],
                            "sentences": [
                                {
                                    "raw": c,
                                    "tokens": c.rstrip(".").replace(",", "").split(),
                                    "imgid": len(karpathy),
                                    "sentid": iid * 10 + k,
                                }
                                for k, c in enumerate(rec["captions"])
                            ],
                        }
                    )
            cpath = out / f"captions_{split}.json"
            _write_json(cpath, {"info": info, "licenses": [], "images": images, "annotations": caps})
            qpath = out / f"v2_OpenEnded_shapes_{split}_questions.json"
            header = {
                "info": info,
                "task_type": "Open-Ended",
                "data_type": "shapes",
                "license": {},
                "data_subtype": split,
            }
            _write_json(qpath, {**header, "questions": questions})
            apath = out / f"v2_shapes_{split}_annotations.json"
            _write_json(apath, {"info": info, "license": {}, "data_subtype": split, "annotations": anns})
            result["captions"][split], result["questions"][split], result["annotations"][split] = (
                cpath,
                qpath,
                apath,
            )
            result["images"][split] = img_dir
    finally:
        if pool is not None:
            pool.shutdown()
    kpath = out / "dataset_shapes.json"
    _write_json(kpath, {"dataset": "shapes", "images": karpathy})
    result["karpathy"] = kpath
    return result


def build_shapes_dataset(
    root: str | Path,
    n_train: int = 4000,
    n_val: int = 500,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = 64,
    vocab_size: int = 512,
    shard_size: int = 1000,
    workers: int = 0,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate the shapes files under ``root/raw/shapes`` and prepare every split and the tokenizer.

    Writes ``root/shapes/<split>/`` (captions), ``root/shapes_vqa/<split>/`` (VQA) and one tokenizer
    trained on all training text, saved as ``root/shapes/tokenizer.json`` and
    ``root/shapes_vqa/tokenizer.json`` (identical, so the mix DataModule works with either). ``root`` is
    ``paths.data_dir``. A second call with the same arguments returns at once (``force`` rebuilds).

    Returns:
        ``{"data_dir", "raw", "shapes": {split: dir}, "shapes_vqa": {split: dir}, "tokenizer"}``.
    """
    root = Path(root)
    params = {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
        "vocab_size": vocab_size,
        "shard_size": shard_size,
        "version": 1,
    }
    stamp = root / "shapes" / ".build.json"
    splits = [s for s, n in zip(SPLITS, (n_train, n_val, n_test)) if n > 0]
    result: dict[str, Any] = {
        "data_dir": root,
        "raw": root / "raw" / "shapes",
        "shapes": {s: root / "shapes" / s for s in splits},
        "shapes_vqa": {s: root / "shapes_vqa" / s for s in splits},
        "tokenizer": root / "shapes" / "tokenizer.json",
    }
    outputs = [
        *result["shapes"].values(),
        *result["shapes_vqa"].values(),
        result["tokenizer"],
        root / "shapes_vqa" / "tokenizer.json",
    ]
    if (
        not force
        and stamp.is_file()
        and json.loads(stamp.read_text()) == params
        and all(p.exists() for p in outputs)
    ):
        log.info("shapes dataset already built in %s", root)
        return result
    stamp.unlink(missing_ok=True)
    raw = generate_shapes(result["raw"], n_train, n_val, n_test, seed, image_size, workers)
    for split in splits:
        prepare_coco(
            images=raw["images"][split],
            out=root,
            annotations=raw["captions"][split],
            dataset="shapes",
            split=split,
            shard_size=shard_size,
            train_tokenizer=False,
            progress=progress,
            workers=workers,
        )
        prepare_vqav2(
            questions=raw["questions"][split],
            images=raw["images"][split],
            out=root,
            annotations=raw["annotations"][split],
            dataset="shapes_vqa",
            split=split,
            shard_size=shard_size,
            train_tokenizer=False,
            progress=progress,
            workers=workers,
        )
    texts = [CAPTION_PROMPT, VQA_PROMPT.format(q="")]
    if "train" in raw["captions"]:
        caps = json.loads(raw["captions"]["train"].read_text())["annotations"]
        anns = json.loads(raw["annotations"]["train"].read_text())["annotations"]
        texts += [c["caption"] for c in caps] + [f"{a['multiple_choice_answer']}" for a in anns]
        texts += [
            VQA_PROMPT.format(q=q["question"])
            for q in json.loads(raw["questions"]["train"].read_text())["questions"]
        ]
        texts += [x["answer"] for a in anns for x in a["answers"]]
    tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    tok.save(root / "shapes" / "tokenizer.json")
    tok.save(root / "shapes_vqa" / "tokenizer.json")
    stamp.write_text(json.dumps(params))
    return result
