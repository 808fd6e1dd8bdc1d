"""``deltasparse demo``: the paper's recipe end to end on the embedded synthetic videos.

Writes the synthetic action dataset to disk as real ``.mp4`` files in the UCF101 layout (so the
real loader and its frame cache are exercised), trains ``baseline`` → ``l1`` → ``delta`` on the
CPU, prints a comparison table and writes ``summary.json`` and an HTML report. Run again into
the same folder, it reuses finished phases (their ``eval.json``), resumes an interrupted one
and trains the rest; a phase folder holding a run with other settings is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from .checkpoint import write_json_atomic
from .train import TrainConfig, config_changes, describe_changes, run_state, saved_config, train

__all__ = ["DEMO_SETTINGS", "run_demo"]

log = logging.getLogger(__name__)

# Budgets: full ≈ 15 min on 2 CPU cores; quick ≈ 2 min (CI).
DEMO_SETTINGS = {
    "full": {
        "videos": 2800, "classes": 10, "frames": 16, "resolution": 64,
        "model": "convnet", "width": 1.0, "batch_size": 32,
        "epochs": {"baseline": 14, "l1": 4, "delta": 6},
        "lr": {"baseline": 3e-3, "l1": 1e-3, "delta": 1e-3},
        "sparsity_weight": {"l1": 2e-4, "delta": 5e-3},
        "threshold_init": 0.15, "threshold_lr_mult": 10.0,
    },
    "quick": {
        "videos": 240, "classes": 4, "frames": 8, "resolution": 32,
        "model": "convnet", "width": 0.5, "batch_size": 16,
        "epochs": {"baseline": 4, "l1": 2, "delta": 2},
        "lr": {"baseline": 3e-3, "l1": 1e-3, "delta": 1e-3},
        "sparsity_weight": {"l1": 2e-4, "delta": 5e-3},
        "threshold_init": 0.15, "threshold_lr_mult": 10.0,
    },
}  # fmt: skip
# The paper's headline: delta refinement cuts operations ~3x versus the L1 model.
TARGET_REDUCTION = 3.0
MAX_ACCURACY_DROP = 0.02


def _write_dataset(root: Path, s: dict, seed: int) -> None:
    from .data import write_ucf101_layout
    from .data.synthetic import SyntheticActions

    if (root / "ucfTrainTestlist" / "classInd.txt").is_file():
        log.info("demo: reusing the dataset in %s", root)
        return
    ds = SyntheticActions(num_videos=s["videos"], num_classes=s["classes"], frames=s["frames"],
                          size=(s["resolution"], s["resolution"]), seed=seed)  # fmt: skip
    write_ucf101_layout(ds, root, fmt="mp4")


def _summarise(result: dict) -> dict:
    keys = ("accuracy", "clip_accuracy", "op_fraction", "op_reduction", "mac_fraction",
            "effective_macs_per_frame", "dense_macs_per_frame", "num_videos", "clip_len")  # fmt: skip
    return {k: result.get(k) for k in keys}


def _finished_result(cfg: TrainConfig) -> dict:
    """The ``eval.json`` of a finished phase, if it was run with exactly these settings."""
    changes = config_changes(saved_config(cfg.out), cfg)
    if changes:
        raise ValueError(
            f"demo: {cfg.out} holds a finished {cfg.phase} run with other settings "
            f"({describe_changes(changes)}); pass another --out (or delete {cfg.out})")
    path = Path(cfg.out) / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"demo: {path} is missing although {cfg.out} has model.pt; "
                                f"delete {cfg.out} to train the {cfg.phase} phase again")
    return json.loads(path.read_text())


def _run_phase(cfg: TrainConfig, console) -> dict:
    state = run_state(cfg.out)
    if state == "finished":
        console.print(f"{cfg.phase}: finished earlier in {cfg.out}; reusing its eval.json",
                      highlight=False)
        return _finished_result(cfg)
    return train(cfg, resume=state == "unfinished", console=console)


def run_demo(out: Path, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> dict:
    """Run the demo into ``out``; returns the summary (also ``out/summary.json``)."""
    from rich.console import Console

    console = Console()
    s = DEMO_SETTINGS["quick" if quick else "full"]
    out = Path(out)
    t0 = time.perf_counter()
    data_root = out / "data"
    console.print(f"[bold]deltasparse demo[/] → {out}  ({'quick' if quick else 'full'})")
    _write_dataset(data_root, s, seed)
    base = TrainConfig(
        data=str(data_root), cache_dir=str(out / "cache"), resolution=s["resolution"],
        resize=s["resolution"], model=s["model"], width=s["width"], seed=seed, device=device,
        clip_len=4, eval_clip_len=s["frames"] // 2, eval_clips_per_video=2,
        batch_size=s["batch_size"], warmup_epochs=0.5, threshold_init=s["threshold_init"],
        threshold_lr_mult=s["threshold_lr_mult"],
    )  # fmt: skip
    phases = {
        "baseline": dict(init_from=None),
        "l1": dict(init_from=str(out / "baseline" / "model.pt")),
        # The paper refines with short clips (T=2) and evaluates on longer ones.
        "delta": dict(init_from=str(out / "l1" / "model.pt"), clip_len=2),
    }
    results: dict[str, dict] = {}
    for phase, extra in phases.items():
        cfg = dataclasses.replace(
            base, phase=phase, out=str(out / phase), name=phase, epochs=s["epochs"][phase],
            lr=s["lr"][phase], sparsity_weight=s["sparsity_weight"].get(phase, 0.0), **extra,
        )  # fmt: skip
        console.rule(f"[bold]{phase}")
        results[phase] = _run_phase(cfg, console)

    l1, delta = results["l1"], results["delta"]
    reduction = l1["op_fraction"] / delta["op_fraction"] if delta["op_fraction"] else float("inf")
    drop = l1["accuracy"] - delta["accuracy"]
    verdict = {
        "op_reduction_delta_vs_l1": reduction,
        "accuracy_drop_points": 100 * drop,
        "target_op_reduction": TARGET_REDUCTION,
        "max_accuracy_drop_points": 100 * MAX_ACCURACY_DROP,
        "meets_target": bool(reduction >= TARGET_REDUCTION and drop <= MAX_ACCURACY_DROP),
    }
    summary = {
        "runs": {k: _summarise(v) for k, v in results.items()},
        "delta_vs_l1": verdict,
        "settings": {"quick": quick, "seed": seed, **{k: v for k, v in s.items()}},
        "elapsed_s": time.perf_counter() - t0,
    }
    write_json_atomic(summary, out / "summary.json")
    try:
        from .report import build_report

        build_report([out / p for p in phases], out / "report", title="deltasparse demo")
    except Exception as exc:  # the report is a convenience; the numbers are in summary.json
        log.warning("demo: could not build the report: %s", exc)
    _print_table(console, summary)
    return summary


def _print_table(console, summary: dict) -> None:
    from rich.table import Table

    t = Table(title="baseline → l1 → delta (held-out split)")
    for col in ("run", "accuracy", "op_fraction", "op reduction", "eff. MACs/frame"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for name, r in summary["runs"].items():
        eff = r.get("effective_macs_per_frame")
        t.add_row(
            name, f"{100 * r['accuracy']:.2f}%", f"{100 * r['op_fraction']:.2f}%",
            f"{r['op_reduction']:.2f}x", "-" if eff is None else f"{eff:,.0f}",
        )  # fmt: skip
    console.print(t)
    v = summary["delta_vs_l1"]
    ok = "[green]meets[/]" if v["meets_target"] else "[red]misses[/]"
    drop = v["accuracy_drop_points"]
    change = f"{drop:.2f} points accuracy loss" if drop > 0 else f"{-drop:.2f} points higher accuracy"
    console.print(
        f"delta vs l1: {v['op_reduction_delta_vs_l1']:.2f}x fewer operations at "
        f"{change} — {ok} the paper's headline "
        f"(≥ {v['target_op_reduction']:.0f}x at ≤ {v['max_accuracy_drop_points']:.0f} points)"
    )
    console.print(f"summary: {summary.get('elapsed_s', 0):.0f} s")
