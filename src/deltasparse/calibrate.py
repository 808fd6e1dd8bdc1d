"""Calibration without training: gates inserted into a model trained without them, thresholds
picked on unlabeled clips to meet a target.

This is the practice of DeltaCNN (Parger et al., CVPR 2022) and CBinfer (Cavigelli et al.):
no retraining, a threshold per layer tuned until the output is good enough. It is the baseline
that training for temporal sparsity (the Delta Activation Layer, arXiv 2107.07305) has to beat,
so deltasparse ships it and its demo measures both.

The search: every inserted gate gets per-channel steps ``alpha * m_l * sigma_l,c``, where
``sigma_l,c`` is the standard deviation of the gate's input channel on the calibration clips
(steps in units of each channel's own spread) and ``m_l`` a per-layer multiplier (1 at first).
A bisection over the global ``alpha`` (log scale) meets the target; an optional refinement
pass then raises (or lowers) one layer's multiplier at a time where that keeps the target and
improves the other side of the trade-off. Targets (one of):

* ``agreement``: the fraction of frames whose top-1 class equals the ungated model's (>=);
* ``max_logit_error``: the largest ``|y - y_ref|`` over the largest ``|y_ref|``, per frame (<=);
* ``executed_density``: the MACs the delta engine executes over the dense MACs, steady state,
  as :func:`deltasparse.measure` predicts them from the engine's rules (<=).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .convert import DeltaConfig, convert
from .layers import DeltaActivation, VideoModel, sparsity_layers
from .layers.delta import _activate
from .metrics import measure

__all__ = ["CalibrationResult", "TARGETS", "calibrate", "parse_target"]

TARGETS = {"agreement": ">=", "max_logit_error": "<=", "executed_density": "<="}


def parse_target(target: dict | str) -> tuple[str, float]:
    """``{"agreement": 0.99}`` or ``"agreement=0.99"`` -> ``("agreement", 0.99)``."""
    if isinstance(target, str):
        if "=" not in target:
            raise ValueError(f"calibration target {target!r}: write NAME=VALUE, e.g. "
                             f"agreement=0.99; names: {', '.join(TARGETS)}")
        name, value = target.split("=", 1)
        target = {name.strip(): value.strip()}
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError(f"calibration target must name one of {list(TARGETS)}, got {target!r}")
    (name, value), = target.items()
    if name not in TARGETS:
        raise ValueError(f"unknown calibration target {name!r}; choose one of {list(TARGETS)}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"calibration target {name}: {value!r} is not a number") from None
    if name in ("agreement", "executed_density") and not 0 < value <= 1:
        raise ValueError(f"calibration target {name} is a fraction in (0, 1], got {value}")
    if name == "max_logit_error" and not value > 0:
        raise ValueError(f"calibration target max_logit_error must be > 0, got {value}")
    return name, value


@dataclass
class CalibrationResult:
    """The calibrated model and the record of the search (``to_json`` writes the record)."""

    model: nn.Module  # the converted per-frame model with calibrated steps (a copy)
    target: dict
    met: bool
    alpha: float
    layer_scale: dict[str, float]
    thresholds: dict[str, list[float]]
    achieved: dict
    config: dict
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "target": self.target, "met": self.met, "alpha": self.alpha,
            "layer_scale": self.layer_scale, "thresholds": self.thresholds,
            "achieved": self.achieved, "config": self.config, "history": self.history,
        }  # fmt: skip

    def to_json(self, path: str | Path | None = None) -> str:
        from .checkpoint import sanitize

        text = json.dumps(sanitize(self.to_dict()), indent=2, allow_nan=False)
        if path is not None:
            from .checkpoint import write_json_atomic

            write_json_atomic(self.to_dict(), path)
        return text


def _clip_batches(clips: Iterable, max_clips: int | None) -> list[torch.Tensor]:
    out, n = [], 0
    for i, b in enumerate(clips):
        x = b[0] if isinstance(b, (tuple, list)) else b
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"calibrate(): batch {i} must be clips (B, T, C, H, W), got {shape}")
        if x.shape[1] < 2:
            raise ValueError(f"calibrate(): clips need T >= 2 frames (temporal changes), got "
                             f"T={x.shape[1]}")
        if max_clips is not None and n + x.shape[0] > max_clips:
            x = x[: max_clips - n]
        if x.shape[0]:
            out.append(x)
            n += x.shape[0]
        if max_clips is not None and n >= max_clips:
            break
    if not out:
        raise ValueError("calibrate(): no clips given")
    return out


@torch.no_grad()
def _input_scales(gm: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel standard deviation of every gate's input over the clips (frames)."""
    layers = dict(sparsity_layers(gm))
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in layers}

    def hook(name):
        def fn(mod, inp, out):
            # what the quantiser sees: a gate that took over the ReLU before it
            # (DeltaConfig.absorb_activation) gets the pre-activation as its input
            x = _activate(inp[0], getattr(mod, "activation", None)).float()
            dims = [d for d in range(x.dim()) if d != 1]
            s = sums[name]
            s[0] = s[0] + x.sum(dims)
            s[1] = s[1] + (x * x).sum(dims)
            s[2] += x.numel() // x.shape[1]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        video = VideoModel(gm).eval()
        for x in batches:
            video(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (s1, s2, k) in sums.items():
        mean = s1 / k
        var = (s2 / k - mean * mean).clamp_min(0)
        out[n] = var.sqrt().clamp_min(1e-6)
    return out


def calibrate(
    model: nn.Module,
    clips: Iterable,
    *,
    target: dict | str = "agreement=0.99",
    config: DeltaConfig | None = None,
    engine: str = "auto",
    max_clips: int | None = None,
    refine: bool = True,
    alpha_range: tuple[float, float] = (1e-3, 8.0),
    iterations: int = 10,
    progress: Callable[[dict], None] | None = None,
) -> CalibrationResult:
    """Insert gates into ``model`` (a per-frame model or ``VideoModel`` trained without them)
    and pick their steps on ``clips`` (batches of unlabeled clips ``(B, T, C, H, W)``, or
    ``(clips, labels)`` pairs whose labels are ignored) to meet ``target``.

    ``config``: what to insert (default: pixel gates with hysteresis, on the input too, steps
    per channel). The user's model is not modified; ``result.model`` is a converted copy.
    ``progress(info)`` is called after every evaluation (the CLI draws a bar from it).
    """
    name, goal = parse_target(target)
    frame = model.frame_model if isinstance(model, VideoModel) else model
    frame = copy.deepcopy(frame).eval()
    if any(isinstance(m, DeltaActivation) for m in frame.modules()):
        raise ValueError("calibrate(): the model already has delta layers; calibrate the model "
                         "trained without them (a baseline run), or use it as it is")
    batches = _clip_batches(clips, max_clips)
    p = next(frame.parameters(), None)
    if p is not None:
        batches = [x.to(p.device) for x in batches]
    config = config or DeltaConfig(gate="pixel", mode="hysteresis", on_input=True,
                                   threshold_trainable=False)  # fmt: skip
    if config.kind != "delta":
        raise ValueError("calibrate(): config.kind must be 'delta'")
    with torch.no_grad():
        ref = [VideoModel(frame, average="none").eval()(x).float() for x in batches]
    gm = convert(frame, config, example_input=batches[0][:, 0]).eval()
    scales = _input_scales(gm, batches)
    layers = dict(sparsity_layers(gm))
    for n, m in layers.items():
        if m.granularity != "channel" or m.theta is None or m.theta.dim() != 1:
            raise ValueError(f"calibrate(): layer {n!r} has granularity {m.granularity!r}; "
                             "calibration sets per-channel steps (granularity='channel')")
    mult = {n: 1.0 for n in layers}
    history: list[dict] = []

    def meets(info: dict) -> bool:
        v = info[name]
        if v is None:  # only the executed density can be missing
            raise ValueError(f"calibrate(): the delta engine cannot run this model, so its "
                             f"executed density is unknown ({report_error[0]})")
        return v >= goal if TARGETS[name] == ">=" else v <= goal

    report_error = [None]

    def set_steps(alpha: float) -> None:
        with torch.no_grad():
            for n, m in layers.items():
                m.theta.copy_(alpha * mult[n] * scales[n].to(m.theta.device))

    def evaluate(alpha: float, stage: str) -> dict:
        set_steps(alpha)
        outs: list[torch.Tensor] = []
        report = measure(VideoModel(gm, average="none").eval(), batches,
                         callback=lambda out, batch: outs.append(out.float()),
                         engine=engine)  # fmt: skip
        agree = total = 0
        err = 0.0
        for y, r in zip(outs, ref, strict=True):
            agree += int((y.argmax(-1) == r.argmax(-1)).sum())
            total += y.shape[0] * y.shape[1]
            scale = r.abs().amax(-1).clamp_min(1e-12)
            err = max(err, float(((y - r).abs().amax(-1) / scale).max()))
        info = {
            "stage": stage, "alpha": alpha, "layer_scale": dict(mult),
            "agreement": agree / total, "max_logit_error": err,
            "executed_density": report.executed_fraction,
            "op_fraction": report.op_fraction,
        }
        report_error[0] = report.executed_error
        info["meets"] = meets(info)
        history.append(info)
        if progress is not None:
            progress(info)
        return info

    # Accuracy-type targets hold at small steps; the density target at large ones.
    want_large = name != "executed_density"
    lo, hi = math.log(alpha_range[0]), math.log(alpha_range[1])
    best = None
    edge = evaluate(math.exp(lo if want_large else hi), "bracket")
    if edge["meets"]:
        best = edge
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            info = evaluate(math.exp(mid), "bisect")
            if info["meets"]:
                best = info
                lo, hi = (mid, hi) if want_large else (lo, mid)
            else:
                lo, hi = (lo, mid) if want_large else (mid, hi)
        if refine:
            # one layer at a time, the most expensive first: bigger steps where the target
            # still holds (accuracy targets), smaller where it does (the density target)
            factor = 1.6 if want_large else 1 / 1.6
            order = sorted(layers, key=lambda n: -layers[n].fan_out * scales[n].numel())
            for n in order:
                before = mult[n]
                mult[n] = before * factor
                info = evaluate(best["alpha"], f"refine {n}")
                better = _cost(info) < _cost(best) if want_large \
                    else info["agreement"] > best["agreement"]
                if info["meets"] and better:
                    best = info
                else:
                    mult[n] = before
        mult.update(best["layer_scale"])
        met = True
    else:
        best = edge
        met = False
    set_steps(best["alpha"])
    thresholds = {n: m.threshold.detach().cpu().tolist() for n, m in layers.items()}
    achieved = {k: best[k] for k in ("agreement", "max_logit_error", "executed_density",
                                     "op_fraction")}  # fmt: skip
    return CalibrationResult(
        model=gm, target={name: goal}, met=met, alpha=best["alpha"], layer_scale=dict(mult),
        thresholds=thresholds, achieved=achieved, config=config.to_dict(), history=history,
    )  # fmt: skip


def _cost(info: dict) -> float:
    """What a bigger step should lower: the executed density, or where the engine cannot
    predict it, the counted operations (0.0 is a real figure, not a missing one)."""
    v = info["executed_density"]
    return info["op_fraction"] if v is None else v
