"""Official evaluation metrics: VQAv2 accuracy (:mod:`.vqa`) and the COCO caption metrics (:mod:`.captions`)."""

from .captions import (
    CAPTION_METRICS,
    CaptionMetricError,
    JavaNotFoundError,
    caption_metrics,
    score_caption_files,
    score_captions,
    spice_unavailable_reason,
)
from .vqa import (
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    score_vqa_files,
    vqa_accuracy,
    vqa_question_accuracy,
)

__all__ = [
    "CAPTION_METRICS",
    "CaptionMetricError",
    "JavaNotFoundError",
    "caption_metrics",
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
    "score_caption_files",
    "score_captions",
    "score_vqa_files",
    "spice_unavailable_reason",
    "vqa_accuracy",
    "vqa_question_accuracy",
]
