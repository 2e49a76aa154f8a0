"""Evaluation: generation over a split -> official results files -> official metrics -> report.

The logic behind ``evaluate.py`` (which only composes the Hydra config and calls :func:`main`):

- ``mode=eval``: load a checkpoint (Lightning ``.ckpt`` or a ``save_pretrained`` directory), run
  batched generation over a split (beam search for captions, short greedy answers for VQA, both
  configurable), write the results in the official formats (COCO ``[{"image_id", "caption"}]``;
  VQAv2 ``[{"question_id", "answer"}]``, the test-dev submission file), the split's ground truth
  in the official formats (so score-only mode reproduces every number), ``metrics.json``, a table,
  and a picture of sample predictions. VQA goes through the image-state cache: each image is
  encoded and prefilled once, its state forked for its questions.
- ``mode=score``: score an existing results file against official annotation files, no model.
- ``mode=predict``: caption one image, or answer a question about it.

Under ``torchrun`` every rank evaluates its share of the split (the DataModules split samples
across ranks and workers, each exactly once) and rank 0 gathers, scores and writes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .formats import write_metrics, write_results
from .tasks import collect_predictions, gather, predict_batch, score, summary

log = logging.getLogger(__name__)

TASKS = ("coco_caption", "vqav2")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (a file, record, field or option), reported by
    ``evaluate.py`` as one line; anything else (a CUDA error, a bug) keeps its traceback."""
    from .metrics import CaptionMetricError, JavaNotFoundError

    return (ValueError, FileNotFoundError, FileExistsError, JavaNotFoundError, CaptionMetricError)


DEFAULT_DATASET = {"coco_caption": "shapes", "vqav2": "shapes_vqa"}


# ---------------------------------------------------------------------- loading
def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(VLMamba in eval mode, TextTokenizer or None) from a Lightning ``.ckpt`` (a file, or the
    folder of a sharded ``trainer=fsdp`` run: each rank reads the whole model) or a
    ``VLMamba.save_pretrained`` directory."""
    from ..data.tokenizer import TextTokenizer
    from ..models.hub import (
        is_sharded_checkpoint,
        load_checkpoint,
        model_from_checkpoint,
        tokenizer_from_checkpoint,
    )
    from ..models.vlm import VLMamba

    path = Path(path)
    sharded = is_sharded_checkpoint(path)
    if path.is_dir() and not sharded:
        model = VLMamba.from_pretrained(path, map_location=device)
        tok = TextTokenizer.load(path) if (path / "tokenizer.json").is_file() else None
        return model.eval(), tok
    if not (path.is_file() or sharded):
        raise FileNotFoundError(
            f"checkpoint {path} not found (give a .ckpt file or a save_pretrained directory)"
        )
    ckpt = load_checkpoint(path)  # weights_only=True; the run's own inputs are not needed
    return model_from_checkpoint(ckpt).to(device).eval(), tokenizer_from_checkpoint(ckpt)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------- generation
# ---------------------------------------------------------------------- entry points
def _init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def build_datamodule(cfg: Mapping[str, Any], model, tokenizer):
    """The task's DataModule over ``cfg.split``, transforms matching the model's vision config."""
    from ..data.datamodules import CaptionDataModule, VQADataModule

    v = model.config.vision
    kw = dict(
        data_dir=str(cfg["data_dir"]),
        dataset=cfg.get("dataset") or DEFAULT_DATASET[cfg["task"]],
        val_split=None,
        test_split=cfg.get("split") or "test",
        batch_size=int(cfg["batch_size"]),
        num_workers=int(cfg.get("num_workers", 0)),
        vision_mode=model.config.vision_mode,
        img_size=v.img_size,
        patch_size=v.patch_size,
        max_img_size=v.max_img_size,
        build_shapes_if_missing=False,
    )
    if cfg.get("prompt") is not None:
        kw["prompt"] = cfg["prompt"]
    dm = (CaptionDataModule if cfg["task"] == "coco_caption" else VQADataModule)(**kw)
    if tokenizer is not None:
        dm.tokenizer = tokenizer
    return dm


def run_eval(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """mode=eval: generate over the split, write results + ground truth + metrics + report."""
    from .report import draw_predictions, metrics_text

    task, split = cfg["task"], cfg.get("split") or "test"
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")
    if not cfg.get("ckpt_path"):
        raise ValueError("mode=eval needs ckpt_path=<.ckpt file or save_pretrained directory>")
    rank, world = _init_distributed()
    device = resolve_device(cfg.get("device", "auto"))
    model, tokenizer = load_model(cfg["ckpt_path"], device)
    dm = build_datamodule(cfg, model, tokenizer)
    loader = dm.test_dataloader()
    gen = dict(cfg["generation"][task])
    results, refs, samples = collect_predictions(
        model,
        tokenizer,
        loader,
        task,
        gen,
        device,
        max_samples=cfg.get("max_samples"),
        keep_images=int(cfg.get("report_samples", 12)),
        progress=rank == 0,
    )
    results, refs = gather(results), gather(refs)
    if rank != 0:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "captions" if task == "coco_caption" else "vqa"
    res_path = write_results(results, out_dir / f"{kind}_{split}_results.json")
    metrics, gt_paths = score(task, results, refs, split, out_dir, cfg.get("caption_metrics"))
    payload = {
        "task": task,
        "split": split,
        "checkpoint": str(cfg["ckpt_path"]),
        "generation": gen,
        "num_samples": len(results),
        "metrics": metrics,
    }
    write_metrics(payload, out_dir / "metrics.json")
    if samples:
        draw_predictions(samples, out_dir / f"samples_{task}_{split}.png", title=f"{task} / {split}")
    if cfg.get("print_metrics", True):  # `make demo` prints one table of both tasks instead
        print(metrics_text({task: {split: summary(task, metrics)}}))
    log.info("results %s, ground truth %s, metrics %s", res_path, gt_paths, out_dir / "metrics.json")
    return payload


def run_score(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """mode=score: official-tool style scoring of an existing results file (no model)."""
    from .metrics import score_caption_files, score_vqa_files
    from .report import metrics_text

    task = cfg["task"]
    split = cfg.get("split") or _split_name(cfg["annotations"])
    if not cfg.get("results") or not cfg.get("annotations"):
        raise ValueError(
            "score-only mode needs results=R.json and annotations=A.json (and questions=Q.json for vqav2)"
        )
    if task == "coco_caption":
        metrics = score_caption_files(
            cfg["results"], cfg["annotations"], allow_partial=bool(cfg.get("allow_partial"))
        )
    elif task == "vqav2":
        metrics = score_vqa_files(cfg["results"], cfg["annotations"], cfg.get("questions"))
    else:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")
    payload = {"task": task, "split": split, "results": str(cfg["results"]), "metrics": metrics}
    write_metrics(payload, out_dir / "metrics.json")
    print(metrics_text({task: {split: summary(task, metrics)}}))
    return payload


def _split_name(annotations_path: str | Path) -> str:
    """The split an official annotation file describes (its ``data_subtype``), else its file name."""
    from .formats import read_json

    data = read_json(annotations_path, what="annotations")
    sub = data.get("data_subtype") if isinstance(data, dict) else None
    return str(sub) if sub else Path(annotations_path).stem


def run_predict(cfg: Mapping[str, Any]) -> str:
    """mode=predict: caption ``image``, or answer ``question`` about it."""
    from ..data.collate import Processor, pad_left
    from ..data.images import load_image
    from ..data.prompts import CAPTION_PROMPT, VQA_PROMPT, caption_prompt, vqa_prompt

    if not cfg.get("ckpt_path") or not cfg.get("image"):
        raise ValueError("mode=predict needs ckpt_path=... and image=photo.jpg (question=... to ask one)")
    device = resolve_device(cfg.get("device", "auto"))
    model, tok = load_model(cfg["ckpt_path"], device)
    if tok is None:
        raise ValueError(f"{cfg['ckpt_path']} carries no tokenizer: cannot read a prompt or write text")
    v = model.config.vision
    proc = Processor(
        tokenizer=tok,
        vision_mode=model.config.vision_mode,
        img_size=v.img_size,
        patch_size=v.patch_size,
        max_img_size=v.max_img_size,
    )
    batch = proc.stack_images(
        [proc.transform(load_image(cfg["image"]))]
    )  # images (1, 3, H, W) [+ image_sizes]
    question = cfg.get("question")
    if question:
        prompt, task = vqa_prompt(question, cfg.get("prompt") or VQA_PROMPT), "vqav2"
    else:
        prompt, task = caption_prompt(cfg.get("prompt") or CAPTION_PROMPT), "coco_caption"
    batch["prompt_ids"], batch["prompt_mask"] = pad_left(
        [[tok.bos_token_id] + tok.encode(prompt)], tok.pad_token_id
    )
    answer = predict_batch(model, tok, batch, cfg["generation"][task], device)[0]
    print(answer)
    return answer
