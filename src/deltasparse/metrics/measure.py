"""``measure(model, batches)``: temporal and spatial densities, op fraction and exact MACs.

On a converted model it counts what the inserted layers emit (nonzero deltas within clips for
delta layers, nonzero activations for L1 layers). On a plain model it probes the outputs of the
activation modules (spatial density), so that a baseline can be compared with the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .._graph import Consumer, FanOutError, find_consumers, is_attention
from ..convert import DeltaConfig, convert
from ..layers import (
    DeltaActivation,
    SparsityLayer,
    TokenDelta,
    VideoModel,
    clip_context,
    sparsity_layers,
)
from .executed import executed_counter
from .macs import consumer_macs
from .report import LayerReport, SparsityReport

__all__ = ["measure", "record_outputs"]


@contextmanager
def record_outputs(layers: dict[str, nn.Module], fn):
    """Call ``fn(name, module, output)`` after each forward of ``layers``; hooks removed on exit."""
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: fn(name, mod, out))
        for name, m in layers.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Acc:
    kind: str
    fan_out: float
    consumers: list[Consumer] | None
    shape: list[int] = field(default_factory=list)
    act_nonzero: int = 0
    act_total: int = 0
    delta_nonzero: int = 0
    delta_total: int = 0
    eff: int = 0
    dense: int = 0
    frames: int = 0
    dense_per_frame: int | None = None


def _split_batch(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _consumers_by_layer(gm: nn.Module, names: list[str]) -> dict[str, list[Consumer] | None]:
    out: dict[str, list[Consumer] | None] = {n: None for n in names}
    if not isinstance(gm, fx.GraphModule):
        return out
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in out:
            try:
                out[node.target] = find_consumers(gm, node)
            except FanOutError:
                out[node.target] = None
    return out


@torch.no_grad()
def measure(
    model: nn.Module,
    batches: Iterable,
    *,
    max_batches: int | None = None,
    count_macs: bool = True,
    callback=None,
    engine: str | None = "auto",
    crossover: dict[str, float] | None = None,
) -> SparsityReport:
    """Measure the sparsity of ``model`` over ``batches`` and return a :class:`SparsityReport`.

    ``batches`` yields input tensors or ``(input, target)`` pairs: clips ``(B, T, C, H, W)`` (a
    per-frame model is wrapped in :class:`VideoModel` for them) or frames ``(N, C, H, W)``
    (spatial densities only). The model is run in eval mode and restored afterwards.
    ``callback(output, batch)`` is called after each forward (e.g. to score accuracy in the
    same pass).

    ``engine`` (a :class:`DeltaEngine` backend name, ``None`` to skip): also predict the MACs
    the delta engine executes on the same clips -- each batch of ``B`` clips run as ``B``
    streams -- from the engine's own row-selection rules (``report.executed``). ``crossover``
    is passed to the engine's rules as to ``DeltaEngine``.
    """
    video = model if isinstance(model, VideoModel) else None
    frame_model = video.frame_model if video is not None else model
    probed = not any(True for _ in sparsity_layers(frame_model))
    if probed and any(is_attention(m) for m in frame_model.modules()):
        # a plain transformer: token gates that send every token that changed at all (a step
        # of 1e-30) count the temporal changes the engine would compute on the dense model
        frame_model = convert(frame_model, DeltaConfig(kind="token", sparsity_weight=0.0,
                                                       threshold_init=1e-30))  # fmt: skip
    elif probed:  # a plain model: probe its activations with zero-weight L1 layers
        frame_model = convert(frame_model, DeltaConfig(kind="l1", sparsity_weight=0.0))
    layers = dict(sparsity_layers(frame_model))
    if not layers:
        raise ValueError(
            f"measure(): {type(frame_model).__name__} has no activation modules or sparsity "
            f"layers to measure"
        )
    consumers = _consumers_by_layer(frame_model, list(layers)) if count_macs else {}
    modules = dict(frame_model.named_modules())
    accs = {
        name: _Acc(
            "activation" if probed and not isinstance(m, TokenDelta) else _kind(m),
            m.fan_out,
            None if isinstance(m, TokenDelta) else consumers.get(name),
        )
        for name, m in layers.items()
    }
    ones_cache: dict[str, int] = {}

    def macs(acc: _Acc, name: str, binary: torch.Tensor) -> None:
        if acc.consumers is None:
            return
        acc.eff += sum(consumer_macs(c, binary, modules) for c in acc.consumers)
        if name not in ones_cache:
            one = torch.ones_like(binary[:1])
            ones_cache[name] = sum(consumer_macs(c, one, modules) for c in acc.consumers)
        acc.dense += ones_cache[name] * binary.shape[0]

    def on_output(name: str, layer: SparsityLayer, out: torch.Tensor) -> None:
        acc = accs[name]
        acc.shape = list(out.shape[1:])
        t = layer.clip_len
        if isinstance(layer, TokenDelta) and t is not None:
            # tokens sent in frames t >= 1, as the gate counted them (a budget policy may send
            # an unchanged token: the engine computes it all the same)
            acc.delta_nonzero += layer.stats.nonzero
            acc.delta_total += layer.stats.total
            acc.act_nonzero += int(torch.count_nonzero(out))
            acc.act_total += out.numel()
            acc.frames += out.shape[0]
            return
        if isinstance(layer, DeltaActivation) and t is not None:
            clip = out.reshape(out.shape[0] // t, t, *out.shape[1:])
            q = clip.cumsum(dim=1) if layer.delta_output else clip
            d = clip[:, 1:] if layer.delta_output else q[:, 1:] - q[:, :-1]
            changed = layer.changed_mask(d.flatten(0, 1))  # whole pixels for pixel gates
            acc.delta_nonzero += int(changed.sum())
            acc.delta_total += d.numel()
            acc.act_nonzero += int(torch.count_nonzero(q))
            acc.act_total += q.numel()
            binary = changed.float()
        else:
            acc.act_nonzero += int(torch.count_nonzero(out))
            acc.act_total += out.numel()
            binary = (out != 0).float()
        acc.frames += binary.shape[0]
        macs(acc, name, binary)

    runner = VideoModel(frame_model, video.average) if (video is not None and probed) else video
    counter = executed_counter(frame_model, backend=engine, crossover=crossover) if engine else None
    was_training = model.training
    model.eval()
    frame_model.eval()
    shapes_known = False
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = _split_batch(batch)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"measure(): batch {i} is a {type(x).__name__}, not a tensor")
            p = next(frame_model.parameters(), None)
            if p is not None:
                x = x.to(p.device)
            is_clip = x.dim() == 5 or (video is not None)
            if is_clip and runner is None:
                runner = VideoModel(frame_model)
            if count_macs and not shapes_known and isinstance(frame_model, fx.GraphModule):
                frame = x[0, :1] if is_clip else x[:1]
                ShapeProp(frame_model).propagate(frame)
                shapes_known = True
            with record_outputs(layers, on_output):
                if is_clip and counter is not None and counter.ok and x.shape[1] >= 2:
                    b, t = x.shape[:2]
                    with clip_context(frame_model, t):
                        y = counter.run(x.reshape(b * t, *x.shape[2:]), b, t)
                    out = runner.pool(y, b, t)
                else:
                    out = (runner if is_clip else frame_model)(x)
            if callback is not None:
                callback(out, batch)
    finally:
        model.train(was_training)
    report = _build_report(accs, layers)
    if counter is not None:
        report.executed = counter.summary()
        report.executed_error = counter.error
    return report


def _kind(layer: SparsityLayer) -> str:
    if isinstance(layer, TokenDelta):
        return "token"
    return "delta" if isinstance(layer, DeltaActivation) else "l1"


def _threshold_stats(layer: SparsityLayer) -> dict | None:
    if not isinstance(layer, (DeltaActivation, TokenDelta)) or layer.theta is None:
        return None
    thr = layer.threshold.detach().flatten().float().cpu()
    return {
        "mean": float(thr.mean()),
        "min": float(thr.min()),
        "max": float(thr.max()),
        "median": float(thr.median()),
        "values": thr.tolist() if thr.numel() <= 4096 else None,
    }


def _build_report(accs: dict[str, _Acc], layers: dict[str, SparsityLayer]) -> SparsityReport:
    rows = []
    temporal = any(a.delta_total for a in accs.values())
    for name, a in accs.items():
        if a.act_total == 0:
            raise ValueError(
                f"measure(): layer '{name}' never ran; check that the batches reach it"
            )
        use_delta = a.delta_total > 0
        rows.append(
            LayerReport(
                name=name,
                kind=a.kind,
                shape=a.shape,
                fan_out=a.fan_out,
                nonzero=a.delta_nonzero if use_delta else a.act_nonzero,
                total=a.delta_total if use_delta else a.act_total,
                temporal_density=a.delta_nonzero / a.delta_total if use_delta else None,
                spatial_density=a.act_nonzero / a.act_total,
                effective_macs=a.eff if a.consumers is not None else None,
                dense_macs=a.dense if a.consumers is not None else None,
                frames=a.frames,
                threshold=_threshold_stats(layers[name]),
            )
        )
    return SparsityReport(rows, mode="temporal" if temporal else "spatial")
