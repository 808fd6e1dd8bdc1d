"""Training and refinement for temporal sparsity: the recipe of arXiv 2107.07305 as phases.

``baseline`` (no sparsity) → ``l1`` (ActivationL1 refinement from the baseline) → ``delta``
(DeltaActivation refinement from the l1 run, short training clips, longer evaluation clips);
``delta_scratch`` trains with delta layers from the start. Single process, or several through
``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPU).

**Run folders.** ``train`` checks the configuration and the data before it writes anything,
so a run that fails to start leaves the folder as it was. It never overwrites a finished run
(a folder with ``model.pt``) or an unfinished one (``checkpoint.pt``) unless ``force=True``
(``--force``), which clears the old files first. ``resume=True`` (``--resume``) continues from
``checkpoint.pt`` and refuses settings that differ from the saved ones, except
:data:`RESUME_MAY_CHANGE` (how the run executes, not what it computes).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
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
from .checkpoint import (
    check_classes,
    load_checkpoint,
    load_model,
    save_atomic,
    write_json_atomic,
)
from .convert import DeltaConfig, convert
from .layers import VideoModel, sparsity_layers
from .losses import make_schedule, set_sparsity_weight, sparsity_loss
from .metrics import measure

__all__ = [
    "PHASES",
    "RESUME_MAY_CHANGE",
    "TrainConfig",
    "build_dataset",
    "build_datasets",
    "build_model",
    "config_changes",
    "delta_config",
    "data_summary",
    "evaluate",
    "load_model",
    "print_data_summary",
    "run_state",
    "saved_config",
    "train",
]

log = logging.getLogger(__name__)

PHASES = ("baseline", "l1", "delta", "delta_scratch")
_LAYER_KIND = {"l1": "l1", "delta": "delta", "delta_scratch": "delta", "calibrated": "delta"}
#: Runs made without training (``deltasparse calibrate``): built like a delta run.
MADE_PHASES = ("calibrated",)
#: TrainConfig fields a resumed run may change: they alter how it runs, not what it computes.
RESUME_MAY_CHANGE = ("progress", "workers", "device", "cache_dir", "out")
MAX_SPLIT = 5  # plain folders have splits 1..5, UCF101 1..3 (checked by the layout)
MIN_RESOLUTION = 8
# Everything a run folder's phases write (--force removes all of them: no stale engine or
# calibration record survives next to a new model).
_RUN_FILES = ("model.pt", "checkpoint.pt", "eval.json", "metrics.json", "metrics.csv",
              "config.json", "engine.json", "calibration.json")  # fmt: skip


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
    layout: str = "auto"  # "auto", "ucf101" or "folder" (see deltasparse.data.layout)
    splits_dir: str | None = None  # folder holding classInd.txt and the split lists
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
    gate: str = "scalar"  # "scalar" (the paper) or "pixel" (what the engine skips)
    mode: str = "grid"  # "grid" (the paper) or "hysteresis" (send changes above the step)
    input_gate: bool = False  # a delta layer on the input pixels too
    input_threshold_init: float | None = None  # its initial step (default threshold_init)
    # knowledge distillation from the --init-from model (the phase's starting point) as teacher
    distill: float = 0.0  # weight of the teacher's soft targets; 0 = cross-entropy only
    distill_temperature: float = 2.0
    # execution
    amp: str | None = None  # "bf16" on GPU
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        _validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int, note: str = ""):
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}{note}"


def _num_above(lo: float, *, strict: bool):
    ok = (lambda v: _is_num(v) and v > lo) if strict else (lambda v: _is_num(v) and v >= lo)
    return ok, f"a {'finite ' if strict else ''}number {'>' if strict else '>='} {lo:g}"


def _optional(check):
    ok, expected = check
    return (lambda v: v is None or ok(v)), f"unset or {expected}"


def _validate(cfg: TrainConfig) -> None:
    """Every field checked up front, so that a bad value fails before any file is written."""
    from .data.layout import LAYOUTS
    from .data.synthetic import MAX_CLASSES

    choices = {
        "phase": PHASES + MADE_PHASES, "optimizer": ("sgd", "adamw"), "amp": (None, "bf16"),
        "lr_schedule": ("cosine", "constant"), "sparsity_schedule": ("constant", "linear", "sine"),
        "granularity": ("layer", "channel", "neuron"), "device": ("auto", "cpu", "cuda"),
        "gate": ("scalar", "pixel"), "mode": ("grid", "hysteresis"), "input_gate": (False, True),
        "layout": LAYOUTS, "model": tuple(models.list_models()),
    }  # fmt: skip
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            raise ValueError(f"{name} ({_flag(name)}) must be one of {shown}, got {value!r}; "
                             f"pass {_flag(name)} with one of them")
    delta = _LAYER_KIND.get(cfg.phase) == "delta"
    clip = _int_at_least(2 if delta else 1,
                         " (delta training needs clip_len >= 2: deltas need two frames)"
                         if delta else "")  # fmt: skip
    res = cfg.resolution if _is_int(cfg.resolution) else 64
    # field: ((predicate, what is expected), example value for the fix)
    checks = {
        "split": (((lambda v: _is_int(v) and 1 <= v <= MAX_SPLIT),
                   f"an integer in 1..{MAX_SPLIT} (UCF101: 1..3)"), 1),
        "resolution": (_int_at_least(MIN_RESOLUTION, " (pixels of the square crop)"), 64),
        "resize": (_optional(_int_at_least(res, " (the resolution: it is the short side before "
                                                "cropping)")), round(res * 8 / 7)),
        "clip_len": (clip, 4),
        "eval_clip_len": (_optional(clip), 8),
        "frame_stride": (_int_at_least(1), 1),
        "eval_clips_per_video": (_int_at_least(1), 2),
        "workers": (_int_at_least(0), 0),
        "width": (_num_above(0, strict=True), 0.5),
        "epochs": (_int_at_least(1), 10),
        "batch_size": (_int_at_least(1), 16),
        "lr": (_num_above(0, strict=True), 2e-3),
        "momentum": (((lambda v: _is_num(v) and 0 <= v < 1), "a number in [0, 1)"), 0.9),
        "weight_decay": (_num_above(0, strict=False), 1e-4),
        "warmup_epochs": (_num_above(0, strict=False), 0),
        "sparsity_weight": (_num_above(0, strict=False), 1e-3),
        "threshold_init": (_num_above(0, strict=True), 0.05),
        "input_threshold_init": (_optional(_num_above(0, strict=True)), 0.05),
        "threshold_lr_mult": (_num_above(0, strict=False), 1.0),
        "distill": (((lambda v: _is_num(v) and 0 <= v <= 1), "a number in [0, 1]"), 0.5),
        "distill_temperature": (_num_above(0, strict=True), 2.0),
        "seed": (_int_at_least(0), 0),
        "data": (((lambda v: isinstance(v, str) and v.strip() != ""),
                  "'synthetic' or a dataset folder"), "synthetic"),
    }
    if cfg.data == "synthetic":
        n = cfg.synthetic_classes
        checks.update({
            "synthetic_classes": (((lambda v: _is_int(v) and 1 <= v <= MAX_CLASSES),
                                   f"an integer in 1..{MAX_CLASSES} (one per motion)"), 10),
            "synthetic_videos": (_int_at_least(n if _is_int(n) else 1, " (synthetic_classes: a "
                                               "training video per class)"), 300),
            "synthetic_frames": (_int_at_least(1), 16),
        })  # fmt: skip
    for name, ((ok, expected), example) in checks.items():
        if not ok(getattr(cfg, name)):
            raise ValueError(f"{name} ({_flag(name)}) must be {expected}, got "
                             f"{getattr(cfg, name)!r}; pass e.g. {_flag(name)} {example}")
    if models.uses_tokens(cfg.model):
        cnn = {"gate": "scalar", "mode": "grid", "input_gate": False}
        bad = [f"{_flag(k)} {getattr(cfg, k)}" for k, v in cnn.items() if getattr(cfg, k) != v]
        if bad:
            raise ValueError(
                f"{cfg.model} is a transformer: its delta layers are token gates (before the qkv "
                f"projections and the MLPs), not the CNN's pixel gates; drop {', '.join(bad)}"
            )
        if cfg.resolution % 16:
            raise ValueError(
                f"resolution (--resolution) must be a multiple of {cfg.model}'s patch size 16, "
                f"got {cfg.resolution}; pass e.g. --resolution {16 * max(1, cfg.resolution // 16)}"
            )
    if cfg.distill and not cfg.init_from:
        raise ValueError(f"distill (--distill) {cfg.distill} needs a teacher: the --init-from "
                         "model is it; pass --init-from <run>/model.pt or --distill 0")
    if cfg.data == "synthetic" and cfg.resolution % 2:
        raise ValueError(f"resolution (--resolution) must be an even integer >= {MIN_RESOLUTION} "
                         f"(the embedded videos are H.264 4:2:0: even frame sizes), got "
                         f"{cfg.resolution!r}; pass e.g. --resolution {cfg.resolution + 1}")


# -- run folders ------------------------------------------------------------------------------
def run_state(out: str | Path) -> str:
    """``"finished"`` (``model.pt``), ``"unfinished"`` (``checkpoint.pt`` only) or ``"new"``."""
    out = Path(out)
    if (out / "model.pt").is_file():
        return "finished"
    if (out / "checkpoint.pt").is_file():
        return "unfinished"
    return "new"


def saved_config(out: str | Path) -> TrainConfig | None:
    """The configuration of the run in ``out`` (from its checkpoint), or None if it has none."""
    out = Path(out)
    state = run_state(out)
    if state == "new":
        return None
    ckpt = load_checkpoint(out / ("model.pt" if state == "finished" else "checkpoint.pt"))
    return TrainConfig.from_dict(ckpt["config"])


def config_changes(saved: TrainConfig, cfg: TrainConfig,
                   allowed: tuple[str, ...] = RESUME_MAY_CHANGE) -> dict[str, tuple]:
    """``{field: (saved value, new value)}`` for the fields that differ, ``allowed`` aside."""
    a, b = saved.to_dict(), cfg.to_dict()
    return {k: (a[k], b[k]) for k in a if k not in allowed and a[k] != b[k]}


def describe_changes(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in changes.items())


def _check_run_folder(cfg: TrainConfig, *, resume: bool, force: bool) -> dict | None:
    """Refuse to clobber a run; for ``resume``, the checkpoint to continue from."""
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if resume and force:
        raise ValueError(f"--resume and --force contradict each other: --resume continues the "
                         f"run in {out}, --force starts it again from scratch; pass only one")
    state = run_state(out)
    if resume:
        if state == "finished":
            raise FileExistsError(
                f"--resume: the run in {out} is finished (it has model.pt), nothing to resume; "
                f"evaluate it with `deltasparse eval --checkpoint {out / 'model.pt'}`, or drop "
                "--resume and pass --force to train it again from scratch")
        if state == "new":
            raise FileNotFoundError(
                f"--resume: no checkpoint at {ckpt_path} to resume from; drop --resume to start "
                f"a fresh run in {out}, or pass the --out of the run to continue")
        ckpt = load_checkpoint(ckpt_path)
        changes = config_changes(TrainConfig.from_dict(ckpt["config"]), cfg)
        if changes:
            raise ValueError(
                f"--resume: the settings differ from the run saved in {ckpt_path} "
                f"({describe_changes(changes)}); resume with the saved settings, or start a new "
                f"run with another --out (only {', '.join(RESUME_MAY_CHANGE)} may change)")
        return ckpt
    if state == "finished" and not force:
        raise FileExistsError(
            f"{out} already holds a finished run (model.pt); pass --force to train it again from "
            "scratch (its model.pt, checkpoint.pt, eval.json and metrics are replaced), or "
            "choose another --out")
    if state == "unfinished" and not force:
        ckpt = load_checkpoint(ckpt_path)
        total = TrainConfig.from_dict(ckpt["config"]).epochs
        raise FileExistsError(
            f"{out} holds the checkpoint of an unfinished run ({ckpt['epoch'] + 1} of {total} "
            "epochs done); pass --resume to continue it, --force to start it again from "
            "scratch, or choose another --out")
    return None


def _clear_run(out: Path) -> None:
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _say(console, text: str) -> None:
    log.info("%s", text)
    if console is not None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)


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
        raise ValueError("device (--device) is 'cuda' but no CUDA device is available; pass "
                         "--device cpu (or auto)")
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
def build_dataset(cfg: TrainConfig, train: bool, *, clip_flag: str | None = None):
    """The training or evaluation set of ``cfg.data``, checked: every clip length must fit in
    at least one video. ``clip_flag`` names the option to change in that error."""
    from . import data
    from .data import synthetic as _syn

    clip_len = cfg.clip_len if train else (cfg.eval_clip_len or cfg.clip_len)
    if cfg.data == "synthetic":
        common = dict(num_classes=cfg.synthetic_classes, frames=cfg.synthetic_frames,
                      size=(cfg.resolution, cfg.resolution), seed=cfg.seed,
                      clip_stride=cfg.frame_stride, cache=True)  # fmt: skip
        if train:
            ds = _syn.SyntheticActions(num_videos=cfg.synthetic_videos, split="train",
                                       clip_len=clip_len, **common)  # fmt: skip
        else:
            n_test = max(cfg.synthetic_videos // 4, cfg.synthetic_classes)
            ds = _syn.SyntheticActions(num_videos=n_test, split="test", clip_len=clip_len,
                                       **common)  # fmt: skip
        longest, what = cfg.synthetic_frames, "the synthetic videos"
    else:
        ds = data.VideoFolder(
            cfg.data, train=train, clip_len=clip_len, split=cfg.split, layout=cfg.layout,
            splits_dir=cfg.splits_dir, frame_stride=cfg.frame_stride,
            crop=(cfg.resolution, cfg.resolution),
            resize=cfg.resize or int(round(cfg.resolution * 8 / 7)), cache_dir=cfg.cache_dir,
            seed=cfg.seed, clips_per_video=1 if train else cfg.eval_clips_per_video,
        )  # fmt: skip
        longest = ds.longest_video
        what = f"the {'train' if train else 'test'} split {cfg.split} of {cfg.data}"
    span = (clip_len - 1) * cfg.frame_stride + 1
    if longest and longest < span:
        flag = clip_flag or ("--clip-len" if train or not cfg.eval_clip_len else "--eval-clip-len")
        fits = (longest - 1) // cfg.frame_stride + 1
        raise data.DatasetError(
            f"{'training' if train else 'evaluation'} clips of {clip_len} frames (frame_stride "
            f"{cfg.frame_stride}: {span} frames of video) do not fit in any video of {what} "
            f"(the longest has {longest} frames); pass {flag} {fits} or less")
    return ds


def build_datasets(cfg: TrainConfig):
    """``(train_set, eval_set, num_classes)`` for ``cfg.data``."""
    train = build_dataset(cfg, True)
    test = build_dataset(cfg, False)
    if [c.lower() for c in train.class_names] != [c.lower() for c in test.class_names]:
        raise ValueError(f"the train and test sets of {cfg.data} have different classes "
                         f"({train.class_names} vs {test.class_names}); check the split files")
    return train, test, len(train.class_names)


def _per_class(ds) -> list[int]:
    if hasattr(ds, "class_counts"):
        return ds.class_counts()
    counts = [0] * len(ds.class_names)
    for label in ds.labels:
        counts[label] += 1
    return counts


def data_summary(cfg: TrainConfig, train_set, eval_set) -> dict:
    """What the run reads: the split rule and videos per class (``train_set`` may be None)."""
    if cfg.data == "synthetic":
        rule = (f"synthetic videos (seed {cfg.seed}, {cfg.synthetic_frames} frames): "
                f"{cfg.synthetic_videos} train and {len(eval_set)} test videos, rendered "
                "separately; label = index % classes")
    else:
        rule = eval_set.split_rule
    return {
        "data": cfg.data,
        "layout": getattr(eval_set, "layout", "synthetic"),
        "rule": rule,
        "classes": list(eval_set.class_names),
        "train": _per_class(train_set) if train_set is not None else None,
        "test": _per_class(eval_set),
        "skipped": {"train": int(getattr(train_set, "num_skipped", 0)),
                    "test": int(getattr(eval_set, "num_skipped", 0))},
        "warning": getattr(eval_set, "layout_warning", None),
    }


def print_data_summary(console, summary: dict, *, max_rows: int = 20) -> None:
    """The summary as a small table (one row per class, or min/max when there are many)."""
    from rich.table import Table

    log.info("data: %s", json.dumps(summary))
    if console is None:
        return
    names, train, test = summary["classes"], summary["train"], summary["test"]
    cols = [("train", train), ("test", test)] if train is not None else [("test", test)]
    console.print(f"data {summary['data']}: {summary['rule']}", highlight=False, markup=False,
                  soft_wrap=True)
    t = Table(box=None, padding=(0, 2), show_edge=False)
    t.add_column(f"class ({len(names)})")
    for col, _ in cols:
        t.add_column(f"{col} videos", justify="right")
    if len(names) <= max_rows:
        for i, name in enumerate(names):
            t.add_row(name, *(str(c[i]) for _, c in cols))
    else:
        for label, pick in (("fewest", min), ("most", max)):
            t.add_row(f"{label} per class", *(
                f"{pick(c)} ({names[c.index(pick(c))]})" for _, c in cols))
    t.add_row("total", *(str(sum(c)) for _, c in cols), style="bold")
    console.print(t)
    skipped = summary["skipped"]
    if skipped["train"] or skipped["test"]:
        console.print(f"skipped unreadable videos: {skipped['train']} train, {skipped['test']} "
                      "test (see the warnings)", highlight=False, markup=False, soft_wrap=True)
    if summary["warning"]:
        console.print(f"[yellow]warning:[/] {summary['warning']}", highlight=False,
                      soft_wrap=True)


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
    if cfg.model in ("mobilenet_v1", "mobilenet_v2", "convnet", "convnet_pw", "dsconvnet"):
        kw["width_mult"] = cfg.width
    if models.uses_tokens(cfg.model):
        kw["img_size"] = cfg.resolution
    frame = models.create(cfg.model, **kw)
    dcfg = delta_config(cfg)
    if dcfg is not None:
        frame = convert(frame, dcfg)
    return VideoModel(frame)


def delta_config(cfg: TrainConfig) -> DeltaConfig | None:
    """The layers a phase inserts (``None`` for the baseline)."""
    kind = _LAYER_KIND.get(cfg.phase)
    if kind is None:
        return None
    if kind == "l1":
        return DeltaConfig(kind="l1", sparsity_weight=cfg.sparsity_weight)
    if models.uses_tokens(cfg.model):
        # a transformer: token gates before the qkv projections and the MLPs
        return DeltaConfig(kind="token", threshold_init=cfg.threshold_init,
                           sparsity_weight=cfg.sparsity_weight)  # fmt: skip
    overrides = {}
    if cfg.input_gate:
        # Three colour channels: one step per channel; the same gate and mode as the others.
        thr = cfg.input_threshold_init or cfg.threshold_init
        overrides["input"] = {"granularity": "channel", "threshold_init": thr}
    return DeltaConfig(
        kind="delta", granularity=cfg.granularity, threshold_init=cfg.threshold_init,
        sparsity_weight=cfg.sparsity_weight, gate=cfg.gate, mode=cfg.mode,
        on_input=cfg.input_gate, overrides=overrides,
    )  # fmt: skip


def _init_from(model: VideoModel, path: str, class_names: list[str], data: str) -> None:
    ckpt = load_checkpoint(path)
    check_classes(ckpt, class_names, what=f"--init-from {path}", data=data)
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


def build_teacher(cfg: TrainConfig, class_names: list[str], device: torch.device) -> VideoModel:
    """The ``--init-from`` model, frozen in eval mode: the soft targets of ``--distill``.

    It is rebuilt from its own run's configuration (its phase's layers included) and loaded
    strictly (:func:`load_model`), so that the teacher is exactly the model the phase started
    from (also on ``--resume``, where the student's weights come from the checkpoint).
    """
    teacher, _, ckpt = load_model(cfg.init_from)
    check_classes(ckpt, class_names, what=f"--init-from {cfg.init_from} (the --distill teacher)",
                  data=_data_name(cfg))
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """The soft-target term of Hinton et al., ``T²·KL(teacher_T ‖ student_T)``; training
    blends it with the cross-entropy as ``(1 - w)·CE + w·distill_loss`` (``w``: ``--distill``)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


def _file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _materialise(model: VideoModel, sample: torch.Tensor, cfg: TrainConfig) -> None:
    """One forward so that lazily created thresholds exist before the optimizer is built."""
    with torch.no_grad():
        model.eval()
        try:
            model(sample)
        except RuntimeError as exc:  # typically "output size is too small"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"model {cfg.model} cannot run on {cfg.resolution}x{cfg.resolution} frames "
                f"(--resolution {cfg.resolution}): {first}; pass a larger --resolution"
            ) from exc
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


def _data_name(cfg: TrainConfig) -> str:
    return "the synthetic data" if cfg.data == "synthetic" else str(cfg.data)


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False,
          return_model: bool = False, console=None):
    """Run one phase; returns the final evaluation dict (also written to ``eval.json``).

    Everything is checked before the run folder is touched: the folder's state (see the module
    docstring: ``resume`` continues ``checkpoint.pt``, ``force`` replaces a run), the
    configuration, the data and the model. ``console`` (a ``rich.console.Console``) receives
    the data summary and the resume line, which are also logged.

    Only rank 0 evaluates and writes files; other ranks return ``{}``. With
    ``return_model=True`` it returns ``(result, model)``.
    """
    if cfg.phase in MADE_PHASES:
        raise ValueError(f"a {cfg.phase!r} run is made by `deltasparse calibrate` from a baseline "
                         "run, not trained; pass --phase baseline, l1, delta or delta_scratch")
    resumed = _check_run_folder(cfg, resume=resume, force=force)
    device = _setup_device(cfg)
    rank, world, _ = _dist_info()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    _seed_everything(cfg.seed)
    train_set, eval_set, num_classes = build_datasets(cfg)
    class_names = list(train_set.class_names)
    if _is_main():
        print_data_summary(console, data_summary(cfg, train_set, eval_set))
    model = build_model(cfg, num_classes)
    if cfg.init_from and resumed is None:  # resumed: the checkpoint holds the weights
        _init_from(model, cfg.init_from, class_names, _data_name(cfg))
    if resumed is not None:
        check_classes(resumed, class_names, what=f"--resume checkpoint {ckpt_path}",
                      data=_data_name(cfg))
    model.to(device)
    sample = train_set[0][0].unsqueeze(0).to(device)
    _materialise(model, sample, cfg)
    teacher = build_teacher(cfg, class_names, device) if cfg.distill else None
    teacher_sha = _file_digest(cfg.init_from) if teacher is not None else None
    if resumed is not None and teacher_sha is not None and \
            resumed.get("teacher_sha256") != teacher_sha:
        raise ValueError(f"--init-from {cfg.init_from} is not the file this run started to "
                         f"distil from (it changed since: another teacher); pass --force to "
                         f"start {out} again with it")
    opt = _optimizer(cfg, model)
    steps_per_epoch = len(_loader(train_set, cfg, train=True))
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps, warmup))
    weight_sched = make_schedule(cfg.sparsity_schedule, cfg.sparsity_weight, total_steps)
    history: list[dict] = []
    start_epoch = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])  # moves the state to the parameters' device
        sched.load_state_dict(resumed["scheduler"])
        history = resumed["history"]
        start_epoch = resumed["epoch"] + 1
        if _is_main():
            rest = (f"continuing with epoch {start_epoch + 1}" if start_epoch < cfg.epochs
                    else "training is complete; evaluating")
            _say(console, f"resumed {ckpt_path} after epoch {start_epoch} of {cfg.epochs}: "
                          f"{rest}")
    if _is_main():  # everything checked: only now touch the run folder
        if force:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.to_dict(), out / "config.json")

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
        sums = {"loss": 0.0, "task": 0.0, "distill": 0.0, "sparse": 0.0, "correct": 0, "n": 0,
                "num": 0.0, "den": 0.0}  # fmt: skip
        t0 = time.perf_counter()
        with train_progress(cfg, epoch, len(loader), enabled=cfg.progress and _is_main()) as bar:
            for i, (x, y) in enumerate(loader):
                step = epoch * steps_per_epoch + i
                weight = weight_sched(step)
                set_sparsity_weight(model, weight)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(cfg, device):
                    logits = net(x)
                    ce = F.cross_entropy(logits.float(), y)
                    kd = None
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(x).float()
                        kd = distill_loss(logits.float(), t_logits, cfg.distill_temperature)
                    task = ce if kd is None else (1 - cfg.distill) * ce + cfg.distill * kd
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
                sums["task"] += float(ce.detach()) * len(y)
                if kd is not None:
                    sums["distill"] += float(kd.detach()) * len(y)
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
            "train_task_loss": sums["task"] / max(sums["n"], 1),  # the cross-entropy
            "train_distill_loss": sums["distill"] / max(sums["n"], 1) if teacher else None,
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
                "class_names": class_names,
                "teacher_sha256": teacher_sha,
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
            {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": num_classes,
             "class_names": class_names},
            out / "model.pt",
        )  # fmt: skip
    return (result, model) if return_model else result


def _write_metrics(out: Path, history: list[dict]) -> None:
    write_json_atomic({"epochs": history}, out / "metrics.json")
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "metrics.csv")
