"""VQAv2 accuracy on hand-built cases, caption metrics against pycocoevalcap, results validation.

The VQA expectations are computed by hand from the official algorithm (vqaEval.py at a013f00); the
caption expectations come from pycocoevalcap itself, called the documented way (PTBTokenizer, then
each scorer's ``compute_score``) and through ``COCOEvalCap.evaluate`` with SPICE stubbed out.
Java start-ups dominate the time, so each full scoring runs once per module (fixtures below).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vlm_mamba.evaluation.formats import (
    AnnotationError,
    ResultsError,
    load_caption_annotations,
    load_vqa_annotations,
    validate_caption_results,
    validate_vqa_results,
    write_metrics,
)
from vlm_mamba.evaluation.metrics import (
    CaptionMetricError,
    JavaNotFoundError,
    caption_metrics,
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    score_caption_files,
    score_captions,
    score_vqa_files,
    vqa_accuracy,
    vqa_question_accuracy,
)
from vlm_mamba.evaluation.metrics import captions as M

FIX = Path(__file__).parents[1] / "fixtures"
VQA_ANN, VQA_QUES, VQA_RES = (
    FIX / "vqa_annotations.json",
    FIX / "vqa_questions.json",
    FIX / "vqa_results.json",
)
CAP_ANN, CAP_RES = FIX / "caption_annotations.json", FIX / "caption_results.json"

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's scorers need Java")


def _load(path: Path):
    return json.loads(path.read_text())


def _vqa_split(answers: list[str], prediction: str, qtype: str = "what", atype: str = "other"):
    """One-question annotations / results dicts in the official structure."""
    ann = {
        "annotations": [
            {
                "question_id": 1,
                "image_id": 7,
                "question_type": qtype,
                "answer_type": atype,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
            }
        ]
    }
    return [{"question_id": 1, "answer": prediction}], ann


# =============================================================================================
# VQAv2 accuracy
# =============================================================================================


@pytest.mark.parametrize(
    ("answers", "prediction", "expected"),
    [
        # Unanimous answers are compared verbatim: normalisation would make these match.
        (["yes"] * 10, "Yes", 0.0),
        (["yes"] * 10, "yes", 1.0),
        (["2"] * 10, "two", 0.0),
        (["2"] * 10, "2", 1.0),
        # Not unanimous: all normalised. "red" matches 3 humans: the 3 red annotators see 2 of the
        # other nine (2/3), the 7 blue ones see 3 (1): (3 * 2/3 + 7) / 10.
        (["red"] * 3 + ["blue"] * 7, "Red", 0.9),
        (["2"] * 9 + ["two"], "two", 1.0),
        (["cat"] * 1 + ["dog"] * 9, "cat", 0.3),
        (["cat"] * 2 + ["dog"] * 8, "cat", 0.6),
        (["cat"] * 4 + ["dog"] * 6, "cat", 1.0),
        (["cat"] * 4 + ["dog"] * 6, "bird", 0.0),
        # Newline/tab -> space and strip happen before the unanimity test: these ten are unanimous.
        (["yes"] * 9 + ["yes\n"], "Yes", 0.0),
        (["yes"] * 9 + [" yes\t"], "yes", 1.0),
        (["yes"] * 10, " yes\t", 1.0),
        # Punctuation and articles (normalised because not unanimous).
        (["the dog"] * 4 + ["dog"] * 3 + ["a dog."] * 2 + ["Dog!"], "The Dog.", 1.0),
        # Contractions: "dont" -> "don't" on both sides; verbatim it would match only the 2 "dont".
        (["don't"] * 2 + ["dont"] * 2 + ["no"] * 6, "dont", 1.0),
    ],
)
def test_vqa_question_accuracy_hand_built(answers, prediction, expected):
    assert vqa_question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_red_blue_case_is_90_on_the_official_scale():
    results, ann = _vqa_split(["red"] * 3 + ["blue"] * 7, "Red", qtype="what color is the", atype="other")
    out = vqa_accuracy(results, ann)
    assert out["overall"] == 90.0
    assert out["perAnswerType"] == {"other": 90.0}
    assert out["perQuestionType"] == {"what color is the": 90.0}
    assert out["perQuestion"] == {1: 90.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),  # digit-comma-digit anywhere: every listed character is deleted
        ("a-b 1,2", "ab 12"),
        ("yes, it is", "yes it is"),  # "," before a space: deleted
        ("black/white", "black white"),  # no space around it: replaced by a space
        ("(left)", " left "),
        ("what?", "what "),
        ("don't", "don't"),  # "'" is not in the official list
        ("3.5", "3.5"),  # "." followed by a digit stays
        ("mr. smith", "mr smith"),
        ("e.g.", "eg"),
        ("3.", "3"),
        ("x" + "." * 40, "x" + "." * 8),  # at most re.UNICODE == 32 periods are deleted
    ],
)
def test_process_punctuation_matches_official_rules(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Three Dogs", "3 dogs"),
        ("an apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("twenty", "twenty"),  # manualMap stops at ten
        ("isnt", "isn't"),
        ("Im", "im"),  # capitalised keys of the official table never match after lowercasing
        ("  a   lot\tof ", "lot of"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_runs_punctuation_before_articles():
    # "the,dog": "," between letters becomes a space, then "the" is an article.
    assert normalize_vqa_answer("the,dog") == "dog"
    assert normalize_vqa_answer("Two.") == "2"


@pytest.fixture(scope="module")
def vqa_fixture_scores():
    return score_vqa_files(VQA_RES, VQA_ANN, VQA_QUES)


def test_vqa_per_type_aggregation_and_rounding(vqa_fixture_scores):
    """Per-question accuracies (hand-computed, see the fixture) -> means, rounded at the end."""
    out = vqa_fixture_scores
    # 0, 0, .9, 1, 1, 1, .6, 1, 1 -> 6.5 / 9 = 72.222...
    assert out["overall"] == 72.22
    assert out["perAnswerType"] == {"yes/no": 50.0, "number": 66.67, "other": 87.5}
    assert list(out["perAnswerType"]) == ["yes/no", "number", "other"]  # first-seen order
    assert out["perQuestionType"] == {
        "is the": 50.0,
        "how many": 66.67,  # (0 + 1 + 1) / 3
        "what color is the": 75.0,  # (.9 + .6) / 2
        "what is the": 100.0,
        "does the": 100.0,
    }
    assert out["perQuestion"] == {
        101: 0.0,
        102: 0.0,
        103: 90.0,
        201: 100.0,
        202: 100.0,
        203: 100.0,
        301: 60.0,
        302: 100.0,
        303: 100.0,
    }


def test_vqa_in_memory_equals_files_and_does_not_mutate(vqa_fixture_scores):
    results, ann, ques = _load(VQA_RES), _load(VQA_ANN), _load(VQA_QUES)
    before = json.dumps(ann)
    assert vqa_accuracy(results, ann, ques) == vqa_fixture_scores
    assert json.dumps(ann) == before  # the official evaluator normalises in place; we must not


def test_vqa_metrics_roundtrip_through_write_metrics(vqa_fixture_scores, tmp_path):
    path = write_metrics(vqa_fixture_scores, tmp_path / "run" / "metrics.json")
    back = json.loads(path.read_text())
    assert back["overall"] == vqa_fixture_scores["overall"]
    assert back["perAnswerType"] == vqa_fixture_scores["perAnswerType"]
    assert back["perQuestion"]["103"] == 90.0  # JSON object keys are strings
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


# --------------------------------------------------------------------------------- validation


def _ann_qids():
    return [a["question_id"] for a in _load(VQA_ANN)["annotations"]]


def test_vqa_results_missing_questions_are_named_with_count():
    results = _load(VQA_RES)[:3]
    with pytest.raises(
        ResultsError, match=r"no answer for question_ids 6 \(first 5: 201, 202, 203, 301, 302, \.\.\.\)"
    ):
        vqa_accuracy(results, _load(VQA_ANN))


def test_vqa_results_unknown_and_duplicate_ids_are_named():
    results = _load(VQA_RES)
    with pytest.raises(ResultsError, match=r"question_ids not in the annotations: 1 \(999\)"):
        validate_vqa_results([*results, {"question_id": 999, "answer": "x"}], _ann_qids())
    with pytest.raises(ResultsError, match=r"duplicate question_ids: 1 \(103\)"):
        validate_vqa_results([*results, {"question_id": 103, "answer": "x"}], _ann_qids())


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"question_id": 101, "answer": 3}, r"record \[0\] \(question_id 101\): field 'answer' must be str"),
        ({"question_id": 101}, r"record \[0\] \(question_id 101\): missing field 'answer'"),
        ({"question_id": True, "answer": "yes"}, r"record \[0\]: field 'question_id' must be int"),
        ({"question_id": "101", "answer": "yes"}, r"record \[0\]: field 'question_id' must be int"),
        ("yes", r"record \[0\]: expected a JSON object"),
    ],
)
def test_vqa_results_bad_records_name_record_and_field(record, pattern):
    with pytest.raises(ResultsError, match=pattern):
        validate_vqa_results([record], _ann_qids())


def test_vqa_questions_must_match_annotations():
    ques = _load(VQA_QUES)
    ques["questions"] = ques["questions"][1:] + [{"question_id": 555, "image_id": 1, "question": "?"}]
    with pytest.raises(
        AnnotationError, match=r"without annotation: 1 \(555\).*missing from the questions: 1 \(101\)"
    ):
        vqa_accuracy(_load(VQA_RES), _load(VQA_ANN), ques)


def test_annotation_loader_errors_name_file_record_and_field(tmp_path):
    bad = _load(VQA_ANN)
    del bad["annotations"][2]["answers"]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(
        AnnotationError, match=r"ann\.json: annotations\[2\] \(question_id 103\): missing field 'answers'"
    ):
        load_vqa_annotations(path)
    with pytest.raises(AnnotationError, match=r"does not exist"):
        load_vqa_annotations(tmp_path / "nope.json")
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"ann\.json' is not valid JSON"):
        load_vqa_annotations(path)
    caps = _load(CAP_ANN)
    del caps["images"]
    path.write_text(json.dumps(caps))
    with pytest.raises(AnnotationError, match=r"missing top-level field 'images'"):
        load_caption_annotations(path)


def test_results_file_must_be_a_list(tmp_path):
    path = tmp_path / "res.json"
    path.write_text(json.dumps({"question_id": 101, "answer": "yes"}))
    with pytest.raises(ResultsError, match=r"res\.json.*expected a JSON list"):
        score_vqa_files(path, VQA_ANN, VQA_QUES)


def test_caption_results_validation_names_ids():
    image_ids = [11, 12, 13, 14]
    ok = [{"image_id": 11, "caption": "a"}, {"image_id": 12, "caption": "b"}]
    with pytest.raises(ResultsError, match=r"no caption for image_ids 2 \(13, 14\).*allow_partial"):
        validate_caption_results(ok, image_ids)
    assert validate_caption_results(ok, image_ids, allow_partial=True) == {11: "a", 12: "b"}
    with pytest.raises(ResultsError, match=r"image_ids not in the annotations: 1 \(99\)"):
        validate_caption_results([*ok, {"image_id": 99, "caption": "c"}], image_ids, allow_partial=True)
    with pytest.raises(ResultsError, match=r"duplicate image_ids: 1 \(11\)"):
        validate_caption_results([*ok, {"image_id": 11, "caption": "c"}], image_ids, allow_partial=True)
    with pytest.raises(ResultsError, match=r"\(image_id 11\): field 'caption' must be str"):
        validate_caption_results([{"image_id": 11, "caption": ["a"]}], image_ids, allow_partial=True)


# =============================================================================================
# Caption metrics vs pycocoevalcap
# =============================================================================================


def _reference_scores(annotations: dict, results: list[dict]) -> dict[str, float]:
    """pycocoevalcap the documented way: PTBTokenizer on {id: [{"caption"}]}, then compute_score."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scored = {r["image_id"] for r in results}
    gts = {img["id"]: [] for img in annotations["images"] if img["id"] in scored}
    for a in annotations["annotations"]:
        if a["image_id"] in gts:
            gts[a["image_id"]].append({"caption": a["caption"]})
    res = {k: [{"caption": r["caption"]} for r in results if r["image_id"] == k] for k in gts}
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    out.update({f"Bleu_{i + 1}": b for i, b in enumerate(bleu)})
    out["METEOR"] = Meteor().compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@pytest.fixture(scope="module")
def caption_fixture_scores():
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap's scorers need Java")
    return score_caption_files(CAP_RES, CAP_ANN)


@needs_java
def test_caption_metrics_equal_pycocoevalcap_scorers(caption_fixture_scores):
    ours = caption_fixture_scores
    ref = _reference_scores(_load(CAP_ANN), _load(CAP_RES))
    assert [k for k in ours if k not in ("SPICE", "skipped")] == list(M.CAPTION_METRICS)
    for key in M.CAPTION_METRICS:
        assert ours[key] == pytest.approx(float(ref[key]), rel=1e-12, abs=1e-12), key
        assert type(ours[key]) is float  # numpy scalars converted, JSON-ready
    # Sanity that the fixture is discriminating: neither perfect nor zero.
    assert 0.0 < ours["Bleu_4"] < ours["Bleu_1"] < 1.0 and 0.0 < ours["CIDEr"] < 10.0


@needs_java
def test_caption_metrics_equal_cocoevalcap_without_spice(caption_fixture_scores, monkeypatch):
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:  # COCOEvalCap's Spice() would download Stanford CoreNLP
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(CAP_ANN))
        evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(str(CAP_RES)))
        evaluator.evaluate()
    for key in M.CAPTION_METRICS:
        assert caption_fixture_scores[key] == pytest.approx(
            float(evaluator.eval[key]), rel=1e-12, abs=1e-12
        ), key


def test_spice_skipped_with_reason_when_jars_absent(caption_fixture_scores):
    reason = M.spice_unavailable_reason()
    if reason is None:
        assert "SPICE" in caption_fixture_scores
    else:
        assert "stanford-corenlp-3.6.0" in reason
        assert caption_fixture_scores["skipped"] == {"SPICE": reason}
        assert "SPICE" not in caption_fixture_scores


@needs_java
def test_partial_results_score_only_captioned_images():
    """allow_partial scores the captioned images alone (CIDEr's idf too) like pycocoevalcap on them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    annotations, results = _load(CAP_ANN), _load(CAP_RES)[1:]
    with pytest.raises(ResultsError, match=r"no caption for image_ids 1 \(11\)"):
        caption_metrics(results, annotations)
    refs = {i: [a["caption"] for a in annotations["annotations"] if a["image_id"] == i] for i in (12, 13, 14)}
    ours = score_captions(
        refs, {r["image_id"]: r["caption"] for r in results}, metrics=["Bleu_4", "CIDEr"], spice=False
    )
    assert list(ours) == ["Bleu_4", "CIDEr", "skipped"]
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in results})
    with contextlib.redirect_stdout(io.StringIO()):
        bleu4 = Bleu(4).compute_score(gts, res)[0][3]
    assert ours["Bleu_4"] == pytest.approx(bleu4, rel=1e-12)
    assert ours["CIDEr"] == pytest.approx(float(Cider().compute_score(gts, res)[0]), rel=1e-12)


@needs_java
def test_line_breaks_inside_captions_do_not_shift_tokenized_lines():
    # pycocoevalcap replaces only "\n"; a "\r" or U+2028 could split a line in the Java tokenizer.
    out = M._tokenize({1: ["A red\rcircle.", "a\u2028red circle"], 2: ["Two blue squares!"]}, "references")
    assert out == {1: ["a red circle", "a red circle"], 2: ["two blue squares"]}


def test_tokenizer_output_that_does_not_line_up_is_an_error(monkeypatch):
    from pycocoevalcap.tokenizer import ptbtokenizer

    monkeypatch.setattr(ptbtokenizer.PTBTokenizer, "tokenize", lambda self, caps: {1: ["a b"]})
    with pytest.raises(CaptionMetricError, match=r"image_ids 1 \(2\)"):
        M._tokenize({1: ["a b"], 2: ["c d"]}, "predictions")


@needs_java
def test_tokenizer_success_line_is_dropped_and_other_java_stderr_kept(capfd):
    # the real Java tokenizer: its "PTBTokenizer tokenized N tokens at ..." line (once per call, drawn
    # across the progress bar) is dropped; the tokens are unchanged
    out = M._tokenize({1: ["A red circle."]}, "predictions")
    assert out == {1: ["a red circle"]}
    err = capfd.readouterr().err
    assert "PTBTokenizer tokenized" not in err
    # anything else the subprocess writes to fd 2 (a Java error) comes back on stderr and in the error
    with M._tokenizer_stderr() as kept:
        subprocess.run(
            [
                "sh",
                "-c",
                "echo 'PTBTokenizer tokenized 3 tokens at 9.50 tokens per second.' >&2; "
                "echo 'Exception in thread main' >&2",
            ],
            check=True,
        )
    assert kept == ["Exception in thread main"]
    err = capfd.readouterr().err
    assert "Exception in thread main" in err and "PTBTokenizer tokenized" not in err


def test_tokenizer_misalignment_error_carries_the_java_stderr(monkeypatch):
    from pycocoevalcap.tokenizer import ptbtokenizer

    def broken(self, caps):
        subprocess.run(["sh", "-c", "echo 'Error: could not find class' >&2"], check=True)
        return {}

    monkeypatch.setattr(ptbtokenizer.PTBTokenizer, "tokenize", broken)
    with pytest.raises(
        CaptionMetricError, match=r"image_ids 1 \(1\); java stderr: Error: could not find class"
    ):
        M._tokenize({1: ["a b"]}, "predictions")


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match=r"Java 17.*PTB tokenizer.*METEOR"):
        caption_metrics(_load(CAP_RES), _load(CAP_ANN))


@needs_java
def test_spice_used_when_available_and_failure_is_reported(monkeypatch):
    from pycocoevalcap.spice import spice as spice_mod

    calls = []

    class FakeSpice:
        def compute_score(self, gts, res):
            calls.append(sorted(res))
            return np.float64(0.25), []

    monkeypatch.setattr(M, "spice_unavailable_reason", lambda: None)
    monkeypatch.setattr(spice_mod, "Spice", FakeSpice)
    refs, preds = {1: ["a red circle"], 2: ["a blue square"]}, {1: "a red circle", 2: "a square"}
    out = score_captions(refs, preds, metrics=["CIDEr"])
    assert out["SPICE"] == 0.25 and type(out["SPICE"]) is float and "skipped" not in out
    assert calls == [[1, 2]]

    class BrokenSpice:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(spice_mod, "Spice", BrokenSpice)
    out = score_captions(refs, preds, metrics=["CIDEr"])
    assert "SPICE" not in out and out["skipped"]["SPICE"].startswith("SPICE failed: CalledProcessError")


@needs_java
def test_meteor_that_hangs_is_killed_and_reported(monkeypatch):
    """A stalled METEOR read is cut by the timeout; the Java process dies and the lock is freed
    (a held lock would deadlock Meteor.__del__ at garbage collection)."""
    from pycocoevalcap.meteor import meteor as meteor_mod

    seen = []

    def stalled_compute_score(self, gts, res):
        seen.append(self)
        self.lock.acquire()
        line = self.meteor_p.stdout.readline()  # METEOR got no request: blocks until killed
        return float(line.strip()), []  # b"" after the kill -> ValueError, lock still held

    monkeypatch.setattr(meteor_mod.Meteor, "compute_score", stalled_compute_score)
    with pytest.raises(CaptionMetricError, match=r"no answer within 0\.5 s"):
        M._meteor({1: ["a b"]}, {1: ["a b"]}, timeout_s=0.5)
    (scorer,) = seen
    assert scorer.meteor_p.poll() is not None
    assert not scorer.lock.locked()


def test_score_captions_rejects_unknown_metric_and_stray_ids():
    with pytest.raises(ValueError, match=r"unknown metrics \['SPIDEr'\]"):
        score_captions({1: ["a"]}, {1: "a"}, metrics=["SPIDEr"])
    with pytest.raises(ResultsError, match=r"without references: 1 \(2\)"):
        score_captions({1: ["a"]}, {1: "a", 2: "b"})


def test_write_metrics_is_strict_json_and_atomic(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics({"CIDEr": np.float64(1.5), "SPICE": math.nan, "n": np.int64(3)}, path)
    assert json.loads(path.read_text()) == {"CIDEr": 1.5, "SPICE": None, "n": 3}
    with pytest.raises(TypeError):
        write_metrics({"bad": object()}, path)
    assert json.loads(path.read_text())["CIDEr"] == 1.5  # the earlier file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
