"""deltasparse.report: build_report on fake run folders (baseline, l1, delta)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from deltasparse.report import PLOT_FILES, build_report, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# MobileNet v1 sites: the stem and 13 depthwise-separable blocks of two activations each.
SITES = ["features.0.2"] + [f"features.{b}.{j}.2" for b in range(1, 14) for j in (0, 1)]
CHANNELS = [32] + [c for c in (32, 64, 64, 128, 128, 128, 128, 256, 256, 256, 256, 512, 512,
                               512, 512, 512, 512, 512, 512, 512, 512, 512, 512, 1024, 1024, 1024)]  # fmt: skip

RUNS = {  # phase: (accuracy, clip accuracy, video accuracy, op_fraction, mean layer density)
    "baseline": (0.712, 0.655, 0.712, 0.52, 0.52),
    "l1": (0.705, 0.648, 0.705, 0.31, 0.31),
    "delta": (0.698, 0.641, 0.698, 0.104, 0.10),
}


def _layers(phase: str, density: float, rng: np.random.Generator) -> list[dict]:
    kind = {"baseline": "activation", "l1": "l1", "delta": "delta"}[phase]
    suffix = {"baseline": "_l1", "l1": "_l1", "delta": "_delta"}[phase]
    out = []
    for i, (site, c) in enumerate(zip(SITES, CHANNELS, strict=True)):
        hw = 112 // 2 ** min(i // 6, 4)
        d = float(np.clip(density * rng.lognormal(0.0, 0.5), 1e-4, 1.0))
        frames, total = 64, 60 * c * hw * hw
        thr = None
        if kind == "delta":
            vals = rng.lognormal(np.log(0.08), 0.35, size=c)
            thr = {"mean": float(vals.mean()), "min": float(vals.min()),
                   "max": float(vals.max()), "median": float(np.median(vals)),
                   "values": vals.tolist() if i != 5 else None}  # fmt: skip
        dense = int(9 * c * hw * hw * frames)
        out.append({
            "name": site + suffix, "kind": kind, "shape": [c, hw, hw], "fan_out": 9.0,
            "nonzero": int(d * total), "total": total,
            "temporal_density": d if kind == "delta" else None,
            "spatial_density": min(1.0, d * 3) if kind == "delta" else d,
            "effective_macs": int(dense * d), "dense_macs": dense, "frames": frames,
            "threshold": thr, "density": d,
        })  # fmt: skip
    return out


def make_run(root: Path, phase: str, *, evaluated: bool = True, epochs: int = 6,
             seed: int = 0) -> Path:  # fmt: skip
    rng = np.random.default_rng(seed)
    acc, clip, video, frac, dens = RUNS[phase]
    run = root / f"run_{phase}"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"phase": phase, "model": "mobilenet_v1", "name": f"mnv1-{phase}"})
    )
    rows = []
    for e in range(epochs):
        t = (e + 1) / epochs
        s = 0.3 * (phase != "baseline") * (1 - 0.5 * t)
        task = 0.8 + 1.6 * (1 - t) ** 2 + 0.1 * seed
        rows.append({
            "epoch": e, "train_loss": task + s, "train_task_loss": task,
            "train_sparsity_loss": s, "train_acc": (0.3 + 0.5 * t) * (1 - 0.03 * seed),
            "train_op_fraction": 1 - (1 - frac) * t,
            "val_clip_acc": clip * t ** 0.5, "val_video_acc": video * t ** 0.5 if e % 2 else None,
            "val_op_fraction": 1 - (1 - frac) * t, "lr": 0.01 * (1 - t),
            "sparsity_weight": 0.0 if phase == "baseline" else 1e-4 * 10 ** (2 * t),
            "time_s": 12.5,
        })  # fmt: skip
    (run / "metrics.json").write_text(json.dumps({"epochs": rows}))
    if evaluated:
        layers = _layers(phase, dens, rng)
        eff = sum(r["effective_macs"] / r["frames"] for r in layers)
        dense = sum(r["dense_macs"] / r["frames"] for r in layers)
        sparsity = {
            "mode": "temporal" if phase == "delta" else "spatial", "op_fraction": frac,
            "op_reduction": 1 / frac, "effective_macs_per_frame": eff,
            "dense_macs_per_frame": dense, "mac_fraction": eff / dense, "layers": layers,
        }  # fmt: skip
        (run / "eval.json").write_text(json.dumps({
            "phase": phase, "clip_accuracy": clip, "video_accuracy": video, "accuracy": acc,
            "op_fraction": frac, "op_reduction": 1 / frac, "num_clips": 3783,
            "num_videos": 3783, "skipped_videos": 0, "sparsity": sparsity,
        }))  # fmt: skip
    if evaluated and phase == "delta":
        (run / "engine.json").write_text(json.dumps(ENGINE))
    return run


ENGINE = {  # what deltasparse.exploit writes, abridged
    "executed_density": 0.18, "executed_density_with_first": 0.23, "predicted_density": 0.181,
    "prediction_error": 0.0056, "dense_ms_per_frame": 1.2, "delta_ms_per_frame": 0.3,
    "speedup": 4.0, "dense_baseline": "fused", "accuracy": 0.697, "agreement": 0.995,
    "streams": 32, "threads": 2, "backend": "cpp", "videos": 840,
    "density_over_time": [1.0, 0.15, 0.18, 0.2],
    "layers": [{"name": "features.0", "kind": "conv", "executed_density": 0.1},
               {"name": "classifier", "kind": "linear", "executed_density": 0.9}],
    "latency_ms": {"fused": [1.1, 1.2, 1.3], "engine_dense": [1.5, 1.6], "delta": [0.3, 0.31]},
}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = [make_run(root, p, seed=i) for i, p in enumerate(RUNS)]
    out = root / "report"
    report = build_report(dirs, out, title="Paper pipeline <test>")
    return dirs, out, report


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_writes_html_json_and_pngs(built):
    _, out, report = built
    assert (out / "report.html").stat().st_size > 10_000
    for key, fname in PLOT_FILES.items():
        assert report["plots"][key]["file"] == fname
        assert _is_png(out / fname), fname
    assert json.loads((out / "report.json").read_text()) == report
    # the engine stage of the one run that has engine.json, and the executed column
    (eng,) = report["engine"]
    assert eng["run"] == "mnv1-delta" and eng["speedup"] == 4.0
    assert eng["executed_density"] == 0.18 and eng["predicted_density"] == 0.181
    series = report["plots"]["engine"]["runs"][0]
    assert series["latency_dense"] == ENGINE["latency_ms"]["fused"]  # the faster baseline
    assert series["latency_delta"] == ENGINE["latency_ms"]["delta"]


def test_html_is_self_contained(built):
    _, out, report = built
    html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    imgs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(imgs) == len(PLOT_FILES)
    assert all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "Paper pipeline &lt;test&gt;" in html  # the title is escaped
    for r in report["runs"]:
        assert r["name"] in html
    # Layer index -> site mapping; "<site>_l1" and "<site>_delta" name the same site.
    assert [r["layer"] for r in report["layers"]] == SITES
    assert "features.13.1.2" in html


def test_json_numbers_equal_inputs(built):
    dirs, _, report = built
    by_name = {r["name"]: r for r in report["runs"]}
    assert list(by_name) == ["mnv1-baseline", "mnv1-l1", "mnv1-delta"]
    for d in dirs:
        ev = json.loads((d / "eval.json").read_text())
        r = by_name[f"mnv1-{ev['phase']}"]
        assert r["accuracy"] == ev["accuracy"]
        assert r["clip_accuracy"] == ev["clip_accuracy"]
        assert r["op_fraction"] == ev["op_fraction"]
        assert r["op_reduction"] == pytest.approx(1 / ev["op_fraction"])
        assert r["effective_macs_per_frame"] == ev["sparsity"]["effective_macs_per_frame"]
        series = {s["run"]: s for s in report["plots"]["layer_density"]["series"]}
        assert series[r["name"]]["density"] == [x["density"] for x in ev["sparsity"]["layers"]]
    points = {p["run"]: p for p in report["plots"]["accuracy_vs_reduction"]["points"]}
    assert points["mnv1-delta"]["accuracy_pct"] == pytest.approx(100 * RUNS["delta"][0])
    assert points["mnv1-delta"]["source"] == "eval"


def test_comparisons(built):
    _, _, report = built
    comps = {(c["run"], c["reference"]): c for c in report["comparisons"]}
    assert set(comps) == {("mnv1-l1", "mnv1-baseline"), ("mnv1-delta", "mnv1-baseline"),
                          ("mnv1-delta", "mnv1-l1")}  # fmt: skip
    c = comps[("mnv1-delta", "mnv1-l1")]
    assert c["op_reduction"] == pytest.approx(0.31 / 0.104)
    assert c["accuracy_change_pp"] == pytest.approx(100 * (0.698 - 0.705))
    assert c["mac_reduction"] > 1


def test_threshold_panels(built):
    dirs, _, report = built
    th = report["plots"]["threshold_histograms"]
    layers = json.loads((dirs[2] / "eval.json").read_text())["sparsity"]["layers"]
    # 27 delta layers, layer 5 has values None -> skipped; the grid is capped at 28 panels.
    assert [p["index"] for p in th["panels"]] == [i for i in range(27) if i != 5]
    for p in th["panels"]:
        (r,) = p["runs"]
        assert r["run"] == "mnv1-delta"
        assert sum(r["counts"]) == len(layers[p["index"]]["threshold"]["values"])
        assert len(p["bin_edges"]) == len(r["counts"]) + 1


def test_training_curves_numbers(built):
    dirs, _, report = built
    curves = {c["run"]: c for c in report["plots"]["training_curves"]["runs"]}
    epochs = json.loads((dirs[1] / "metrics.json").read_text())["epochs"]
    c = curves["mnv1-l1"]
    assert c["epoch"] == list(range(6))
    assert c["train_loss"] == [e["train_loss"] for e in epochs]
    assert c["val_video_acc"] == [e["val_video_acc"] for e in epochs]  # None kept as null


def test_missing_eval_and_empty_metrics(tmp_path):
    delta = make_run(tmp_path, "delta", evaluated=False)
    base = make_run(tmp_path, "baseline", epochs=0)
    out = tmp_path / "out"
    report = build_report([str(base), delta], out)
    b, d = report["runs"]
    assert b["evaluated"] and not d["evaluated"]
    assert d["accuracy"] is None and d["op_fraction"] is None
    assert any("eval.json" in m for m in d["missing"])
    assert any("no epochs" in m for m in b["missing"])
    # The unevaluated delta run is plotted from its last validated epoch, marked as such.
    pts = {p["run"]: p for p in report["plots"]["accuracy_vs_reduction"]["points"]}
    assert pts["mnv1-delta"]["source"] == "validation, epoch 5"
    assert pts["mnv1-delta"]["op_fraction"] == pytest.approx(0.104)
    # No delta run has thresholds in eval.json: the plot is skipped with a reason.
    assert report["plots"]["threshold_histograms"]["file"] is None
    assert not (out / PLOT_FILES["threshold_histograms"]).exists()
    assert report["comparisons"] == []
    html = (out / "report.html").read_text()
    assert "not evaluated (no eval.json)" in html and "Missing pieces" in html
    assert "No delta run with recorded threshold values" in html
    for key in ("accuracy_vs_reduction", "layer_density", "training_curves"):
        assert _is_png(out / PLOT_FILES[key])


def test_nothing_to_plot(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"phase": "l1", "model": "mobilenet_v1"}))
    report = build_report([run], tmp_path / "out")
    assert report["runs"][0]["name"] == "fresh"  # no "name" in the config: the folder name
    assert all(p["file"] is None for p in report["plots"].values())
    assert not list((tmp_path / "out").glob("*.png"))
    html = (tmp_path / "out" / "report.html").read_text()
    assert "no metrics.json" in html and "No run has logged epochs" in html


def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*not a training run folder.*config\.json"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        load_run(tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked
    with pytest.raises(ValueError, match="no run folders"):
        build_report([], tmp_path / "out")


def test_corrupt_json_names_the_file(tmp_path):
    run = make_run(tmp_path, "l1")
    (run / "eval.json").write_text('{"accuracy": 0.7,')
    with pytest.raises(ValueError, match=r"eval\.json is not valid JSON"):
        build_report([run], tmp_path / "out")


def test_nan_and_duplicate_names(tmp_path):
    a = make_run(tmp_path, "l1")  # l1: no threshold grid to draw, keeps the test fast
    ev = json.loads((a / "eval.json").read_text())
    ev["sparsity"]["layers"][0]["density"] = math.nan
    (a / "eval.json").write_text(json.dumps(ev))  # json writes NaN, as SparsityReport does
    b = tmp_path / "copy"
    b.mkdir()
    for f in ("config.json", "metrics.json"):
        (b / f).write_text((a / f).read_text())
    report = build_report([a, b], tmp_path / "out")
    assert [r["name"] for r in report["runs"]] == ["mnv1-l1", "mnv1-l1 (copy)"]
    text = (tmp_path / "out" / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert report["layers"][0]["runs"]["mnv1-l1"]["density"] is None
