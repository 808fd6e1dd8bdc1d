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
    from .train import PHASES, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("run")
    g.add_argument("--phase", choices=PHASES, default=d.phase,
                   help="recipe step: baseline, l1 (from baseline), delta (from l1), delta_scratch")
    g.add_argument("--out", default=None, help="run folder (default runs/<phase>)")
    g.add_argument("--init-from", default=None, help="model.pt of the previous phase")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    g.add_argument("--amp", default=None, choices=["bf16"], help="mixed precision (GPU)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data,
                   help="'synthetic' (embedded default) or a folder: UCF101 layout or class folders")
    g.add_argument("--split", type=int, default=d.split, choices=[1, 2, 3])
    g.add_argument("--cache-dir", default=None, help="decoded-frame cache (reused across runs)")
    g.add_argument("--synthetic-videos", type=int, default=d.synthetic_videos)
    g.add_argument("--synthetic-classes", type=int, default=d.synthetic_classes)
    g.add_argument("--resolution", type=int, default=d.resolution, help="square crop size")
    g.add_argument("--clip-len", type=int, default=d.clip_len, help="frames per training clip")
    g.add_argument("--eval-clip-len", type=int, default=None, help="frames per evaluation clip")
    g.add_argument("--frame-stride", type=int, default=d.frame_stride)
    g.add_argument("--eval-clips-per-video", type=int, default=d.eval_clips_per_video)
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default=d.model, help="registry name (mobilenet_v1, resnet18, ...)")
    g.add_argument("--width", type=float, default=d.width, help="width multiplier")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--lr-schedule", choices=["cosine", "constant"], default=d.lr_schedule)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g = p.add_argument_group("sparsity")
    g.add_argument("--sparsity-weight", type=float, default=d.sparsity_weight)
    g.add_argument("--sparsity-schedule", choices=["constant", "linear", "sine"],
                   default=d.sparsity_schedule)
    g.add_argument("--threshold-init", type=float, default=d.threshold_init)
    g.add_argument("--threshold-lr-mult", type=float, default=d.threshold_lr_mult)
    g.add_argument("--granularity", choices=["layer", "channel", "neuron"], default=d.granularity)


def _config_from_args(args):
    from .train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    kw["out"] = args.out or f"runs/{args.phase}"
    kw["progress"] = not args.no_progress
    return TrainConfig(**kw)


def _cmd_train(args) -> int:
    from rich.console import Console

    from .train import train

    cfg = _config_from_args(args)
    result = train(cfg, resume=args.resume)
    if result:
        Console().print(
            f"[bold]{cfg.phase}[/]: accuracy {100 * result['accuracy']:.2f}% (clip "
            f"{100 * result['clip_accuracy']:.2f}%), op_fraction {100 * result['op_fraction']:.2f}%"
            f" → {cfg.out}/eval.json"
        )
    return 0


def _cmd_eval(args) -> int:
    import torch
    from rich.console import Console

    from .checkpoint import write_json_atomic
    from .metrics import SparsityReport  # noqa: F401  (documented output format)
    from .train import build_datasets, evaluate, load_model

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, _ = load_model(args.checkpoint, map_location=device)
    overrides = {"data": args.data, "split": args.split, "cache_dir": args.cache_dir,
                 "eval_clip_len": args.clip_len, "batch_size": args.batch_size}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    _, eval_set, _ = build_datasets(cfg)
    model.to(device)
    result = evaluate(model, eval_set, cfg, device)
    text = json.dumps(result, indent=2)
    if args.out:
        write_json_atomic(result, args.out)
    else:
        print(text)
    Console(stderr=True).print(
        f"video accuracy {100 * result['video_accuracy']:.2f}%, clip accuracy "
        f"{100 * result['clip_accuracy']:.2f}%, op_fraction {100 * result['op_fraction']:.2f}% "
        f"(op reduction {result['op_reduction']:.2f}x)"
    )
    return 0


def _cmd_report(args) -> int:
    from .report import build_report

    out = Path(args.out)
    build_report(args.runs, out, title=args.title)
    print(f"report written to {out / 'report.html'}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.out), quick=args.quick, seed=args.seed, device=args.device)
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
    from .printing import StreamProgress, print_stats
    from .stream import run_stream

    with StreamProgress(total=args.max_frames) as bar:
        result = run_stream(
            args.video, args.checkpoint, device=args.device, backend=args.backend,
            size=_size(args.size), max_frames=args.max_frames, verify_every=args.verify_every,
            on_frame=bar,
        )  # fmt: skip
    out = Path(args.out)
    write_json_atomic(result, out)
    print_stats(result["stats"])
    print(f"per-frame predictions and stats written to {out}")
    return 0


def _cmd_bench(args) -> int:
    from .benchmark import run_bench
    from .checkpoint import write_json_atomic
    from .printing import print_bench

    def progress(row: dict) -> None:
        print(
            f"  {row['model']} {row['height']}x{row['width']} threads={row['threads']} "
            f"density={row['density']:.1%}: dense {row['dense_ms']:.1f} ms, delta "
            f"{row['delta_ms']:.1f} ms ({row['achieved_speedup']:.2f}x)", flush=True,
        )  # fmt: skip

    result = run_bench(
        models=args.models, resolutions=args.resolutions, threads=args.threads,
        densities=args.densities, device=args.device, frames=args.frames, batch=args.batch,
        backend=args.backend, checkpoint=args.checkpoint, seed=args.seed, progress=progress,
    )  # fmt: skip
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
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("train", help="train one phase of the recipe")
    _add_train_args(s)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("eval", help="clip/video accuracy and sparsity report of a checkpoint")
    s.add_argument("--checkpoint", required=True, help="model.pt of a run")
    s.add_argument("--data", default=None, help="dataset (default: the run's own)")
    s.add_argument("--split", type=int, default=None, choices=[1, 2, 3])
    s.add_argument("--cache-dir", default=None)
    s.add_argument("--clip-len", type=int, default=None, help="frames per evaluation clip")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    s.set_defaults(func=_cmd_eval)

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
                   help="compare with the dense model every N frames (0: never)")
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
    s.add_argument("--checkpoint", default=None, help="use a trained model.pt's thresholds")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="bench.json", help="JSON output")
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"deltasparse {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
