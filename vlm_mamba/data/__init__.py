"""Data: preparation of COCO / Karpathy / VQAv2 (and the synthetic shapes set) into webdataset shards,
the tokenizer, and the streaming DataModules.

Layout under ``paths.data_dir`` (default ``data/``)::

    raw/shapes/                 the generated shapes files in the official formats (build_shapes_dataset)
    <dataset>/tokenizer.json    byte-level BPE trained on the train split's text (+ tokenizer_config.json)
    <dataset>/<split>/          shard-*.tar, manifest.json, ground truth (captions.json | questions.json
                                + annotations.json) in the official formats, restricted to written images

Dataset folder names: ``coco`` (COCO Captions, official or Karpathy splits; prepare_coco.py),
``vqav2`` (prepare_vqav2.py), ``shapes`` (synthetic, captions) and ``shapes_vqa`` (synthetic, VQA).
Split folder names: ``train``, ``val``, ``test`` (and ``test-dev`` for VQAv2).

DataModules (Hydra ``_target_``): :class:`CaptionDataModule`, :class:`VQADataModule`,
:class:`MixDataModule`. Batches follow docs/interfaces.md "Batches".
"""

from .coco import prepare_coco
from .collate import IGNORE_INDEX, Processor
from .images import ImageDecodeError, load_image
from .prompts import CAPTION_PROMPT, VQA_PROMPT, clean_generation
from .records import AnnotationError
from .shapes import build_shapes_dataset, generate_shapes
from .shards import PrepareError, read_manifest
from .tokenizer import TextTokenizer, train_bpe_tokenizer
from .vqav2 import prepare_vqav2

__all__ = [
    "CAPTION_PROMPT",
    "IGNORE_INDEX",
    "VQA_PROMPT",
    "AnnotationError",
    "CaptionDataModule",
    "ImageDecodeError",
    "MixDataModule",
    "PrepareError",
    "Processor",
    "TextTokenizer",
    "VQADataModule",
    "build_shapes_dataset",
    "clean_generation",
    "generate_shapes",
    "load_image",
    "prepare_coco",
    "prepare_vqav2",
    "read_manifest",
    "train_bpe_tokenizer",
]


def __getattr__(name: str):
    # The DataModules import Lightning; the prepare CLIs should not pay for it.
    if name in ("CaptionDataModule", "VQADataModule", "MixDataModule"):
        from . import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module 'vlm_mamba.data' has no attribute {name!r}")
