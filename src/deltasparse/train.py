"""Training and refinement for temporal sparsity: the recipe of arXiv 2107.07305 as phases.

``baseline`` (no sparsity) → ``l1`` (ActivationL1 refinement from the baseline) → ``delta``
(DeltaActivation refinement from the l1 run, short training clips, longer evaluation clips);
``delta_scratch`` trains with delta layers from the start. Single process, or several through
``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .checkpoint import load_checkpoint, load_model, save_atomic, write_json_atomic
from .convert import DeltaConfig, convert
from .layers import VideoModel, sparsity_layers
from .losses import make_schedule, set_sparsity_weight, sparsity_loss
from .metrics import measure

__all__ = ["PHASES", "TrainConfig", "build_model", "evaluate", "load_model", "train"]

log = logging.getLogger(__name__)

PHASES = ("baseline", "l1", "delta", "delta_scratch")
_LAYER_KIND = {"l1": "l1", "delta": "delta", "delta_scratch": "delta"}


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` in the run folder."""

    phase: str = "baseline"
    out: str = "runs/baseline"
    name: str | None = None
    init_from: str | None = None  # model.pt of the previous phase
    # data
    data: str = "synthetic"  # "synthetic" or a folder (UCF101 layout or class folders)
    split: int = 1
    cache_dir: str | None = None
    synthetic_videos: int = 300
    synthetic_classes: int = 10
    synthetic_frames: int = 16
    resolution: int = 64
    resize: int | None = None  # short side before cropping; default resolution * 8/7
    clip_len: int = 4
    eval_clip_len: int | None = None
    frame_stride: int = 1
    eval_clips_per_video: int = 2
    workers: int = 0
    # model
    model: str = "mobilenet_v1"
    width: float = 0.5
    # optimisation
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adamw"  # or "sgd"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # or "constant"
    warmup_epochs: float = 0.0
    # sparsity
    sparsity_weight: float = 1e-3
    sparsity_schedule: str = "constant"  # constant | linear | sine
    threshold_init: float = 0.05
    threshold_lr_mult: float = 1.0
    granularity: str = "channel"
    # execution
    amp: str | None = None  # "bf16" on GPU
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        if self.clip_len < 1 or (self.phase != "baseline" and self.clip_len < 2
                                 and _LAYER_KIND.get(self.phase) == "delta"):
            raise ValueError("delta training needs clip_len >= 2 (deltas need two frames)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- distributed ------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def _setup_device(cfg: TrainConfig) -> torch.device:
    rank, world, local = _dist_info()
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    device = torch.device(f"cuda:{local}" if want == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return device


def _is_main() -> bool:
    return _dist_info()[0] == 0


# -- data ---------------------------------------------------------------------------------------
def build_datasets(cfg: TrainConfig):
    """``(train_set, eval_set, num_classes)`` for ``cfg.data``."""
    from . import data
    from .data import synthetic as _syn  # noqa: F401

    eval_t = cfg.eval_clip_len or cfg.clip_len
    if cfg.data == "synthetic":
        common = dict(
            num_classes=cfg.synthetic_classes,
            frames=cfg.synthetic_frames,
            size=(cfg.resolution, cfg.resolution),
            seed=cfg.seed,
            clip_stride=cfg.frame_stride,
            cache=True,
        )
        n_test = max(cfg.synthetic_videos // 4, cfg.synthetic_classes)
        train = _syn.SyntheticActions(
            num_videos=cfg.synthetic_videos, split="train", clip_len=cfg.clip_len, **common
        )
        test = _syn.SyntheticActions(num_videos=n_test, split="test", clip_len=eval_t, **common)
        return train, test, cfg.synthetic_classes
    common = dict(
        split=cfg.split,
        frame_stride=cfg.frame_stride,
        crop=(cfg.resolution, cfg.resolution),
        resize=cfg.resize or int(round(cfg.resolution * 8 / 7)),
        cache_dir=cfg.cache_dir,
        seed=cfg.seed,
    )
    train = data.VideoFolder(cfg.data, train=True, clip_len=cfg.clip_len, **common)
    test = data.VideoFolder(
        cfg.data, train=False, clip_len=eval_t, clips_per_video=cfg.eval_clips_per_video, **common
    )
    return train, test, train.num_classes


def _loader(dataset, cfg: TrainConfig, *, train: bool, epoch: int = 0):
    _, world, _ = _dist_info()
    g = torch.Generator()
    g.manual_seed(cfg.seed * 7919 + epoch)
    sampler = None
    if world > 1 and train:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed)
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) >= cfg.batch_size * world,
        num_workers=cfg.workers,
        generator=g,
        persistent_workers=False,
    )


# -- model --------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int) -> VideoModel:
    kw: dict[str, Any] = {"num_classes": num_classes}
    if cfg.model in ("mobilenet_v1", "mobilenet_v2", "convnet"):
        kw["width_mult"] = cfg.width
    frame = models.create(cfg.model, **kw)
    kind = _LAYER_KIND.get(cfg.phase)
    if kind is not None:
        dcfg = DeltaConfig(
            kind=kind,
            granularity=cfg.granularity,
            threshold_init=cfg.threshold_init,
            sparsity_weight=cfg.sparsity_weight,
        )
        frame = convert(frame, dcfg)
    return VideoModel(frame)


def _init_from(model: VideoModel, path: str) -> None:
    ckpt = load_checkpoint(path)
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(
            f"--init-from {path} does not match this model ({str(exc).splitlines()[1:3]}); use "
            f"the model.pt of a run with the same --model and --width"
        ) from None
    missing = [k for k in missing if not k.endswith(".theta")]
    unexpected = [k for k in unexpected if not k.endswith(".theta")]
    if missing or unexpected:
        raise ValueError(
            f"--init-from {path} does not match this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); use the model.pt of a run with the same --model and --width"
        )


def _materialise(model: VideoModel, sample: torch.Tensor) -> None:
    """One forward so that lazily created thresholds exist before the optimizer is built."""
    with torch.no_grad():
        model.eval()
        model(sample)
        model.train()


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay, thresholds = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".theta"):
            thresholds.append(p)  # weight decay would shrink the step and undo sparsity
        elif p.dim() <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if thresholds:
        groups.append(
            {"params": thresholds, "weight_decay": 0.0, "lr": cfg.lr * cfg.threshold_lr_mult}
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _lr_lambda(cfg: TrainConfig, total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        t = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


# -- evaluation ---------------------------------------------------------------------------------
def evaluate(model: VideoModel, dataset, cfg: TrainConfig, device: torch.device) -> dict:
    """Clip and video accuracy plus a :func:`measure` report, in one pass over ``dataset``."""
    loader = _loader(dataset, cfg, train=False)
    clip_video = getattr(dataset, "clip_video", None)
    video_probs: dict[int, torch.Tensor] = {}
    video_label: dict[int, int] = {}
    correct = total = 0
    seen = 0

    def score(out: torch.Tensor, batch) -> None:
        nonlocal correct, total, seen
        y = batch[1].to(out.device)
        probs = out.float().softmax(-1)
        correct += int((probs.argmax(-1) == y).sum())
        total += len(y)
        for j in range(len(y)):
            vid = int(clip_video[seen + j]) if clip_video is not None else seen + j
            video_probs[vid] = video_probs.get(vid, 0) + probs[j].cpu()
            video_label[vid] = int(y[j])
        seen += len(y)

    batches = ((x.to(device), y) for x, y in loader)
    with _autocast(cfg, device):
        report = measure(model, batches, callback=score)
    video_correct = sum(int(video_probs[v].argmax() == video_label[v]) for v in video_probs)
    clip_acc = correct / max(total, 1)
    video_acc = video_correct / max(len(video_probs), 1)
    return {
        "phase": cfg.phase,
        "clip_accuracy": clip_acc,
        "video_accuracy": video_acc,
        "accuracy": video_acc,
        "op_fraction": report.op_fraction,
        "op_reduction": report.op_reduction,
        "mac_fraction": report.mac_fraction,
        "effective_macs_per_frame": report.effective_macs_per_frame,
        "dense_macs_per_frame": report.dense_macs_per_frame,
        "num_clips": total,
        "num_videos": len(video_probs),
        "skipped_videos": int(getattr(dataset, "num_skipped", 0)),
        "clip_len": cfg.eval_clip_len or cfg.clip_len,
        "sparsity": report.to_dict(),
    }


def _autocast(cfg: TrainConfig, device: torch.device):
    enabled = cfg.amp == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# -- training -----------------------------------------------------------------------------------
def _batch_op_fraction(model: nn.Module) -> tuple[float, float]:
    num = den = 0.0
    for _, m in sparsity_layers(model):
        if m.stats is not None and m.stats.total:
            num += m.stats.fan_out * float(m.stats.nonzero_tensor)
            den += m.stats.fan_out * m.stats.total
    return num, den


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, *, resume: bool = False, return_model: bool = False):
    """Run one phase; returns the final evaluation dict (also written to ``eval.json``).

    Only rank 0 evaluates and writes files; other ranks return ``{}``. With
    ``return_model=True`` it returns ``(result, model)``.
    """
    device = _setup_device(cfg)
    rank, world, _ = _dist_info()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.to_dict(), out / "config.json")
    _seed_everything(cfg.seed)
    train_set, eval_set, num_classes = build_datasets(cfg)
    model = build_model(cfg, num_classes)
    if cfg.init_from:
        _init_from(model, cfg.init_from)
    model.to(device)
    sample = train_set[0][0].unsqueeze(0).to(device)
    _materialise(model, sample)
    opt = _optimizer(cfg, model)
    steps_per_epoch = len(_loader(train_set, cfg, train=True))
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps, warmup))
    weight_sched = make_schedule(cfg.sparsity_schedule, cfg.sparsity_weight, total_steps)
    history: list[dict] = []
    start_epoch = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        log.info("resumed %s at epoch %d", ckpt_path, start_epoch)
    elif resume:
        log.info("--resume: no checkpoint at %s yet, starting from scratch", ckpt_path)

    net: nn.Module = model
    if world > 1:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        net = nn.parallel.DistributedDataParallel(model, **ddp_kw)

    from .progress import train_progress

    ev: dict | None = None
    for epoch in range(start_epoch, cfg.epochs):
        _seed_everything(cfg.seed * 1000 + epoch * 10 + rank)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        loader = _loader(train_set, cfg, train=True, epoch=epoch)
        model.train()
        sums = {"loss": 0.0, "task": 0.0, "sparse": 0.0, "correct": 0, "n": 0, "num": 0.0,
                "den": 0.0}  # fmt: skip
        t0 = time.perf_counter()
        with train_progress(cfg, epoch, len(loader), enabled=cfg.progress and _is_main()) as bar:
            for i, (x, y) in enumerate(loader):
                step = epoch * steps_per_epoch + i
                weight = weight_sched(step)
                set_sparsity_weight(model, weight)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(cfg, device):
                    logits = net(x)
                    task = F.cross_entropy(logits.float(), y)
                    sparse = sparsity_loss(model)
                    loss = task + sparse
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                num, den = _batch_op_fraction(model)
                sums["num"] += num
                sums["den"] += den
                sums["loss"] += float(loss.detach()) * len(y)
                sums["task"] += float(task.detach()) * len(y)
                sums["sparse"] += float(sparse.detach()) * len(y)
                sums["correct"] += int((logits.argmax(-1) == y).sum())
                sums["n"] += len(y)
                bar.update(
                    loss=sums["loss"] / sums["n"],
                    acc=sums["correct"] / sums["n"],
                    op_fraction=sums["num"] / sums["den"] if sums["den"] else None,
                )
        row = {
            "epoch": epoch,
            "train_loss": sums["loss"] / max(sums["n"], 1),
            "train_task_loss": sums["task"] / max(sums["n"], 1),
            "train_sparsity_loss": sums["sparse"] / max(sums["n"], 1),
            "train_acc": sums["correct"] / max(sums["n"], 1),
            "train_op_fraction": sums["num"] / sums["den"] if sums["den"] else None,
            "lr": sched.get_last_lr()[0],
            "sparsity_weight": weight_sched(max((epoch + 1) * steps_per_epoch - 1, 0)),
            "time_s": time.perf_counter() - t0,
            "val_clip_acc": None,
            "val_video_acc": None,
            "val_op_fraction": None,
        }
        if _is_main():
            last = epoch == cfg.epochs - 1
            if last:
                ev = evaluate(model, eval_set, cfg, device)
                row.update(val_clip_acc=ev["clip_accuracy"], val_video_acc=ev["video_accuracy"],
                           val_op_fraction=ev["op_fraction"])  # fmt: skip
            history.append(row)
            _write_metrics(out, history)
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "history": history,
                "config": cfg.to_dict(),
                "num_classes": num_classes,
            }
            save_atomic(state, ckpt_path)
            log.info("epoch %d: %s", epoch, json.dumps(row))
        if world > 1:
            torch.distributed.barrier()

    result: dict = {}
    if _is_main():
        if ev is None:
            ev = evaluate(model, eval_set, cfg, device)
        result = dict(ev)
        result["train_skipped_videos"] = int(getattr(train_set, "num_skipped", 0))
        write_json_atomic(result, out / "eval.json")
        save_atomic(
            {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": num_classes},
            out / "model.pt",
        )
    return (result, model) if return_model else result


def _write_metrics(out: Path, history: list[dict]) -> None:
    write_json_atomic({"epochs": history}, out / "metrics.json")
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "metrics.csv")
