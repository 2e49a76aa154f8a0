"""FSDP2 (``trainer=fsdp``, vlm_mamba/training/fsdp.py) against DDP, on the CPU over gloo, 2 processes.

torch 2.14's FSDP2 runs on the CPU with gloo (all-gather, reduce-scatter, fused AdamW on DTensor
shards, distributed checkpoints), so these tests need no GPU; ``benchmarks/fsdp_one_gpu.sh`` runs
the one-GPU bf16 check. The ``train.py`` runs are subprocesses (Lightning's launcher re-runs the
command line for rank 1); the unit tests spawn two gloo processes themselves.

Tolerances: FSDP2 reduce-scatters where DDP all-reduces, so gradients differ in summation order
only (fp32): losses agree to 1e-5 relative, weights after the run to 1e-5 (rtol 1e-4). A resumed
sharded run equals the uninterrupted one exactly.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vlm_mamba.training.fsdp import PAD_KEY, EvenBatches, FSDP2Strategy, fsdp_units, shard_model, unsharded

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """Shapes data whose validation split (15 images, eval batches of 7) splits unevenly: rank 0
    gets one batch of 7, rank 1 two batches (7 + 1)."""
    from vlm_mamba.data.shapes import build_shapes_dataset

    root = tmp_path_factory.mktemp("fsdp_data")
    build_shapes_dataset(root, n_train=48, n_val=15, n_test=8, shard_size=16, vocab_size=400)
    return root


def _args(data_dir: Path, run: Path, trainer: str, steps: int, *extra: str) -> list[str]:
    return [
        "model=tiny",
        f"trainer={trainer}",
        f"paths.data_dir={data_dir}",
        "data.batch_size=4",
        "data.eval_batch_size=7",
        "data.samples_per_epoch=16",
        "data.shuffle_buffer=8",
        "data.num_workers=0",
        "module.warmup_steps=1",
        f"module.total_steps={STEPS}",
        "module.val_generation.max_new_tokens=4",
        "trainer.limit_val_batches=1.0",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=3",
        f"trainer.max_steps={steps}",
        "+trainer.enable_progress_bar=false",
        "callbacks.model_summary=null",
        "callbacks.throughput=null",
        "callbacks.best_checkpoint=null",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "test=false",
        f"hydra.run.dir={run}",
        *extra,
    ]


def _train(args: list[str], cwd: Path, killed: bool = False) -> None:
    env = {**os.environ, "VLM_MAMBA_LOGS": str(cwd / "logs"), "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # tests.training.fault
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    # killed: SIGKILL (-9), or the launcher's observer ending rank 0 when rank 1 died first
    assert (r.returncode != 0) if killed else (r.returncode == 0), r.stdout[-2000:] + r.stderr[-4000:]


def _metrics(run: Path) -> tuple[dict[int, float], dict[str, list[float]]]:
    """(step -> train/loss, name -> values of every val/* metric) from the run's CSV logs."""
    losses: dict[int, float] = {}
    val: dict[str, list[float]] = {}
    for f in sorted(run.rglob("metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                losses[int(row["step"])] = float(row["train/loss"])
            for k, v in row.items():
                if k.startswith("val/") and v:
                    val.setdefault(k, []).append(float(v))
    return losses, val


@pytest.fixture(scope="module")
def runs(shapes_dir, tmp_path_factory) -> dict[str, Path]:
    """DDP and FSDP2 for 6 steps, validation with decoding at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    out = {name: tmp / name for name in ("ddp", "fsdp")}
    _train(_args(shapes_dir, out["ddp"], "ddp_sim", STEPS), tmp)
    _train(_args(shapes_dir, out["fsdp"], "fsdp_sim", STEPS), tmp)
    return out


@pytest.fixture(scope="module")
def resumed(shapes_dir, runs) -> Path:
    """FSDP2 towards 6 steps, SIGKILLed on every rank after step 4 (checkpoint at 3, mid-epoch), then
    a new run with ckpt_path=last to 6."""
    run = runs["fsdp"].parent / "part"
    kill = ["+callbacks.fault._target_=tests.training.fault.KillAtStep", "+callbacks.fault.step=4"]
    _train(_args(shapes_dir, run, "fsdp_sim", STEPS, *kill), run.parent, killed=True)
    _train(_args(shapes_dir, run, "fsdp_sim", STEPS, "ckpt_path=last"), run.parent)
    return run


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from vlm_mamba.models.hub import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


def test_fsdp_trains_like_ddp(runs):
    """Same losses at every step, same validation loss and decoded scores (the uneven validation
    shards padded and the padding dropped), same weights."""
    from vlm_mamba.models.hub import is_sharded_checkpoint

    assert is_sharded_checkpoint(runs["fsdp"] / "checkpoints" / "last.ckpt")  # a DCP folder
    ddp_loss, ddp_val = _metrics(runs["ddp"])
    fsdp_loss, fsdp_val = _metrics(runs["fsdp"])
    assert sorted(ddp_loss) == sorted(fsdp_loss) == list(range(STEPS))
    torch.testing.assert_close(
        torch.tensor([fsdp_loss[s] for s in range(STEPS)]),
        torch.tensor([ddp_loss[s] for s in range(STEPS)]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert set(ddp_val) == set(fsdp_val) and {"val/loss", "val/CIDEr", "val/Bleu_4"} <= set(fsdp_val)
    for key in ddp_val:
        torch.testing.assert_close(
            torch.tensor(fsdp_val[key]), torch.tensor(ddp_val[key]), rtol=1e-4, atol=1e-5
        )
    ddp, fsdp = _weights(runs["ddp"]), _weights(runs["fsdp"])
    assert sorted(ddp) == sorted(fsdp)
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_weight_decay_groups_by_name(runs, tmp_path):
    """The optimiser of the sharded run decays exactly the parameters param_groups decays on one
    device (FSDP1 put every parameter in no-decay); read from the sharded checkpoint with
    torch.distributed.checkpoint's format utils."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from vlm_mamba.config import VLMambaConfig
    from vlm_mamba.models.vlm import VLMamba
    from vlm_mamba.training.optim import param_groups

    dcp_to_torch_save(runs["fsdp"] / "checkpoints" / "last.ckpt", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    saved = {
        name: g["weight_decay"] for g in full["optimizer_0"]["param_groups"] for name in g["params"]
    }  # FQNs of the LightningModule
    hp = torch.load(runs["fsdp"] / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)[
        "hyper_parameters"
    ]
    plain = VLMamba(VLMambaConfig.model_validate(hp["model"]))
    expected = {
        f"model.{n}": g["weight_decay"]
        for g in param_groups(plain, hp["weight_decay"])
        for n in g["param_names"]
    }
    assert saved == expected
    assert {n for n, wd in saved.items() if wd > 0} >= {"model.language.layers.0.mixer.in_proj.weight"}
    assert saved["model.language.layers.0.mixer.A_log"] == 0.0  # 2-D, named no-decay
    assert saved["model.vision.pos_embed"] == 0.0


@pytest.mark.slow  # two more 2-process launches (~40 s on 2 cores)
def test_fsdp_resume_from_last_equals_uninterrupted(runs, resumed):
    """Killed (SIGKILL, every rank) after step 4 with the last checkpoint at step 3, resumed with
    ckpt_path=last: the sharded checkpoint restores model, optimiser, scheduler, data position and
    RNG, so the resumed steps 3..5 (step 3 is trained again) and the final weights are exact."""
    full, _ = _metrics(runs["fsdp"])
    part, _ = _metrics(resumed)  # the killed run's CSV rows were never flushed
    assert sorted(part)[-3:] == [3, 4, 5]
    assert [part[s] for s in (3, 4, 5)] == [full[s] for s in (3, 4, 5)]
    meta = torch.load(resumed / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == STEPS and "tokenizer_json" in meta
    a, b = _weights(runs["fsdp"]), _weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_export_of_a_sharded_checkpoint(runs, tmp_path):
    """python -m vlm_mamba.export reads the DCP folder; the exported model is the trained one (the
    checkpoint's weights exactly; DDP's within the tolerances above) and evaluate.py loads it too."""
    from vlm_mamba.evaluation.run import load_model
    from vlm_mamba.export import main as export_main
    from vlm_mamba.models.vlm import VLMamba

    ckpt = runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    model = VLMamba.from_pretrained(tmp_path / "out")
    trained = _weights(runs["fsdp"])
    exported = model.state_dict()
    assert sorted(f"model.{k}" for k in exported) == sorted(trained)
    for k, v in exported.items():
        assert torch.equal(v, trained[f"model.{k}"]), k
    ddp = _weights(runs["ddp"])
    for k, v in exported.items():
        torch.testing.assert_close(v, ddp[f"model.{k}"], rtol=1e-4, atol=1e-5)
    evaluated, tok = load_model(ckpt)
    assert tok is not None
    images, ids = torch.randn(1, 3, 32, 32), torch.tensor([[tok.bos_token_id, 5, 6]])
    assert torch.equal(evaluated(images, ids).logits, model.eval()(images, ids).logits)


# ---------------------------------------------------------------------- in-process units
def test_strategy_options():
    from vlm_mamba.training.run import ConfigError, fsdp_strategy

    with pytest.raises(ValueError, match="gradient_checkpointing"):
        FSDP2Strategy(activation_checkpointing=True)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        fsdp_strategy(activation_checkpointing=True)
    with pytest.raises(ConfigError, match="HYBRID_SHARD"):
        fsdp_strategy(sharding_strategy="HYBRID_SHARD")
    s = fsdp_strategy(sharding_strategy="SHARD_GRAD_OP", state_dict_type="full")
    assert isinstance(s, FSDP2Strategy) and not s.reshard_after_forward and not s._save_distributed_checkpoint
    with pytest.raises(ValueError, match="param_dtype"):
        FSDP2Strategy(param_dtype="fp8")


def test_fsdp1_is_refused_by_the_module():
    from lightning.pytorch.strategies import FSDPStrategy

    from vlm_mamba.registry import get_config
    from vlm_mamba.training.module import VLMambaLitModule

    module = VLMambaLitModule(get_config("tiny"))

    class _Trainer:
        strategy = FSDPStrategy()

    module._trainer = _Trainer()
    with pytest.raises(ValueError, match="FSDP1"):
        module.configure_optimizers()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, world)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int = 2) -> dict:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), fn, out), nprocs=world, join=True)
    return dict(out)


def _even_batches(rank: int, world: int):
    # rank 0 has 3 batches, rank 1 none at all: it receives a template to pad with (the uneven
    # but non-empty case, 1 batch against 2, is the train.py runs' validation split)
    sizes = {0: [2, 2, 1], 1: []}[rank]
    batches, i = [], 0
    for n in sizes:
        batches.append({"ids": torch.arange(i, i + n)})
        i += n
    loader = EvenBatches(batches, "cpu")
    seen = [(bool(b.get(PAD_KEY, False)), b["ids"].tolist()) for b in loader]
    return len(loader), seen


def test_even_batches_pads_uneven_shards_and_flags_the_padding():
    out = _spawn(_even_batches)
    assert {out[r][0] for r in out} == {3}  # len: the longest rank's
    assert [len(out[r][1]) for r in range(2)] == [3, 3]  # every rank iterates 3 times
    real = sorted(i for r in out for pad, ids in out[r][1] if not pad for i in ids)
    assert real == list(range(5))  # every sample exactly once, unflagged
    assert [pad for pad, _ in out[1][1]] == [True, True, True]
    assert [pad for pad, _ in out[0][1]] == [False, False, False]


def _sharded_decoding(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from vlm_mamba.models.vlm import VLMamba
    from vlm_mamba.registry import get_config
    from vlm_mamba.training.optim import param_groups

    torch.manual_seed(0)
    cfg = get_config("tiny")
    ref = VLMamba(cfg).eval()
    model = VLMamba(cfg).eval()
    model.load_state_dict(ref.state_dict())
    shard_model(model, init_device_mesh("cpu", (world,)), MixedPrecisionPolicy())
    g = torch.Generator().manual_seed(rank)  # different prompts per rank: decoding stops at different steps
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(3, 100, (2, 5), generator=g)
    with torch.no_grad():
        same_forward = torch.allclose(model(images, ids).logits, ref(images, ids).logits, atol=1e-6)
        new = 2 + 3 * rank  # rank 1 decodes more tokens than rank 0: no collective inside
        with unsharded(model):
            got = model.generate(images, ids, max_new_tokens=new, eos_token_id=None)
        resharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
        want = ref.generate(images, ids, max_new_tokens=new, eos_token_id=None)
        after = torch.allclose(model(images, ids).logits, ref(images, ids).logits, atol=1e-6)
    names = lambda m: [(g["name"], g["param_names"]) for g in param_groups(m, 0.1)]  # noqa: E731
    shapes = all(p.shape == q.shape for p, q in zip(model.parameters(), ref.parameters()))
    units = len(fsdp_units(model)) == cfg.vision.n_layers + cfg.language.n_layers + 1
    # bf16 policy: bf16 compute, fp32 sharded weights and gradients; decoding under autocast
    bf16 = VLMamba(cfg).train()
    bf16.load_state_dict(ref.state_dict())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_model(bf16, init_device_mesh("cpu", (world,)), policy)
    loss = bf16(images, ids, labels=ids).loss
    loss.backward()
    close = abs(float(loss) - float(ref(images, ids, labels=ids).loss)) < 0.02
    fp32_grads = all(p.grad.dtype == torch.float32 for p in bf16.parameters() if p.grad is not None)
    with torch.no_grad(), unsharded(bf16.eval(), True, torch.bfloat16):
        decoded = bf16.generate(images, ids, max_new_tokens=new, eos_token_id=None).shape == want.shape
    # the model's activation checkpointing inside FSDP2 units (the language blocks through the
    # registered forward_carry, the vision blocks through forward): the plain model's gradients
    ckpt_cfg = cfg.model_copy(
        update={
            "vision": cfg.vision.model_copy(update={"gradient_checkpointing": True}),
            "language": cfg.language.model_copy(update={"gradient_checkpointing": True}),
        }
    )
    ck = VLMamba(ckpt_cfg).train()
    ck.load_state_dict(ref.state_dict())
    shard_model(ck, init_device_mesh("cpu", (world,)), MixedPrecisionPolicy())
    ck(images, ids, labels=ids).loss.backward()
    plain = VLMamba(cfg).train()
    plain.load_state_dict(ref.state_dict())
    plain(images, ids, labels=ids).loss.backward()
    # each rank's loss is over its own batch; FSDP averages the gradients over the ranks
    import torch.distributed as dist

    grads_ok = True
    for p, q in zip(ck.parameters(), plain.parameters()):
        want_g = q.grad.clone()
        dist.all_reduce(want_g)
        want_g /= world
        grads_ok &= torch.allclose(p.grad.full_tensor(), want_g, rtol=1e-4, atol=1e-6)
    return (
        same_forward,
        torch.equal(got, want),
        after,
        names(model) == names(ref),
        shapes,
        resharded,
        units,
        close and fp32_grads and decoded,
        grads_ok,
    )


def test_sharded_model_forward_decoding_and_groups():
    """fully_shard on the blocks of both towers + the root: the forward equals the plain model's,
    decoding inside unsharded() equals the plain model's (different lengths per rank), the weights
    are sharded again after it, parameters keep their shapes and the decay groups their names; one
    unit per block of each tower + the root; with the bf16 policy the loss is within 0.02 of fp32,
    gradients are fp32 and decoding (autocast) runs; with the model's gradient checkpointing on in
    both towers the sharded gradients are the plain model's averaged over the ranks."""
    out = _spawn(_sharded_decoding)
    for rank, result in out.items():
        assert all(result), (rank, result)


@pytest.mark.slow  # one torchrun of 2 processes (~20 s)
def test_evaluate_py_on_two_ranks_reads_the_sharded_checkpoint(runs, shapes_dir, tmp_path):
    """evaluate.py under torchrun: each rank reads the whole model from the DCP folder and decodes
    its share (no collective per batch, so uneven shares need no padding); rank 0's results hold
    every question exactly once and equal a one-process evaluation."""
    import json

    ckpt = runs["fsdp"] / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    common = [f"ckpt_path={ckpt}", "task=vqav2", "split=val", f"data_dir={shapes_dir}", "batch_size=4"]
    out = {}
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run"]),
    ):
        cmd = [*launcher, *(["--nproc_per_node", "2"] if name == "two" else []), str(ROOT / "evaluate.py")]
        r = subprocess.run(
            [*cmd, *common, f"hydra.run.dir={tmp_path / name}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = json.loads((tmp_path / name / "vqa_val_results.json").read_text())
    ids = [r["question_id"] for r in out["two"]]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(r["question_id"] for r in out["one"])
    assert sorted(out["two"], key=lambda r: r["question_id"]) == sorted(
        out["one"], key=lambda r: r["question_id"]
    )
