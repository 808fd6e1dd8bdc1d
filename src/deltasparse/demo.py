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
from .printing import fmt
from .train import TrainConfig, config_changes, describe_changes, run_state, saved_config, train

__all__ = ["DEMO_SETTINGS", "run_demo"]

log = logging.getLogger(__name__)

# Budgets: full under 15 min on 2 CPU cores (bench/results/demo_full_summary.json);
# quick ≈ 2 min.
DEMO_SETTINGS = {
    "full": {
        "videos": 2000, "classes": 10, "frames": 16, "resolution": 64,
        "model": "dsconvnet", "width": 1.5, "batch_size": 32,
        "epochs": {"baseline": 12, "l1": 3, "delta": 13},
        "lr": {"baseline": 3e-3, "l1": 1e-3, "delta": 1e-3},
        "sparsity_weight": {"l1": 2e-4, "delta": 1e-2},
        "threshold_init": 0.15, "threshold_lr_mult": 10.0,
        # distilled from the l1 model, the sparsity weight ramped up over the first quarter
        "delta": {"clip_len": 2, "gate": "pixel", "mode": "hysteresis", "input_gate": True,
                  "distill": 0.5, "sparsity_schedule": "linear"},
        "calibration_target": "agreement=0.95", "calibration_clips": 128,
        "streams": 64, "threads": 2,
    },
    "quick": {
        "videos": 240, "classes": 4, "frames": 8, "resolution": 32,
        "model": "dsconvnet", "width": 0.5, "batch_size": 16,
        "epochs": {"baseline": 4, "l1": 2, "delta": 2},
        "lr": {"baseline": 3e-3, "l1": 1e-3, "delta": 1e-3},
        "sparsity_weight": {"l1": 2e-4, "delta": 1e-2},
        "threshold_init": 0.15, "threshold_lr_mult": 10.0,
        # distilled from the l1 model, the sparsity weight ramped up over the first quarter
        "delta": {"clip_len": 2, "gate": "pixel", "mode": "hysteresis", "input_gate": True,
                  "distill": 0.5, "sparsity_schedule": "linear"},
        "calibration_target": "agreement=0.95", "calibration_clips": 32,
        "streams": 16, "threads": 2,
    },
}  # fmt: skip
# The transformer recipe (deltasparse demo --model vit_tiny): baseline -> delta refinement with
# token gates before the qkv projections and the MLPs (docs/tokens.md); no L1 phase and no
# calibration (both are for the CNN's activation layers).
VIT_SETTINGS = {
    "full": {
        "videos": 2000, "classes": 10, "frames": 16, "resolution": 64,
        "model": "vit_tiny", "width": 1.0, "batch_size": 32,
        "epochs": {"baseline": 8, "delta": 3},
        "lr": {"baseline": 1e-3, "delta": 3e-4},
        "sparsity_weight": {"delta": 3e-2},
        "threshold_init": 0.05, "threshold_lr_mult": 10.0,
        "delta": {"clip_len": 2},
        "streams": 64, "threads": 2,
    },
    "quick": {
        "videos": 160, "classes": 4, "frames": 8, "resolution": 32,
        "model": "vit_tiny", "width": 1.0, "batch_size": 16,
        "epochs": {"baseline": 2, "delta": 1},
        "lr": {"baseline": 1e-3, "delta": 3e-4},
        "sparsity_weight": {"delta": 3e-2},
        "threshold_init": 0.05, "threshold_lr_mult": 10.0,
        "delta": {"clip_len": 2},
        "streams": 16, "threads": 2,
    },
}  # fmt: skip
# ViT acceptance: >= 3x fewer executed token-ops than dense at <= 2 points below the baseline
VIT_MIN_REDUCTION = 3.0
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
    out = {k: result.get(k) for k in keys}
    # what the engine would execute on the eval clips, predicted by measure()
    out["executed_fraction"] = (result.get("sparsity") or {}).get("executed_fraction")
    return out


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


def _engine_stage(name: str, run_dir: Path, s: dict, console) -> dict:
    """The run's held-out videos through DeltaEngine (``run_dir/engine.json``, reused if the
    run did not change since)."""
    from .checkpoint import load_model
    from .exploit import exploit
    from .progress import task_progress

    path = run_dir / "engine.json"
    model_file = run_dir / "model.pt"
    if path.is_file() and path.stat().st_mtime >= model_file.stat().st_mtime:
        console.print(f"{name}: engine stage done earlier; reusing {path}", highlight=False)
        return json.loads(path.read_text())
    model, cfg, _ = load_model(model_file)
    with task_progress(f"{name}: held-out videos through DeltaEngine", console=console) as bar:
        r = exploit(model.eval(), cfg, streams=s["streams"], threads=s["threads"], progress=bar)
    write_json_atomic(r, path)
    return r


def _calibrated_run(out: Path, s: dict, console) -> dict:
    from .calibration_run import calibrate_run
    from .progress import task_progress

    run = out / "calibrated"
    if run_state(run) == "finished" and (run / "eval.json").is_file():
        console.print(f"calibrated: finished earlier in {run}; reusing its eval.json",
                      highlight=False)
        return json.loads((run / "eval.json").read_text())
    with task_progress(f"calibrated: thresholds for {s['calibration_target']}",
                       console=console) as bar:
        n = [0]

        def step(info: dict) -> None:
            n[0] += 1
            bar(n[0], None, info=f"agreement {info['agreement']:.3f}")

        return calibrate_run(out / "baseline" / "model.pt", run,
                             target=s["calibration_target"], clips=s["calibration_clips"],
                             force=run_state(run) != "new", progress=step)  # fmt: skip


def run_demo(out: Path, *, quick: bool = False, seed: int = 0, device: str = "cpu",
             model: str | None = None) -> dict:  # fmt: skip
    """Run the demo into ``out``; returns the summary (also ``out/summary.json``).

    ``model``: ``None`` (the CNN recipe of the README) or ``"vit_tiny"`` (the transformer
    recipe with token gates: baseline -> delta)."""
    from rich.console import Console

    from . import models

    console = Console()
    if model is not None and model != DEMO_SETTINGS["full"]["model"]:
        if not models.uses_tokens(model):
            raise ValueError(
                f"demo --model {model!r}: the demo has a CNN recipe (the default, "
                f"{DEMO_SETTINGS['full']['model']}) and a transformer recipe (vit_tiny); "
                "train other models with deltasparse train"
            )
        return _run_token_demo(Path(out), VIT_SETTINGS["quick" if quick else "full"], quick,
                               seed, device, console)  # fmt: skip
    s = DEMO_SETTINGS["quick" if quick else "full"]
    out = Path(out)
    t0 = time.perf_counter()
    console.print(f"[bold]deltasparse demo[/] → {out}  ({'quick' if quick else 'full'})")
    _write_dataset(out / "data", s, seed)
    phases = {
        "baseline": dict(init_from=None),
        "l1": dict(init_from=str(out / "baseline" / "model.pt")),
        # Delta refinement from the l1 run with the engine's gates: whole pixels, sent only
        # when they moved by more than the step (hysteresis), the input pixels gated too.
        "delta": dict(init_from=str(out / "l1" / "model.pt"), **s["delta"]),
    }
    results = _train_phases(out, s, seed, device, phases, console)
    console.rule("[bold]calibrated")
    results["calibrated"] = _calibrated_run(out, s, console)
    console.rule("[bold]engine")
    summary_runs = {k: _summarise(v) for k, v in results.items()}
    for name in ("delta", "calibrated"):
        summary_runs[name]["engine"] = _engine_summary(_engine_stage(name, out / name, s, console))

    verdict = _verdict(summary_runs)
    summary = {
        "runs": summary_runs,
        "delta_vs_l1": verdict["delta_vs_l1"],
        "acceptance": verdict["acceptance"],
        "settings": {"quick": quick, "seed": seed, **{k: v for k, v in s.items()}},
        "torch": __import__("torch").__version__,
        "elapsed_s": time.perf_counter() - t0,
    }
    write_json_atomic(summary, out / "summary.json")
    try:
        from .report import build_report

        build_report([out / p for p in (*phases, "calibrated")], out / "report",
                     title="deltasparse demo")
    except Exception as exc:  # the report is a convenience; the numbers are in summary.json
        log.warning("demo: could not build the report: %s", exc)
    _print_table(console, summary)
    return summary


def _train_phases(out: Path, s: dict, seed: int, device: str, phases: dict,
                  console) -> dict[str, dict]:  # fmt: skip
    """Train (or reuse) each phase into ``out/<phase>``: the settings' epochs, lr and sparsity
    weight of the phase, plus its ``phases[phase]`` options; their eval results by phase."""
    base = _base_config(out, s, seed, device)
    results: dict[str, dict] = {}
    for phase, extra in phases.items():
        cfg = dataclasses.replace(
            base, phase=phase, out=str(out / phase), name=phase, epochs=s["epochs"][phase],
            lr=s["lr"][phase], sparsity_weight=s["sparsity_weight"].get(phase, 0.0), **extra,
        )  # fmt: skip
        console.rule(f"[bold]{phase}")
        results[phase] = _run_phase(cfg, console)
    return results


def _base_config(out: Path, s: dict, seed: int, device: str) -> TrainConfig:
    return TrainConfig(
        data=str(out / "data"), cache_dir=str(out / "cache"), resolution=s["resolution"],
        resize=s["resolution"], model=s["model"], width=s["width"], seed=seed, device=device,
        clip_len=4, eval_clip_len=s["frames"] // 2, eval_clips_per_video=2,
        batch_size=s["batch_size"], warmup_epochs=0.5, threshold_init=s["threshold_init"],
        threshold_lr_mult=s["threshold_lr_mult"],
    )  # fmt: skip


def _run_token_demo(out: Path, s: dict, quick: bool, seed: int, device: str, console) -> dict:
    """The transformer recipe: baseline ViT -> delta refinement with token gates, then the
    delta model's held-out videos through the token engine, timed against the dense ViT."""
    t0 = time.perf_counter()
    console.print(f"[bold]deltasparse demo[/] ({s['model']}) → {out}  "
                  f"({'quick' if quick else 'full'})")  # fmt: skip
    _write_dataset(out / "data", s, seed)
    phases = {"baseline": dict(init_from=None),
              "delta": dict(init_from=str(out / "baseline" / "model.pt"), **s["delta"])}
    results = _train_phases(out, s, seed, device, phases, console)
    console.rule("[bold]engine")
    runs = {k: _summarise(v) for k, v in results.items()}
    runs["delta"]["engine"] = _engine_summary(_engine_stage("delta", out / "delta", s, console))
    e, b, d = runs["delta"]["engine"], runs["baseline"], runs["delta"]
    drop = b["accuracy"] - d["accuracy"]
    executed = e["executed_density"]
    checks = {
        f"executed token-ops >= {VIT_MIN_REDUCTION:g}x fewer than dense":
            _at_most(executed, 1.0 / VIT_MIN_REDUCTION),
        "delta accuracy >= baseline - 2 points": drop <= MAX_ACCURACY_DROP,
        "engine agreement >= 0.95": e["agreement"] is not None and e["agreement"] >= 0.95,
        "|predicted - executed| / executed <= 0.05": _at_most(e["prediction_error"], 0.05),
    }  # fmt: skip
    summary = {
        "model": s["model"],
        "runs": runs,
        "delta_vs_baseline": {
            "executed_reduction": 1.0 / executed if executed else None,
            "accuracy_drop_points": 100 * drop,
        },
        "acceptance": {"checks": checks, "all": all(checks.values())},
        "settings": {"quick": quick, "seed": seed, **s},
        "torch": __import__("torch").__version__,
        "elapsed_s": time.perf_counter() - t0,
    }
    write_json_atomic(summary, out / "summary.json")
    try:
        from .report import build_report

        build_report([out / p for p in phases], out / "report",
                     title=f"deltasparse demo ({s['model']})")
    except Exception as exc:  # the report is a convenience; the numbers are in summary.json
        log.warning("demo: could not build the report: %s", exc)
    _print_table(console, summary)
    return summary


_ENGINE_KEYS = ("executed_density", "executed_density_with_first", "predicted_density",
                "prediction_error", "dense_ms_per_frame", "delta_ms_per_frame", "speedup",
                "dense_baseline", "accuracy", "agreement", "streams", "threads", "backend",
                "allocator")


def _engine_summary(r: dict) -> dict:
    return {k: r.get(k) for k in _ENGINE_KEYS}


def _at_most(v, bound: float) -> bool:
    """``v <= bound``; a missing figure (None) does not meet any bound."""
    return v is not None and v <= bound


def _verdict(runs: dict) -> dict:
    l1, delta = runs["l1"], runs["delta"]
    reduction = l1["op_fraction"] / delta["op_fraction"] if delta["op_fraction"] else None
    drop = l1["accuracy"] - delta["accuracy"]
    e = delta["engine"]
    checks = {
        "executed_density <= 0.20": _at_most(e["executed_density"], 0.20),
        "speedup >= 3 (vs the BN-folded dense model, same threads)": (
            e["speedup"] is not None and e["speedup"] >= 3.0),
        "delta accuracy >= l1 - 2 points": drop <= MAX_ACCURACY_DROP,
        "engine agreement >= 0.99": e["agreement"] >= 0.99,
        # no prediction (or no executed figure) fails the check: it did not hold
        "|predicted - executed| / executed <= 0.05": _at_most(e["prediction_error"], 0.05),
        "calibrated run present": _at_most(
            runs.get("calibrated", {}).get("engine", {}).get("executed_density"), 1.0),
    }
    return {
        "delta_vs_l1": {
            "op_reduction_delta_vs_l1": reduction,
            "accuracy_drop_points": 100 * drop,
            "target_op_reduction": TARGET_REDUCTION,
            "max_accuracy_drop_points": 100 * MAX_ACCURACY_DROP,
            "meets_target": bool(reduction is not None and reduction >= TARGET_REDUCTION
                                 and drop <= MAX_ACCURACY_DROP),
        },
        "acceptance": {"checks": checks, "all": all(checks.values())},
    }


def _print_table(console, summary: dict) -> None:
    from rich.table import Table

    t = Table(title="held-out split: counted (measure) and executed (DeltaEngine)")
    for col in ("run", "accuracy", "op_fraction", "executed", "engine ms/frame", "speedup",
                "agreement"):  # fmt: skip
        t.add_column(col, justify="left" if col == "run" else "right")
    for name, r in summary["runs"].items():
        e = r.get("engine") or {}
        t.add_row(
            name, f"{100 * r['accuracy']:.2f}%", f"{100 * r['op_fraction']:.2f}%",
            fmt(e.get("executed_density"), ".1%"),
            "-" if not e else f"{fmt(e['delta_ms_per_frame'], '.2f')} / "
                              f"{fmt(e['dense_ms_per_frame'], '.2f')}",
            fmt(e.get("speedup"), ".2f", "x"),
            fmt(e.get("agreement"), ".1%"),
        )  # fmt: skip
    console.print(t)
    if "delta_vs_l1" not in summary:  # the transformer recipe
        v = summary["delta_vs_baseline"]
        drop = v["accuracy_drop_points"]
        change = (f"{drop:.2f} points accuracy loss" if drop > 0
                  else f"{-drop:.2f} points higher accuracy")  # fmt: skip
        console.print(f"delta vs baseline: {fmt(v['executed_reduction'], '.2f', 'x')} fewer "
                      f"executed token-ops than dense at {change}", highlight=False)
        for check, ok in summary["acceptance"]["checks"].items():
            console.print(f"  {'[green]ok[/]' if ok else '[red]no[/]'}  {check}")
        console.print(f"summary: {summary.get('elapsed_s', 0):.0f} s")
        return
    v = summary["delta_vs_l1"]
    drop = v["accuracy_drop_points"]
    change = f"{drop:.2f} points accuracy loss" if drop > 0 else f"{-drop:.2f} points higher accuracy"
    red = v["op_reduction_delta_vs_l1"]
    console.print(f"delta vs l1: {red:.2f}x fewer counted operations at {change}"
                  if red else "delta vs l1: no counted operations", highlight=False)
    for check, ok in summary["acceptance"]["checks"].items():
        console.print(f"  {'[green]ok[/]' if ok else '[red]no[/]'}  {check}")
    console.print(f"summary: {summary.get('elapsed_s', 0):.0f} s")
