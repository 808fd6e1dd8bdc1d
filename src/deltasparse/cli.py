"""The ``deltasparse`` command line: ``demo``, ``train``, ``eval``, ``stream``, ``bench``, ``report``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from . import __version__

__all__ = ["main"]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Options of ``train``. Their defaults are None (TrainConfig's apply), so that ``--resume``
    can tell the options given from those left out: left out, the saved value is kept."""
    from .data.layout import LAYOUTS
    from .train import PHASES, RESUME_MAY_CHANGE, TrainConfig

    d = TrainConfig()

    def _flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def opt(g, flag: str, help: str = "", **kw) -> None:
        dest = flag[2:].replace("-", "_")
        default = getattr(d, dest, None)
        shown = f" (default {default})" if default is not None else ""
        g.add_argument(flag, default=None, help=f"{help}{shown}".strip(), **kw)

    g = p.add_argument_group("run")
    opt(g, "--phase", "recipe step: baseline, l1 (from baseline), delta (from l1), delta_scratch",
        choices=PHASES)
    g.add_argument("--out", default=None, help="run folder (default runs/<phase>)")
    g.add_argument("--init-from", default=None, help="model.pt of the previous phase")
    may_change = {"progress": "--no-progress"}
    g.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in OUT from its checkpoint.pt; options left "
                   "out keep their saved values, and only "
                   f"{', '.join(may_change.get(k, _flag(k)) for k in RESUME_MAY_CHANGE)} may "
                   "differ from them")
    g.add_argument("--force", action="store_true",
                   help="train into OUT even though it holds a run (its files are replaced)")
    opt(g, "--seed", type=int)
    opt(g, "--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--amp", default=None, choices=["bf16"], help="mixed precision (GPU)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("data")
    opt(g, "--data", "'synthetic' (embedded) or a folder: UCF101 layout or class folders")
    opt(g, "--split", "1..3 for UCF101 (official lists), 1..5 for class folders", type=int)
    opt(g, "--layout", "auto: UCF101 when classInd.txt is found, else class folders",
        choices=LAYOUTS)
    g.add_argument("--splits-dir", default=None,
                   help="folder holding classInd.txt and the UCF101 split lists")
    g.add_argument("--cache-dir", default=None, help="decoded-frame cache (reused across runs)")
    opt(g, "--synthetic-videos", type=int)
    opt(g, "--synthetic-classes", type=int)
    opt(g, "--synthetic-frames", "frames per synthetic video", type=int)
    opt(g, "--resolution", "square crop size", type=int)
    opt(g, "--clip-len", "frames per training clip", type=int)
    g.add_argument("--eval-clip-len", type=int, default=None,
                   help="frames per evaluation clip (default: --clip-len)")
    opt(g, "--frame-stride", type=int)
    opt(g, "--eval-clips-per-video", type=int)
    opt(g, "--workers", "DataLoader workers", type=int)
    g = p.add_argument_group("model and optimisation")
    opt(g, "--model", "registry name (mobilenet_v1, resnet18, ...)")
    opt(g, "--width", "width multiplier", type=float)
    opt(g, "--epochs", type=int)
    opt(g, "--batch-size", type=int)
    opt(g, "--optimizer", choices=["sgd", "adamw"])
    opt(g, "--lr", type=float)
    opt(g, "--weight-decay", type=float)
    opt(g, "--lr-schedule", choices=["cosine", "constant"])
    opt(g, "--warmup-epochs", type=float)
    opt(g, "--distill", "weight of the --init-from model's soft targets (knowledge "
        "distillation; 0: cross-entropy only)", type=float)
    opt(g, "--distill-temperature", "softmax temperature of the distillation", type=float)
    g = p.add_argument_group("sparsity")
    opt(g, "--sparsity-weight", type=float)
    opt(g, "--sparsity-schedule", choices=["constant", "linear", "sine"])
    opt(g, "--threshold-init", type=float)
    opt(g, "--threshold-lr-mult", type=float)
    opt(g, "--granularity", choices=["layer", "channel", "neuron"])
    opt(g, "--gate", "scalar (the paper) or pixel (whole pixels, as the engine skips them)",
        choices=["scalar", "pixel"])
    opt(g, "--mode", "grid (the paper's quantiser) or hysteresis (send changes above the step)",
        choices=["grid", "hysteresis"])
    g.add_argument("--input-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="a delta layer on the input pixels too (stops sensor noise at conv1)")
    opt(g, "--input-threshold-init", "initial step of the input gate (default --threshold-init)",
        type=float)


def _config_from_args(args, base=None):
    """TrainConfig of the options given, on top of ``base`` (a saved config) or the defaults."""
    from .train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    kw["out"] = args.out or f"runs/{args.phase or (base.phase if base else 'baseline')}"
    kw["progress"] = not args.no_progress
    return dataclasses.replace(base, **kw) if base is not None else TrainConfig(**kw)


def _cmd_train(args) -> int:
    from rich.console import Console

    from .train import run_state, saved_config, train

    out = args.out or f"runs/{args.phase or 'baseline'}"
    # --resume: start from the saved settings, so that only the options given can differ
    base = saved_config(out) if args.resume and run_state(out) == "unfinished" else None
    cfg = _config_from_args(args, base)
    console = Console()
    result = train(cfg, resume=args.resume, force=args.force, console=console)
    if result:
        console.print(
            f"[bold]{cfg.phase}[/]: accuracy {100 * result['accuracy']:.2f}% (clip "
            f"{100 * result['clip_accuracy']:.2f}%), op_fraction {100 * result['op_fraction']:.2f}%"
            f" → {cfg.out}/eval.json", soft_wrap=True
        )
    return 0


def _cmd_eval(args) -> int:
    import torch
    from rich.console import Console

    from .checkpoint import check_classes, sanitize, write_json_atomic
    from .train import build_dataset, data_summary, evaluate, load_model, print_data_summary

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device is 'cuda' but no CUDA device is available; pass --device cpu "
                         "(or auto)")
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, ckpt = load_model(args.checkpoint, map_location=device)
    overrides = {"data": args.data, "split": args.split, "cache_dir": args.cache_dir,
                 "eval_clip_len": args.clip_len, "batch_size": args.batch_size,
                 "layout": args.layout, "splits_dir": args.splits_dir}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    eval_set = build_dataset(cfg, False, clip_flag="--clip-len")
    console = Console(stderr=True)  # stdout may carry the JSON
    print_data_summary(console, data_summary(cfg, None, eval_set))
    data = "the synthetic data" if cfg.data == "synthetic" else cfg.data
    check_classes(ckpt, list(eval_set.class_names), what=f"checkpoint {args.checkpoint}",
                  data=data)
    model.to(device)
    result = evaluate(model, eval_set, cfg, device)
    if args.engine:
        result["engine"] = _engine_stage(model, cfg, args.streams, args.threads, console)
    text = json.dumps(sanitize(result), indent=2, allow_nan=False)
    if args.out:
        write_json_atomic(result, args.out)
    else:
        print(text)
    console.print(
        f"video accuracy {100 * result['video_accuracy']:.2f}%, clip accuracy "
        f"{100 * result['clip_accuracy']:.2f}%, op_fraction {100 * result['op_fraction']:.2f}% "
        f"(op reduction {result['op_reduction']:.2f}x)", soft_wrap=True
    )
    return 0


def _engine_stage(model, cfg, streams: int, threads: int | None, console) -> dict:
    """The held-out videos through DeltaEngine, timed against dense (see deltasparse.exploit)."""
    from .exploit import exploit, summary_line
    from .progress import task_progress

    with task_progress("engine: streaming the held-out videos", console=console) as bar:
        r = exploit(model.eval(), cfg, streams=streams, threads=threads, progress=bar)
    console.print(f"engine: {summary_line(r)}", soft_wrap=True)
    return r


def _cmd_calibrate(args) -> int:
    from rich.console import Console

    from .calibration_run import calibrate_run
    from .progress import task_progress

    console = Console()
    with task_progress(f"calibrating to {args.target}", console=console) as bar:
        n = [0]

        def on_step(info: dict) -> None:
            n[0] += 1
            bar(n[0], None, info=f"{info['stage']}: agreement {info['agreement']:.3f}, executed "
                                 f"{_pct(info['executed_density'])}")

        ev = calibrate_run(args.checkpoint, args.out, target=args.target, clips=args.clips,
                           gate=args.gate, mode=args.mode, input_gate=args.input_gate,
                           force=args.force, device=args.device, progress=on_step)  # fmt: skip
    cal = ev["calibration"]
    a = cal["achieved"]
    console.print(
        f"calibrated ({'target met' if cal['met'] else '[red]target NOT met[/]'}): agreement "
        f"{100 * a['agreement']:.2f}% on the calibration clips, executed density "
        f"{_pct(a['executed_density'])}; held-out accuracy {100 * ev['accuracy']:.2f}% → "
        f"{args.out}", soft_wrap=True)  # fmt: skip
    return 0 if cal["met"] else 3


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _cmd_report(args) -> int:
    from .report import build_report

    out = Path(args.out)
    build_report(args.runs, out, title=args.title)
    print(f"report written to {out / 'report.html'}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.out), quick=args.quick, seed=args.seed, device=args.device,
                       model=args.model)  # fmt: skip
    return 0 if summary else 1


def _size(text: str | None):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size expects HxW (e.g. 360x640), got {text!r}") from None
    return (h, w)


def _cmd_stream(args) -> int:
    from .checkpoint import write_json_atomic
    from .printing import StreamProgress, print_stream
    from .stream import run_stream

    with StreamProgress(total=args.max_frames) as bar:
        result = run_stream(
            args.video, args.checkpoint, device=args.device, backend=args.backend,
            size=_size(args.size), max_frames=args.max_frames, verify_every=args.verify_every,
            rtol=args.verify_rtol, strict=False, on_frame=bar,
        )  # fmt: skip
    out = Path(args.out)
    write_json_atomic(result, out)
    print_stream(result)
    print(f"per-frame predictions and stats written to {out}")
    verify = result.get("verify")
    return 1 if verify and not verify["passed"] else 0


def _cmd_bench(args) -> int:
    from .benchmark import run_bench
    from .checkpoint import write_json_atomic
    from .printing import print_bench

    def progress(row: dict) -> None:
        best = ""
        if "best_dense_bf16_ms" in row:  # a GPU: the fastest dense model per dtype
            best = (f"; best dense fp32 {row['best_dense_fp32_ms']:.2f} ms "
                    f"({row['speedup_vs_best_dense_fp32']:.2f}x), bf16 "
                    f"{row['best_dense_bf16_ms']:.2f} ms ({row['speedup_vs_best_dense_bf16']:.2f}x)")
        print(
            f"  {row['model']} {row['height']}x{row['width']} threads={row['threads']} "
            f"density={row['density']:.1%}: fused dense {row['fused_dense_ms']:.1f} ms, delta "
            f"{row['delta_ms']:.1f} ms ({row['speedup_vs_fused_dense']:.2f}x){best}", flush=True,
        )  # fmt: skip

    result = run_bench(
        models=args.models, resolutions=args.resolutions, threads=args.threads,
        densities=args.densities, device=args.device, frames=args.frames, batch=args.batch,
        backend=args.backend, checkpoint=args.checkpoint, seed=args.seed, progress=progress,
        dtype=args.dtype,
    )  # fmt: skip
    result["command"] = " ".join(["deltasparse", *sys.argv[1:]])
    write_json_atomic(result, args.out)
    print_bench(result)
    print(f"results written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltasparse",
        description="Train networks for temporal activation sparsity (Delta Activation Layer) "
        "and run them as exact delta inference on streams.",
    )
    p.add_argument("--version", action="version", version=f"deltasparse {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("demo", help="baseline → l1 → delta on the embedded synthetic videos")
    s.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    s.add_argument("--quick", action="store_true", help="a tiny run (about 2 minutes, for CI)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    s.add_argument("--model", default=None, choices=["dsconvnet", "vit_tiny"],
                   help="the CNN recipe (dsconvnet, default: baseline → l1 → delta, calibration) "
                   "or the transformer recipe (vit_tiny: baseline → delta with token gates)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("train", help="train one phase of the recipe")
    _add_train_args(s)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("eval", help="clip/video accuracy and sparsity report of a checkpoint")
    s.add_argument("--checkpoint", required=True, help="model.pt of a run")
    s.add_argument("--data", default=None, help="dataset (default: the run's own)")
    s.add_argument("--split", type=int, default=None,
                   help="1..3 for UCF101, 1..5 for class folders (default: the run's)")
    s.add_argument("--layout", default=None, choices=["auto", "ucf101", "folder"],
                   help="dataset layout (default: the run's)")
    s.add_argument("--splits-dir", default=None,
                   help="folder holding classInd.txt and the UCF101 split lists")
    s.add_argument("--cache-dir", default=None)
    s.add_argument("--clip-len", type=int, default=None, help="frames per evaluation clip")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    s.add_argument("--engine", action="store_true",
                   help="also stream the held-out videos through DeltaEngine, timed against "
                        "the dense model (adds 'engine' to the JSON)")
    s.add_argument("--streams", type=int, default=32, help="videos per engine batch")
    s.add_argument("--threads", type=int, default=None, help="torch threads while timing")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("calibrate", help="gates + thresholds for a baseline run, no training")
    s.add_argument("--checkpoint", required=True, help="model.pt of a baseline run")
    s.add_argument("--out", required=True, help="run folder to write")
    s.add_argument("--target", default="agreement=0.99",
                   help="agreement=F, max_logit_error=F or executed_density=F "
                        "(default agreement=0.99)")
    s.add_argument("--clips", type=int, default=64, help="unlabeled training clips to use")
    s.add_argument("--gate", default="pixel", choices=["scalar", "pixel"])
    s.add_argument("--mode", default="hysteresis", choices=["grid", "hysteresis"])
    s.add_argument("--input-gate", action=argparse.BooleanOptionalAction, default=True,
                   help="gate the input pixels too (default on)")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--force", action="store_true", help="replace a run in --out")
    s.set_defaults(func=_cmd_calibrate)

    s = sub.add_parser("report", help="HTML page with plots comparing run folders")
    s.add_argument("runs", nargs="+", help="run folders")
    s.add_argument("--out", default="report", help="output folder")
    s.add_argument("--title", default=None)
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("stream", help="exact delta inference over a video file")
    s.add_argument("--checkpoint", required=True, help="model.pt of a delta run")
    s.add_argument("--video", required=True, help="video file (anything PyAV decodes)")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--backend", default="auto",
                   choices=["auto", "reference", "torch", "cpp", "triton"])
    s.add_argument("--size", default=None, help="HxW to resize frames to (default: training)")
    s.add_argument("--max-frames", type=int, default=None)
    s.add_argument("--verify-every", type=int, default=0,
                   help="compare with the dense model every N frames (0: never); exit 1 if off")
    s.add_argument("--verify-rtol", type=float, default=1e-4,
                   help="tolerance of the check: max |dense - engine| / max |dense|")
    s.add_argument("--out", default="stream.json", help="JSON output")
    s.set_defaults(func=_cmd_stream)

    s = sub.add_parser("bench", help="dense vs delta inference timed side by side")
    s.add_argument("--models", nargs="+", default=["mobilenet_v1"])
    s.add_argument("--resolutions", nargs="+", default=["224", "360p", "720p"],
                   help="224, 360p, 720p or HxW")
    s.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    s.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3, 1.0])
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--backend", default="auto",
                   choices=["auto", "reference", "torch", "cpp", "triton"])
    s.add_argument("--frames", type=int, default=5, help="timed frames per setting")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's and the engine's dtype (half: the half-precision engine)")
    s.add_argument("--checkpoint", default=None, help="use a trained model.pt's thresholds")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="bench.json", help="JSON output")
    s.set_defaults(func=_cmd_bench)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the input is wrong", each raised with a message that names the fix.
    Anything else is a bug: one line too, but with the type and a pointer to ``-v``."""
    import torch

    from ._graph import FanOutError
    from .data.errors import DatasetError
    from .engine.plan import UnsupportedOpError
    from .stream import StreamVerificationError

    # KeyError: models.create's unknown-name error; OSError: missing files, full disks.
    return (DatasetError, UnsupportedOpError, FanOutError, StreamVerificationError, ValueError,
            OSError, ImportError, KeyError, torch.OutOfMemoryError)  # fmt: skip


def _one_line(exc: BaseException) -> str:
    import torch

    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(str(text).split()) or type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError):
        text = f"out of memory ({text}); lower --batch-size (or --resolution)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 unexpected error, 2 expected
    error, 130 interrupted). ``-v`` re-raises errors with their traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    prefix = f"deltasparse {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        hint = "; continue with --resume" if args.command == "train" else ""
        print(f"{prefix}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        if isinstance(exc, _expected_errors()):
            print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"{prefix}: unexpected error {type(exc).__name__}: {_one_line(exc)} (run with -v "
              "for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
