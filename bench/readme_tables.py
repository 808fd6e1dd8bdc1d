"""Render the README's result tables from the committed JSON of bench/results/.

    python bench/readme_tables.py            # rewrite the tables in README.md
    python bench/readme_tables.py --check    # exit 1 if README.md differs from the JSON

Every figure of the README's result tables comes from a JSON file a benchmark script wrote;
this script only formats them. A table sits between ``<!-- table: NAME -->`` and
``<!-- /table -->`` in README.md; the test suite runs ``--check``, so a table can not drift
from its JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _pct(v, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _x(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def _ms(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _source(d: dict, name: str) -> str:
    cmd = d.get("command")
    bits = [f"`bench/results/{name}`"]
    if cmd:
        bits.append(f"`{cmd}`")
    if d.get("torch"):
        bits.append(f"torch {d['torch']}")
    return "Source: " + ", ".join(bits) + "."


def demo() -> str:
    name = "demo_full_summary.json"
    d = _load(name)
    head = ["run", "accuracy", "op_fraction (counted)", "executed (predicted)",
            "executed (engine)", "engine ms/frame", "dense ms/frame", "speedup", "agreement"]
    rows = []
    for run, r in d["runs"].items():
        e = r.get("engine") or {}
        rows.append([
            run, _pct(r["accuracy"], 2), _pct(r["op_fraction"], 2),
            _pct(r.get("executed_fraction")), _pct(e.get("executed_density")),
            _ms(e.get("delta_ms_per_frame"), 3), _ms(e.get("dense_ms_per_frame"), 3),
            _x(e.get("speedup")), _pct(e.get("agreement")),
        ])  # fmt: skip
    checks = d.get("acceptance", {}).get("checks", {})
    lines = [_table(head, rows), ""]
    if checks:
        lines.append("Checks of the run: " + "; ".join(
            f"{k} **{'yes' if v else 'no'}**" for k, v in checks.items()) + ".")
    s = d.get("settings", {})
    alloc = (d["runs"].get("delta", {}).get("engine") or {}).get("allocator") or {}
    tuned = (f", dense and delta timed with {alloc['allocator']}'s mmap/trim thresholds raised"
             if alloc.get("allocator") else "")
    lines.append(f"{_source(d, name)} {d['elapsed_s'] / 60:.1f} minutes in all; engine stage "
                 f"with {s.get('streams')} videos per batch at {s.get('threads')} threads{tuned}.")
    return "\n".join(lines)


def footage() -> str:
    name = "footage_realism.json"
    d = _load(name)
    syn, clean, real = d["synthetic"], d["clean_rendering"], d["real_footage"]
    lo, hi = real["64x64"]["any"]
    rows = [
        ["camera footage, decoded H.264 (reference: measured on real clips, kept in the script)",
         f"{100 * lo:.0f}–{100 * hi:.0f}%", _pct(real["720p"]["gt8"], 0),
         _pct(real["720p"]["gt24"], 0)],
        ["synthetic, as embedded (photo scene, shake, flicker, noise, x264 CRF 23)",
         _pct(syn["64x64"]["any"]["mean"]), _pct(syn["720p"]["gt8"]["mean"]),
         _pct(syn["720p"]["gt24"]["mean"])],
        ["synthetic, clean rendering (earlier versions)", _pct(clean["64x64"]["any"]["mean"]),
         _pct(clean["720p"]["gt8"]["mean"]), _pct(clean["720p"]["gt24"]["mean"])],
    ]  # fmt: skip
    head = ["frames", "64×64: pixels that change at all", "720p: change > 8/255",
            "720p: change > 24/255"]
    return _table(head, rows) + "\n\n" + _source(d, name)


def gate_modes() -> str:
    name = "gate_modes.json"
    d = _load(name)
    head = ["footage", "layer", "accuracy", "op_fraction (counted)", "executed (predicted)"]
    rows = []
    for r in d["runs"]:
        rows.append([r["footage"], r["variant"], _pct(r["accuracy"], 1),
                     _pct(r["op_fraction"], 1), _pct(r["executed_fraction"], 1)])
    return _table(head, rows) + "\n\n" + _source(d, name)


def folder_recipe() -> str:
    name = "folder_recipe.json"
    d = _load(name)
    f, e = d["footage"], d["engine"]
    head = ["phase", "accuracy", "op_fraction (counted)", "executed (predicted)"]
    rows = [[k, _pct(r["accuracy"]), _pct(r["op_fraction"]), _pct(r["executed_fraction"])]
            for k, r in d["phases"].items()]  # fmt: skip
    lines = [_table(head, rows), "",
             f"Engine on the held-out videos ({e['streams']} streams, {e['threads']} threads, "
             f"{e['backend']} backend): executed {_pct(e['executed_density'])} (predicted "
             f"{_pct(e['predicted_density'])}), {_ms(e['delta_ms_per_frame'], 3)} ms/frame vs "
             f"{_ms(e['dense_ms_per_frame'], 3)} dense, {_x(e['speedup'])}, accuracy "
             f"{_pct(e['accuracy'])}, agreement {_pct(e['agreement'])}. Footage: "
             f"{f['videos']} {f['format']} videos in {f['classes']} {f['layout']}, "
             f"{f['frames']} frames at {f['resolution']}×{f['resolution']} (seed {f['seed']}).",
             f"{_source(d, name)} {d['elapsed_s'] / 60:.1f} minutes in all."]
    return "\n".join(lines)


def engine_cpu() -> str:
    name = "engine_cpu.json"
    d = _load(name)
    head = ["res", "threads", "target", "density", "fused dense ms", "delta ms",
            "speedup vs fused dense", "ideal", "vs eager model"]
    rows = []
    for r in d["rows"]:
        rows.append([
            r["resolution"], str(r["threads"]), _pct(r["target_density"], 0), _pct(r["density"]),
            _ms(r["fused_dense_ms"], 1), _ms(r["delta_ms"], 1), _x(r["speedup_vs_fused_dense"]),
            _x(r["ideal_speedup"]), _x(r["achieved_speedup"]),
        ])  # fmt: skip
    return _table(head, rows) + "\n\n" + _source(d, name)


def engine_gpu() -> str:
    name = "engine_gpu.json"
    d = _load(name)
    head = ["res", "density", "delta ms (fp32 engine, graph)", "dense fp32 graph",
            "dense fp32 graph, BN folded", "dense **bf16** graph", "vs best fp32",
            "vs bf16"]  # fmt: skip
    rows = []
    for res in d["resolutions"]:
        fp32 = min(res["dense_fp32_graph_ms"], res["dense_fp32_graph_bnfolded_ms"])
        for p in res["points"]:
            if p["triton_graph_density"] <= 0.0 or p["triton_graph_density"] > 0.5:
                continue
            ms = p["triton_graph_ms"]
            rows.append([
                res["resolution"], _pct(p["triton_graph_density"]), _ms(ms, 3),
                _ms(res["dense_fp32_graph_ms"], 3), _ms(res["dense_fp32_graph_bnfolded_ms"], 3),
                _ms(res["dense_bf16_graph_ms"], 3), _x(fp32 / ms), _x(res["dense_bf16_graph_ms"] / ms),
            ])  # fmt: skip
    return _table(head, rows) + "\n\n" + (
        f"Source: `bench/results/{name}` (`python bench/engine_gpu.py` on one {d['device']}, "
        f"torch {d['torch']}, triton {d.get('triton')}; {d['settings']}; {d['timing']}).")


def engine_gpu_half() -> str:
    """The bfloat16 engine against the best dense bfloat16 model, per resolution and batch."""
    head = ["res", "batch", "density", "bf16 engine ms", "best dense bf16 ms", "vs best bf16",
            "fp32 engine ms", "history (max rel.)", "top-1 = dense (one frame)"]  # fmt: skip
    rows, srcs = [], []
    for name in ("engine_gpu_half.json", "engine_gpu_half_4k.json"):
        d = _load(name)
        srcs.append(_source(d, name))
        for r in d["runs"]:
            for p in r["points"]:
                q, f = p["bfloat16"], p.get("float32", {})
                if not (0 < q["density"] <= 0.3 or q["density"] >= 0.9):
                    continue
                rows.append([
                    r["resolution"], str(r["batch"]), _pct(q["density"]), _ms(q["ms"], 3),
                    f"{_ms(q['best_dense_ms'], 3)} ({q['best_dense'].replace('bfloat16_', '')})",
                    _x(q["speedup_vs_best_dense"]), _ms(f.get("ms"), 3),
                    f"{q['history_rel_err']:.0e}", _pct(q["top1_agrees_with_dense"], 0),
                ])  # fmt: skip
    c = _load("engine_gpu_half_compiled.json")
    cr = c["runs"][0]
    ck = next(k for k in cr["dense_ms"] if k.startswith("compiled_"))
    comp = "; ".join(f"{_pct(p['bfloat16']['density'])}: {_ms(p['bfloat16']['ms'], 3)} ms, "
                     f"{_x(cr['dense_ms'][ck] / p['bfloat16']['ms'])}" for p in cr["points"])  # fmt: skip
    return _table(head, rows) + "\n\n" + (
        f"Against `torch.compile(mode=\"max-autotune\")` in bfloat16 (720p, batch 1, "
        f"{_ms(cr['dense_ms'][ck], 3)} ms, compiled in {cr['dense_ms']['compile_s']:.0f} s): {comp}."
        "\n\n" + " ".join(srcs + [_source(c, "engine_gpu_half_compiled.json")]))


def train_overhead() -> str:
    name = "train_overhead.json"
    d = _load(name)
    variants = [v for v in ("l1", "delta", "pixel", "pixel_hyst") if v in d["runs"][0]["median_s"]]
    head = ["threads", "plain ms", *[f"{v} (× plain)" for v in variants]]
    rows = []
    for r in d["runs"]:
        spread = statistics.pstdev(r["times_s"]["plain"]) * 1e3
        rows.append([str(r["threads"]), f"{1e3 * r['median_s']['plain']:.1f} ± {spread:.1f}",
                     *[_x(r["ratio_vs_plain"][v]) for v in variants]])
    return _table(head, rows) + "\n\n" + _source(d, name) + f" Clip {d['clip']}, medians of " \
        f"{d['repeats']} interleaved steps."


def token_engine() -> str:
    name = "token_engine.json"
    d = _load(name)
    head = ["input", "tokens", "streams", "budget", "executed", "dense ms/step", "engine ms/step",
            "speedup", "ideal", "achieved / ideal"]
    rows = [[f"{r['resolution']}²", str(r["tokens"]), str(r["streams"]),
             _pct(r["budget_fraction"], 0), _pct(r["executed_density"]),
             _ms(r["dense_ms_per_frame"], 1), _ms(r["delta_ms_per_frame"], 1),
             _x(r["achieved_speedup"]), _x(r["ideal_speedup"]), f"{r['ratio']:.2f}"]
            for r in d["rows"]]  # fmt: skip
    return _table(head, rows) + "\n\n" + _source(d, name) + \
        f" {d['rows'][0]['threads']} threads, {d['machine']['cpu']}."


def token_engine_gpu() -> str:
    name = "token_engine_gpu.json"
    d = _load(name)
    head = ["input", "tokens", "streams", "dtype", "budget", "executed", "best dense",
            "dense ms/step", "engine ms/step", "speedup", "ideal"]
    rows = [[f"{r['resolution']}²", str(r["tokens"]), str(r["streams"]), r["dtype"],
             _pct(r["budget_fraction"], 0), _pct(r["executed_density"]), r["dense_baseline"],
             _ms(r["dense_ms_per_frame"]), _ms(r["delta_ms_per_frame"]),
             _x(r["achieved_speedup"]), _x(r["ideal_speedup"])]
            for r in d["rows"] if r["budget_fraction"] in (0.05, 1.0)]  # fmt: skip
    return _table(head, rows) + "\n\n" + _source(d, name) + f" {d['gpu']}, {d['rows'][0]['model']}" \
        " (ViT-B/16 widths, random weights); 10% budgets in the JSON."


def zoo_sweep() -> str:
    name = "zoo_sweep.json"
    d = _load(name)
    head = ["model", "gates after", "top-1 agreement", "max rel. error", "history (max rel.)",
            "executed", "100% density ms", "dense fp32 ms (TF32)", "dense fp32 ms (no TF32)",
            "cost vs no-TF32"]
    rows = []
    for r in d["models"]:
        if "error" in r:
            rows.append([r["model"], "–", "error: " + r["error"][:60]] + ["–"] * 7)
            continue
        rows.append([r["model"], "/".join(r["gates_after"]), _pct(r["top1_agreement"]),
                     f"{r['max_rel_error_vs_pytorch']:.1e}", f"{r['history_max_rel_diff']:.0e}",
                     _pct(r["executed_density"]), _ms(r["engine_full_ms"]),
                     _ms(r.get("best_dense_same_dtype_ms", r.get("best_dense_fp32_ms"))),
                     _ms(r.get("best_dense_ieee32_ms")),
                     _x(r.get("full_density_cost_vs_dense_ieee32"))])  # fmt: skip
    return _table(head, rows) + "\n\n" + _source(d, name) + (
        f" {d['device']}, {d['resolution']}², {d['models'][0].get('frames', '?')} frames of the "
        f"embedded footage ({'x264-compressed' if d['footage_compressed'] else 'uncompressed'})"
        ", random weights with batch-norm statistics of the footage.")


def zoo_sweep_bf16() -> str:
    """The sweep in bfloat16 (two runs of the script: one device call could not hold all)."""
    head = ["model", "top-1 agreement", "max rel. error", "history (max rel.)", "executed",
            "CUDA-graph step", "100% density ms", "best dense bf16 ms", "cost vs dense bf16"]
    rows, srcs = [], []
    for name in ("zoo_sweep_bf16.json", "zoo_sweep_bf16_b.json"):
        d = _load(name)
        srcs.append(_source(d, name))
        for r in d["models"]:
            if "error" in r:
                rows.append([r["model"], "error: " + r["error"][:60]] + ["–"] * 7)
                continue
            pre = "no CUDA-graph step ("
            graph = next((f[len(pre) : f.rindex("):")] for f in r["fallbacks"]
                          if f.startswith(pre)), "yes")  # fmt: skip
            rows.append([r["model"], _pct(r["top1_agreement"]),
                         f"{r['max_rel_error_vs_pytorch']:.1e}",
                         f"{r['history_max_rel_diff']:.0e}", _pct(r["executed_density"]),
                         graph if graph == "yes" else f"no: {graph}", _ms(r["engine_full_ms"]),
                         _ms(r["best_dense_same_dtype_ms"]),
                         _x(r["full_density_cost_vs_dense"])])  # fmt: skip
    return _table(head, rows) + "\n\n" + " ".join(srcs)


def engine_gpu_half_resnet50() -> str:
    """ResNet-50 in bfloat16 against the best dense bfloat16 model (720p, batch 1)."""
    name = "engine_gpu_half_resnet50.json"
    d = _load(name)
    r = d["runs"][0]
    head = ["input change", "density", "bf16 engine ms", "best dense bf16 ms", "speedup",
            "history (max rel.)"]
    rows = [[_pct(p["area"]), _pct(p["bfloat16"]["density"]), _ms(p["bfloat16"]["ms"], 3),
             f"{_ms(p['bfloat16']['best_dense_ms'], 3)} "
             f"({p['bfloat16']['best_dense'].replace('bfloat16_', '')})",
             _x(p["bfloat16"]["speedup_vs_best_dense"]),
             f"{p['bfloat16']['history_rel_err']:.0e}"] for p in r["points"]]  # fmt: skip
    return _table(head, rows) + "\n\n" + _source(d, name) + f" {d.get('device', '')}."


TABLES: dict[str, Callable[[], str]] = {
    "demo": demo, "footage": footage, "gate_modes": gate_modes, "engine_cpu": engine_cpu,
    "engine_gpu": engine_gpu, "train_overhead": train_overhead, "token_engine": token_engine,
    "token_engine_gpu": token_engine_gpu, "folder_recipe": folder_recipe, "zoo_sweep": zoo_sweep,
    "engine_gpu_half": engine_gpu_half, "zoo_sweep_bf16": zoo_sweep_bf16,
    "engine_gpu_half_resnet50": engine_gpu_half_resnet50,
}  # fmt: skip


def render(text: str) -> str:
    out, pos = [], 0
    while True:
        start = text.find("<!-- table: ", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        head_end = text.index("-->", start) + 3
        name = text[start + len("<!-- table: "):head_end - 3].strip()
        end = text.index("<!-- /table -->", head_end)
        if name not in TABLES:
            raise SystemExit(f"README.md: unknown table {name!r}; known: {sorted(TABLES)}")
        out.append(text[pos:head_end] + "\n" + TABLES[name]() + "\n")
        pos = end


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only compare, do not write")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args()
    path = Path(args.readme)
    old = path.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(f"{path}: tables differ from bench/results; run python bench/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    print(f"{path}: tables rendered from bench/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
