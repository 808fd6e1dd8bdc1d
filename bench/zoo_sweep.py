"""Today's CNNs through convert() and the delta engine: torchvision's ResNet-18/50, MobileNet
v2/v3, EfficientNet-B0, RegNetY-400MF, ConvNeXt-Tiny (random weights: no downloads) and the
in-repo YOLO-style neck, on the embedded realistic footage (camera shake, sensor noise,
flicker; x264 compression where PyAV is installed).

Per model: batch-norm statistics from the footage itself (random weights give unit-scale
activations that way), ``convert()`` with a gate after every activation type the model uses,
then 200 frames streamed through ``DeltaEngine`` (the fastest backend of the device):

* agreement: top-1 of the engine vs the converted PyTorch model on every frame (per pixel of
  the neck's prediction map), and the largest output difference relative to the largest logit;
  in half precision also the half model's and the engine's top-1 agreement with the float32
  model (both round; the engine should be about as close as the half model);
* history independence: every ``--check-every`` frames a freshly reset engine runs that frame
  alone; the largest relative difference to the streamed output and how many checks flip a
  quantiser (a different summation order on the dense first pass);
* executed density (the engine's effective / dense MACs) and the slower paths it took
  (``engine.stats.fallbacks``: dense fallbacks, no CUDA-graph step and why);
* cost at 100% density: the engine on frames that change everywhere (fresh noise each step;
  on CUDA its dense step, a CUDA graph of its dense pass, takes those) against the dense model
  of the same dtype (gate-free, BN folded; on a GPU the best of
  NCHW/channels-last x eager/CUDA graph with cuDNN autotuned, with cuDNN's default TF32
  convolutions and, the engine's precision, without), medians.

    python bench/zoo_sweep.py --out bench/results/zoo_sweep.json [--models a,b] [--res 224]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

import deltasparse as ds
from deltasparse._opset import activation_modules
from deltasparse.benchmark import _timed, gpu_dense_baselines
from deltasparse.data.synthetic import render_video
from deltasparse.exploit import fused_dense

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
          "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "yolo_neck"]  # fmt: skip


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def footage(frames: int, hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, bool]:
    """``(frames, 1, 3, H, W)`` float in [0, 1] from the embedded renderer, and whether it was
    compressed (PyAV present)."""
    try:
        import av  # noqa: F401

        crf = 23
    except ImportError:
        crf = None
    video, _ = render_video(seed, frames=frames, size=hw, seed=seed, crf=crf)
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float() / 255.0
    return x[:, None], crf is not None


def build(name: str) -> nn.Module:
    if name == "yolo_neck":
        return ds.models.YoloNeck()
    return ds.models.create(name, num_classes=1000)


def calibrate_bn(model: nn.Module, frames: torch.Tensor) -> nn.Module:
    """Batch-norm statistics of the footage (cumulative average over a batch of frames)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(frames)
    return model.eval()


def activation_types(model: nn.Module) -> tuple[str, ...]:
    acts = activation_modules()
    return tuple(sorted({type(m).__name__ for m in model.modules() if isinstance(m, acts)}))


def one_model(name: str, clip: torch.Tensor, device: torch.device, args) -> dict:
    t0 = time.perf_counter()
    model = build(name)
    calibrate_bn(model, clip[:: max(1, len(clip) // 16), 0])
    after = activation_types(model)
    cfg = ds.DeltaConfig(after=after, threshold_init=args.threshold)
    gm = ds.convert(model, cfg, example_input=clip[0]).eval().to(device)
    # half precision: the float32 model too, against which the half model and the half
    # engine both round (their agreement with it puts the engine's own in context)
    gm32 = copy.deepcopy(gm) if args.dtype != torch.float32 else None
    gm = gm.to(args.dtype)
    frames = [f.to(device, args.dtype) for f in clip]
    bound = 1e-5 if args.dtype == torch.float32 else 1e-3  # the history bound
    row: dict = {"model": name, "dtype": str(args.dtype).removeprefix("torch."),
                 "gates_after": list(after),
                 "gates": sum(isinstance(m, ds.DeltaActivation) for m in gm.modules())}  # fmt: skip
    eng = ds.DeltaEngine(gm)
    row["backend"] = eng.backend.name
    agree, worst, hist, hist_flips, checks = 0, 0.0, 0.0, 0, 0
    half_vs_32 = eng_vs_32 = 0.0
    # the PyTorch reference in float32 proper (cuDNN's convs default to TF32; the engine's
    # kernels do not), restored for the timed baselines below
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        for t, f in enumerate(frames):
            y = eng.step(f)
            want = gm(f)
            # top-1 per sample (per pixel for the neck's prediction map)
            agree += float((y.argmax(1) == want.argmax(1)).float().mean())
            if gm32 is not None:
                top32 = gm32(f.float()).argmax(1)
                half_vs_32 += float((want.argmax(1) == top32).float().mean())
                eng_vs_32 += float((y.argmax(1) == top32).float().mean())
            scale = max(float(want.abs().max()), 1e-12)
            worst = max(worst, float((y - want).abs().max()) / scale)
            if t and t % args.check_every == 0:
                fresh = ds.DeltaEngine(gm, backend=eng.backend.name)
                z = fresh.step(f)
                d = float((y - z).abs().max()) / max(float(z.abs().max()), 1e-12)
                hist, checks = max(hist, d), checks + 1
                hist_flips += int(d > bound)
    torch.backends.cudnn.allow_tf32 = tf32
    st = eng.stats
    if gm32 is not None:
        row["dense_half_vs_float32_agreement"] = half_vs_32 / len(frames)
        row["engine_vs_float32_agreement"] = eng_vs_32 / len(frames)
        del gm32
    row.update(frames=len(frames), top1_agreement=agree / len(frames),
               max_rel_error_vs_pytorch=worst, history_max_rel_diff=hist,
               history_checks=checks, history_bound=bound, history_checks_over_bound=hist_flips,
               executed_density=st.effective_macs / st.dense_macs, fallbacks=st.fallbacks,
               dense_gmacs_per_frame=st.dense_macs / st.frames / 1e9)  # fmt: skip
    # -- 100% density: every input pixel changes every frame --------------------------------
    g = torch.Generator(device=device).manual_seed(0)
    noisy = [torch.rand(clip.shape[1:], generator=g, device=device).to(args.dtype)
             for _ in range(args.timed)]  # fmt: skip
    full = ds.DeltaEngine(gm, backend=eng.backend.name)
    with torch.no_grad():
        for f in noisy[:3]:
            full.step(f)  # warm-up (kernels, graph capture)
        t_eng = [_timed(full.step, f, device)[1] for f in noisy]
    row["engine_full_ms"] = 1e3 * statistics.median(t_eng)
    row["engine_dense_step"] = full.dense_step
    row["engine_dense_steps"] = 0 if full._dense is None else full._dense.steps
    row["engine_full_density"] = full.stats.effective_macs / full.stats.dense_macs
    if device.type == "cuda":
        base = gpu_dense_baselines(gm.float(), [f.float() for f in noisy])
        gm.to(args.dtype)
        row["dense_baselines_ms"] = base
        if args.dtype == torch.float32:
            best = min(v for k, v in base.items() if k.startswith("float32"))
            ieee = min(v for k, v in base.items() if k.startswith("ieee32"))
            row["best_dense_ieee32_ms"] = ieee
            row["full_density_cost_vs_dense_ieee32"] = row["engine_full_ms"] / ieee
        else:  # gpu_dense_baselines times bfloat16 (float16 has the same tensor-core rate)
            best = min(v for k, v in base.items() if k.startswith("bfloat16"))
    else:
        dense = fused_dense(gm).eval()
        with torch.no_grad():
            for f in noisy[:3]:
                dense(f)
            best = 1e3 * statistics.median(_timed(dense, f, device)[1] for f in noisy)
    row["best_dense_same_dtype_ms"] = best
    row["full_density_cost_vs_dense"] = row["engine_full_ms"] / best
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/zoo_sweep.json")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--timed", type=int, default=20, help="frames timed at 100%% density")
    p.add_argument("--check-every", type=int, default=25)
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip, compressed = footage(args.frames, (args.res, args.res), seed=3)
    result = {
        "benchmark": "zoo_sweep",
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "resolution": args.res,
        "footage_compressed": compressed,
        "threshold_init": args.threshold,
        "dtype": str(args.dtype).removeprefix("torch."),
        "models": [],
    }
    for name in args.models.split(","):
        log(f"[{name}]")
        try:
            row = one_model(name, clip, device, args)
        except Exception as exc:  # noqa: BLE001 - a model that fails is a result, recorded
            row = {"model": name, "error": f"{type(exc).__name__}: {exc}"}
        log(json.dumps(row))
        result["models"].append(row)
        with open(args.out, "w") as fh:  # after every model: a killed run keeps the rest
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
