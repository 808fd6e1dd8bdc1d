"""Turn an engine plan into runtime ops for one frame shape (weights packed, BN folded)."""

from __future__ import annotations

import torch
from torch import fx, nn

from .kernels import Backend, ConvSpec, GeometryCache, LinearSpec, PoolSpec, WindowGeom
from .kernels.base import opmath
from .kernels.geometry import out_size, upsample_size, upsample_sources
from .ops import (
    AddOp,
    CatOp,
    Chain,
    ConvOp,
    FallbackOp,
    InputGateOp,
    InputOp,
    LinearOp,
    MulOp,
    PointwiseOp,
    PoolOp,
    RuntimeOp,
    SampleOp,
    UpsampleOp,
    Value,
)
from .plan import PlanOp, UnsupportedOpError, _arg, _pair

__all__ = ["Runtime", "build_runtime"]


class Runtime:
    def __init__(self, input_op: InputOp, ops: list[RuntimeOp], output: Value,
                 values: dict, dense_bytes: int, geoms: GeometryCache) -> None:  # fmt: skip
        self.input_op, self.ops, self.output = input_op, ops, output
        self.values, self.dense_bytes, self.geoms = values, dense_bytes, geoms

    def state_bytes(self) -> int:
        seen, total = set(), 0
        for v in self.values.values():
            if id(v.state) not in seen:
                seen.add(id(v.state))
                total += v.nbytes
        return total


def _fold_bn(w: torch.Tensor, b: torch.Tensor | None, bn: nn.Module):
    """Batch norm folded into copies of ``w`` / ``b`` (computed in float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"DeltaEngine: {type(bn).__name__} without running statistics cannot be folded"
        )
    s = bn.running_var.detach().double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    shift = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(s)
    b0 = b.detach().double() if b is not None else torch.zeros_like(s)
    w2 = w.detach().double() * s.reshape(-1, *([1] * (w.dim() - 1)))
    b2 = (b0 - bn.running_mean.detach().double()) * s + shift
    return w2.to(w.dtype), b2.to(opmath(w.dtype))  # the bias in the dtype it is added in


def _take_bn(chain: list, cls) -> nn.Module | None:
    """Pop a batch norm that directly follows a conv / linear (to fold it)."""
    if chain and chain[0].kind == "bn" and isinstance(chain[0].params["bn"], cls):
        return chain.pop(0).params["bn"]
    return None


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding_mode != "zeros":
        raise UnsupportedOpError(
            f"DeltaEngine: Conv2d padding_mode={m.padding_mode!r} is not supported (only zeros)"
        )
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedOpError(
                    "DeltaEngine: Conv2d padding='same' with an asymmetric pad is not supported"
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return _pair(m.padding)


def _pool_args(op: PlanOp) -> dict:
    n, m = op.node, op.module
    if op.kind == "maxpool":
        if m is not None:
            if m.return_indices:
                raise UnsupportedOpError("DeltaEngine: MaxPool2d(return_indices=True)")
            k, s, p, d, c = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
        else:
            k = _arg(n, 1, "kernel_size")
            s, p = _arg(n, 2, "stride"), _arg(n, 3, "padding", 0)
            d, c = _arg(n, 4, "dilation", 1), _arg(n, 5, "ceil_mode", False)
            if _arg(n, 6, "return_indices", False):
                raise UnsupportedOpError("DeltaEngine: max_pool2d(return_indices=True)")
        s = k if s is None or s == [] or s == () else s
        return dict(k=_pair(k), s=_pair(s), p=_pair(p), d=_pair(d), ceil=bool(c),
                    cip=True, div=None)  # fmt: skip
    if m is not None:
        k, s, p, c = m.kernel_size, m.stride, m.padding, m.ceil_mode
        cip, div = m.count_include_pad, m.divisor_override
    else:
        k = _arg(n, 1, "kernel_size")
        s, p, c = _arg(n, 2, "stride"), _arg(n, 3, "padding", 0), _arg(n, 4, "ceil_mode", False)
        cip, div = _arg(n, 5, "count_include_pad", True), _arg(n, 6, "divisor_override")
    s = k if s is None or s == [] or s == () else s
    return dict(k=_pair(k), s=_pair(s), p=_pair(p), d=(1, 1), ceil=bool(c), cip=bool(cip),
                div=div)  # fmt: skip


def _avg_divisor(h, w, ho, wo, a, batch, device) -> torch.Tensor:
    """PyTorch's avg_pool2d divisor of every output (count_include_pad, ceil_mode)."""
    def axis(n, o, k, s, p):
        start = torch.arange(o, device=device) * s - p
        end = torch.clamp(start + k, max=n + p)
        size = end - start
        return size, torch.clamp(end, max=n) - torch.clamp(start, min=0)

    (kh, kw), (sh, sw), (ph, pw) = a["k"], a["s"], a["p"]
    sy, vy = axis(h, ho, kh, sh, ph)
    sx, vx = axis(w, wo, kw, sw, pw)
    if a["div"]:
        d = torch.full((ho, wo), float(a["div"]), device=device)
    elif a["cip"]:
        d = (sy[:, None] * sx[None, :]).float()
    else:
        d = (vy[:, None] * vx[None, :]).float()
    return d.reshape(1, ho * wo).expand(batch, -1).reshape(-1, 1).contiguous()


def _mul_shape(name: str, ins: list) -> tuple[int, ...]:
    """The product's shape: both maps of one shape, or a map and a per-sample scale (a
    ``(B, C, 1, 1)`` value with the map's channels)."""
    a, b = ins
    if a.shape == b.shape:
        return a.shape
    m, s = (a, b) if a.rows >= b.rows else (b, a)
    if (m.spatial and s.spatial and m.layout == s.layout == "nchw" and s.hw == (1, 1)
            and (s.batch, s.channels) == (m.batch, m.channels)):  # fmt: skip
        return m.shape
    raise UnsupportedOpError(
        f"DeltaEngine: mul '{name}' of shapes {[v.model_shape for v in ins]}: only two maps of "
        "the same shape, or a map (B, C, H, W) and a per-sample scale (B, C, 1, 1)"
    )


def _permuted(name: str, x, dims: tuple) -> str:
    """The layout after a permute: NCHW <-> NHWC of a 4-d map, nothing else."""
    dims = tuple(int(d) % 4 for d in dims) if x.spatial else dims
    if x.spatial and x.layout == "nchw" and dims == (0, 2, 3, 1):
        return "nhwc"
    if x.spatial and x.layout == "nhwc" and dims == (0, 3, 1, 2):
        return "nchw"
    raise UnsupportedOpError(
        f"DeltaEngine: permute '{name}' by {dims} of {x.model_shape}: only NCHW -> NHWC "
        "(0, 2, 3, 1) and back (0, 3, 1, 2)"
    )


def _fallback_fn(node: fx.Node, modules: dict, pos: dict):
    def fn(tensors):
        env = {n: tensors[i] for n, i in pos.items()}
        args = fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
        if node.op == "call_module":
            return modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    return fn


def build_runtime(gm: fx.GraphModule, plan: list[PlanOp], alias: dict, frame_shape, *,
                  backend: Backend, crossover: dict, device, dtype,
                  geoms: GeometryCache) -> Runtime:  # fmt: skip
    modules = dict(gm.named_modules())
    values: dict[fx.Node, Value] = {}
    ops: list[RuntimeOp] = []
    input_op = None
    output = None
    dense_bytes = 0
    bsz = int(frame_shape[0])
    mdt = opmath(dtype)  # what the kernels compute in (float32 for half precision)

    def geom(**kw) -> WindowGeom:
        return geoms.get(WindowGeom(device=torch.device(device), **kw))

    for op in plan:
        ins = [values[n] for n in op.inputs]
        name = op.label
        chain_ops = list(op.chain)
        # tensors the dense model materialises for this op (a gate that took over the
        # activation before it, DeltaConfig.absorb_activation, still makes two)
        n_nodes = 1 + len(chain_ops) + sum(
            1 for c in chain_ops if c.kind == "quant" and c.params["layer"].activation)
        if op.kind == "output":
            output = ins[0]
            continue
        if op.kind == "input":
            v = Value(op.node.name, tuple(frame_shape), device, dtype)
            input_op = InputOp(name, "input", [], v, Chain([], v.shape, device, dtype),
                               backend, crossover)  # fmt: skip
            input_op.stats.out_rows = v.rows
            dense_bytes += v.dense_bytes()
            values[op.node] = v
            if not chain_ops:
                values[op.out] = v
                continue
            # A quantiser (or other pointwise op) right on the input pixels.
            out = Value(op.out.name, v.shape, device, dtype)
            chain = Chain(chain_ops, v.shape, device, dtype)
            rop = PointwiseOp(op.out.name, "pointwise", [v], out, chain, backend=backend,
                              crossover=crossover)  # fmt: skip
            values[op.out] = out
            dense_bytes += out.dense_bytes() * (n_nodes - 1)
            ops.append(rop)
            continue
        x = ins[0]
        kw = dict(backend=backend, crossover=crossover)
        if op.kind == "conv":
            m = op.module
            if not x.spatial or x.channels != m.in_channels or x.layout != "nchw":
                raise UnsupportedOpError(
                    f"DeltaEngine: Conv2d '{name}' expects (B, {m.in_channels}, H, W), got "
                    f"{x.model_shape}"
                )
            w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            bn = _take_bn(chain_ops, nn.BatchNorm2d)
            if bn is not None:
                w, b = _fold_bn(w, b, bn)
            # the bias in the dtype it is added in (float32 for half precision, kernels/base)
            w, b = w.to(device, dtype).clone(), None if b is None else b.to(device, mdt).clone()
            pad = _conv_padding(m)
            (h, wd), k, s, d = x.hw, m.kernel_size, m.stride, m.dilation
            ho = out_size(h, k[0], s[0], pad[0], d[0])
            wo = out_size(wd, k[1], s[1], pad[1], d[1])
            out_shape = (bsz, m.out_channels, ho, wo)
            g = geom(batch=bsz, in_hw=(h, wd), out_hw=(ho, wo), kernel=tuple(k),
                     stride=tuple(s), padding=pad, dilation=tuple(d))  # fmt: skip
            out = Value(op.out.name, out_shape, device, dtype)
            chain = Chain(chain_ops, out_shape, device, dtype)
            if g.is_identity and m.groups == 1:
                spec = LinearSpec(w.reshape(w.shape[0], -1).t().contiguous(), b)
                backend.prepare(spec)
                rop = LinearOp(name, "conv1x1", [x], out, chain, spec=spec, **kw)
            else:
                spec = ConvSpec.from_weight(g, w, b, m.groups)
                backend.prepare(spec)
                kind = "depthwise" if spec.depthwise else "conv"
                rop = ConvOp(name, kind, [x], out, chain, spec=spec, **kw)
        elif op.kind == "linear":
            m = op.module
            rowwise = x.layout == "nhwc" or not x.spatial  # a Linear on the last dim: per row
            if not rowwise or x.channels != m.in_features:
                raise UnsupportedOpError(
                    f"DeltaEngine: Linear '{name}' expects (B, {m.in_features}) or channels-last "
                    f"(B, H, W, {m.in_features}) input, got {x.model_shape}; flatten the feature "
                    "map first (or permute it to channels-last)"
                )
            w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            bn = _take_bn(chain_ops, nn.BatchNorm1d)
            if bn is not None:
                w, b = _fold_bn(w, b, bn)
            w = w.to(device, dtype)
            spec = LinearSpec(w.t().contiguous(), None if b is None else b.to(device, mdt))
            backend.prepare(spec)
            out_shape = (bsz, m.out_features, *x.shape[2:])
            out = Value(op.out.name, out_shape, device, dtype, layout=x.layout)
            chain = Chain(chain_ops, out_shape, device, dtype, x.layout)
            rop = LinearOp(name, "linear", [x], out, chain, spec=spec, **kw)
        elif op.kind in ("maxpool", "avgpool", "adaptive", "gpool"):
            if not x.spatial or x.layout != "nchw":
                raise UnsupportedOpError(
                    f"DeltaEngine: pooling '{name}' needs (B, C, H, W), got {x.model_shape}")
            (h, wd), c = x.hw, x.channels
            kind = op.kind
            if kind == "adaptive":
                osz = op.params["output_size"]
                oh, ow = osz if isinstance(osz, (tuple, list)) else (osz, osz)
                oh, ow = oh or h, ow or wd
                if (oh, ow) == (1, 1):
                    kind, keep = "gpool", True
                elif h % oh == 0 and wd % ow == 0:
                    kind = "avgpool"
                    a = dict(k=(h // oh, wd // ow), s=(h // oh, wd // ow), p=(0, 0), d=(1, 1),
                             ceil=False, cip=True, div=None)  # fmt: skip
                else:
                    raise UnsupportedOpError(
                        f"DeltaEngine: AdaptiveAvgPool2d '{name}' to {(oh, ow)} from {(h, wd)} "
                        "(only global pooling or sizes that divide the input)"
                    )
            else:
                keep = op.params.get("keepdim", True)
                if kind != "gpool":
                    a = _pool_args(op)
            if kind == "gpool":
                out_shape = (bsz, c, 1, 1) if keep else (bsz, c)
                out = Value(op.out.name, out_shape, device, dtype)
                chain = Chain(chain_ops, out_shape, device, dtype)
                rop = SampleOp(name, "global_avgpool", [x], out, chain, mode="mean", **kw)
            else:
                ho = out_size(h, a["k"][0], a["s"][0], a["p"][0], a["d"][0], a["ceil"])
                wo = out_size(wd, a["k"][1], a["s"][1], a["p"][1], a["d"][1], a["ceil"])
                g = geom(batch=bsz, in_hw=(h, wd), out_hw=(ho, wo), kernel=a["k"],
                         stride=a["s"], padding=a["p"], dilation=a["d"])  # fmt: skip
                mode = "max" if kind == "maxpool" else "avg"
                spec = PoolSpec(g, mode, a["ceil"], a["cip"], a["div"])
                if mode == "avg":
                    spec.divisor = _avg_divisor(h, wd, ho, wo, a, bsz, device).to(mdt)
                backend.prepare(spec)
                out_shape = (bsz, c, ho, wo)
                out = Value(op.out.name, out_shape, device, dtype)
                chain = Chain(chain_ops, out_shape, device, dtype)
                rop = PoolOp(name, f"{mode}pool", [x], out, chain, spec=spec, **kw)
        elif op.kind == "flatten":
            if x.layout != "nchw":
                raise UnsupportedOpError(
                    f"DeltaEngine: flatten '{name}' of a channels-last map {x.model_shape}")
            out_shape = (bsz, x.channels * x.hw[0] * x.hw[1])
            if not x.spatial or x.hw == (1, 1):
                if not chain_ops:  # a pure reshape of the same rows
                    values[op.out] = x.alias(op.out.name, out_shape)
                    continue
                out = Value(op.out.name, out_shape, device, dtype)
                chain = Chain(chain_ops, out_shape, device, dtype)
                rop = PointwiseOp(name, "flatten", [x], out, chain, **kw)
            else:
                out = Value(op.out.name, out_shape, device, dtype)
                chain = Chain(chain_ops, out_shape, device, dtype)
                rop = SampleOp(name, "flatten", [x], out, chain, mode="flatten", **kw)
        elif op.kind in ("add", "mul", "cat", "pointwise", "permute"):
            layout = x.layout
            if op.kind in ("add", "mul") and (
                    len(ins) != 2 or ins[0].layout != ins[1].layout):  # fmt: skip
                raise UnsupportedOpError(
                    f"DeltaEngine: {op.kind} '{name}' needs two tensors, got "
                    f"{[v.model_shape for v in ins]}"
                )
            if op.kind == "add":
                if ins[0].shape != ins[1].shape:
                    raise UnsupportedOpError(
                        f"DeltaEngine: add '{name}' needs two tensors of the same shape, got "
                        f"{[v.model_shape for v in ins]} (scalars and broadcasting are not "
                        "supported)"
                    )
                out_shape, cls = ins[0].shape, AddOp
            elif op.kind == "mul":
                out_shape, cls = _mul_shape(name, ins), MulOp
            elif op.kind == "cat":
                dim = op.params["dim"] % len(x.shape)
                channel_dim = 3 if layout == "nhwc" else 1
                same = all(v.shape[:1] + v.shape[2:] == x.shape[:1] + x.shape[2:]
                           and v.layout == layout for v in ins)  # fmt: skip
                if dim != channel_dim or not same:
                    raise UnsupportedOpError(
                        f"DeltaEngine: cat '{name}' only along channels (dim={channel_dim}), got "
                        f"dim {op.params['dim']} with shapes {[v.model_shape for v in ins]}"
                    )
                out_shape = (bsz, sum(v.channels for v in ins), *x.shape[2:])
                cls = CatOp
            elif op.kind == "permute":
                layout = _permuted(name, x, op.params["dims"])
                if not chain_ops:  # the same rows, read in the other layout
                    values[op.out] = x.alias(op.out.name, x.shape, layout)
                    continue
                out_shape, cls = x.shape, PointwiseOp
            else:
                out_shape, cls = x.shape, PointwiseOp
            out = Value(op.out.name, out_shape, device, dtype, layout=layout)
            chain = Chain(chain_ops, out_shape, device, dtype, layout)
            rop = cls(name, op.kind, ins, out, chain, **kw)
        elif op.kind == "upsample":
            if not x.spatial or x.layout != "nchw":
                raise UnsupportedOpError(
                    f"DeltaEngine: upsampling '{name}' needs (B, C, H, W), got {x.model_shape}")
            p = op.params
            scales = None if p["size"] is not None or p["recompute"] else p["scale"]
            ohw = upsample_size(x.hw, p["size"], p["scale"])
            idx, wt = upsample_sources(bsz, x.hw, ohw, p["mode"], p["align_corners"], scales,
                                       dtype)  # fmt: skip
            out_shape = (bsz, x.channels, *ohw)
            out = Value(op.out.name, out_shape, device, dtype)
            chain = Chain(chain_ops, out_shape, device, dtype)
            weight = None if wt.shape[1] == 1 else wt.to(device, mdt)
            rop = UpsampleOp(name, "upsample", [x], out, chain, idx=idx.to(device),
                             weight=weight, **kw)  # fmt: skip
        elif op.kind == "fallback":
            if any(v.layout != "nchw" for v in ins):
                raise UnsupportedOpError(
                    f"DeltaEngine: no dense fallback for '{name}' on a channels-last tensor "
                    f"{[v.model_shape for v in ins]} (only NCHW and (B, F) tensors)"
                )
            pos = {n: i for i, n in enumerate(op.inputs)}
            fn = _fallback_fn(op.node, modules, pos)
            with torch.no_grad():
                y = fn([torch.zeros(v.shape, device=device, dtype=dtype) for v in ins])
            if not isinstance(y, torch.Tensor) or y.dim() not in (2, 4):
                raise UnsupportedOpError(
                    f"DeltaEngine: dense fallback for '{name}' must return a (B, C, H, W) or "
                    f"(B, F) tensor"
                )
            out_shape = tuple(y.shape)
            out = Value(op.out.name, out_shape, device, dtype)
            chain = Chain(chain_ops, out_shape, device, dtype)
            rop = FallbackOp(name, "fallback", ins, out, chain, fn=fn, **kw)
        else:  # pragma: no cover
            raise AssertionError(op.kind)
        values[op.out] = out
        dense_bytes += out.dense_bytes() * n_nodes
        ops.append(rop)
    if input_op is None or output is None:
        raise UnsupportedOpError("DeltaEngine: the graph has no input or no output")
    readers = [o for o in ops if any(v.state is input_op.out.state for v in o.inputs)]
    if readers and all(isinstance(o, PointwiseOp) and o.chain.gated for o in readers):
        input_op.detect = False  # an input gate examines every pixel itself
        gate = readers[0]
        fuses = getattr(backend, "fuses_frame_gate", None)
        if len(readers) == 1 and fuses is not None and fuses(gate.chain, dtype):
            fused = InputGateOp(gate.name, gate.kind, gate.inputs, gate.out, gate.chain,
                                backend=backend, crossover=crossover, source=input_op)  # fmt: skip
            ops[ops.index(gate)] = fused
    return Runtime(input_op, ops, output, values, dense_bytes, geoms)
