"""Reports of training runs: one self-contained HTML page, PNG plots and ``report.json``.

``build_report(run_dirs, out_dir)`` backs ``deltasparse report RUN_DIR... [--out DIR]``.
"""

from .build import PLOT_FILES, build_report
from .runs import PHASES, RunData, load_run

__all__ = ["PHASES", "PLOT_FILES", "RunData", "build_report", "load_run"]
