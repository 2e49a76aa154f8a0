"""evaluate.py end to end: a tiny model trained on shapes, both tasks, official files, score-only
reproduction, predict mode, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_mamba import create_model
from vlm_mamba.data.datamodules import MixDataModule
from vlm_mamba.data.shapes import build_shapes_dataset
from vlm_mamba.data.tokenizer import TextTokenizer
from vlm_mamba.demo import caption_baseline, vqa_baseline

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """shapes data + a tiny model trained for a few dozen steps on captions and VQA, saved."""
    root = tmp_path_factory.mktemp("eval")
    info = build_shapes_dataset(root / "data", n_train=200, n_val=16, n_test=16, seed=3)
    tok = TextTokenizer.load(info["tokenizer"])
    torch.manual_seed(0)
    model = create_model("tiny", language={"vocab_size": tok.vocab_size}, **tok.special_ids())
    dm = MixDataModule(
        data_dir=str(root / "data"),
        batch_size=16,
        samples_per_epoch=16 * 40,
        img_size=32,
        patch_size=8,
        seed=0,
        build_shapes_if_missing=False,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for batch in dm.train_dataloader():
        loss = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(root / "model", tokenizer=tok)
    return root, info


# the caption run starts METEOR's Java process (~20 s on 2 cores): slow; vqav2 covers the same flow
@pytest.mark.parametrize("task", [pytest.param("coco_caption", marks=pytest.mark.slow), "vqav2"])
def test_eval_then_score_only_reproduces(trained, task):
    root, info = trained
    out = root / f"eval_{task}"
    r = _run(
        "evaluate.py",
        f"ckpt_path={root / 'model'}",
        f"task={task}",
        f"data_dir={root / 'data'}",
        "split=test",
        "batch_size=8",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["task"] == task
    assert "test" in r.stdout  # the split name stands beside the printed numbers
    assert (out / f"samples_{task}_test.png").stat().st_size > 1000
    if task == "coco_caption":
        results = json.loads((out / "captions_test_results.json").read_text())
        gt = json.loads((out / "captions_test_gt.json").read_text())
        assert len(results) == 16 and {r["image_id"] for r in results} == {i["id"] for i in gt["images"]}
        assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
        assert {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics["metrics"])
        official = sorted(Path(info["raw"]).glob("captions_test*.json"))[0]
        score_args = [f"results={out / 'captions_test_results.json'}", f"annotations={official}"]
    else:
        results = json.loads((out / "vqa_test_results.json").read_text())
        qs = json.loads((out / "vqa_test_questions.json").read_text())["questions"]
        assert {r["question_id"] for r in results} == {q["question_id"] for q in qs}
        assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in results)
        assert {"overall", "perAnswerType", "perQuestionType"} <= set(metrics["metrics"])
        official_a = sorted(Path(info["raw"]).glob("*test*_annotations.json"))[0]
        official_q = sorted(Path(info["raw"]).glob("*test*_questions.json"))[0]
        score_args = [
            f"results={out / 'vqa_test_results.json'}",
            f"annotations={official_a}",
            f"questions={official_q}",
        ]
    # score-only, against the generator's official files: the same numbers
    r = _run("evaluate.py", f"task={task}", *score_args, f"hydra.run.dir={out}_score")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((Path(f"{out}_score") / "metrics.json").read_text())["metrics"]
    for key, value in metrics["metrics"].items():
        assert again[key] == value, key


def test_predict_one_image(trained, tmp_path):
    root, info = trained
    img = sorted((Path(info["raw"]) / "images").rglob("*.jpg"))[0]
    r = _run(
        "evaluate.py",
        "mode=predict",
        f"ckpt_path={root / 'model'}",
        f"image={img}",
        "question=what color is the circle?",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()


def test_score_only_errors_name_the_problem(trained, tmp_path):
    root, info = trained
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_id": 999999999, "answer": "red"}]))
    ann = sorted(Path(info["raw"]).glob("*test*_annotations.json"))[0]
    r = _run(
        "evaluate.py", "task=vqav2", f"results={bad}", f"annotations={ann}", f"hydra.run.dir={tmp_path / 'o'}"
    )
    assert r.returncode != 0 and "999999999" in r.stderr
    r = _run(
        "evaluate.py",
        "mode=eval",
        f"ckpt_path={tmp_path / 'missing.ckpt'}",
        f"hydra.run.dir={tmp_path / 'o2'}",
    )
    assert r.returncode != 0 and "missing.ckpt" in r.stderr


def test_trivial_baselines():
    train_caps = {"annotations": [{"caption": c} for c in ["a red circle", "a red circle", "two squares"]]}
    assert caption_baseline(train_caps, {"images": [{"id": 5}, {"id": 6}]}) == [
        {"image_id": 5, "caption": "a red circle"},
        {"image_id": 6, "caption": "a red circle"},
    ]
    train = {
        "annotations": [
            {"question_type": "what color is the", "multiple_choice_answer": "red"},
            {"question_type": "what color is the", "multiple_choice_answer": "red"},
            {"question_type": "what color is the", "multiple_choice_answer": "blue"},
            {"question_type": "how many", "multiple_choice_answer": "2"},
        ]
    }
    test = {
        "annotations": [
            {"question_id": 1, "question_type": "how many"},
            {"question_id": 2, "question_type": "what color is the"},
            {"question_id": 3, "question_type": "is there a"},
        ]
    }
    assert vqa_baseline(train, test) == [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": "red"},
        {"question_id": 3, "answer": "red"},
    ]


def test_evaluate_reports_bad_input_in_one_line_but_not_internal_errors():
    """evaluate.py turns the project's input errors into one line; a CUDA error or a bug is no
    input error and keeps its traceback (a bare RuntimeError used to be swallowed too)."""
    from vlm_mamba.evaluation.formats import ResultsError
    from vlm_mamba.evaluation.metrics import JavaNotFoundError
    from vlm_mamba.evaluation.run import user_errors

    caught = user_errors()
    for err in (
        ResultsError("results.json: record 3 has no 'answer'"),
        FileNotFoundError("x"),
        JavaNotFoundError("java"),
    ):
        assert isinstance(err, caught)
    for err in (
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        KeyError("bug"),
        TypeError("bug"),
    ):
        assert not isinstance(err, caught)
