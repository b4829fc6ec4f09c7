"""`python -m analysis.report EXPERIMENT_DIR [--out DIR]`: a finished sweep as report.md plus PNG figures.

The same as `python -m vs2ray report`; the report and its figures live in `vs2ray.report` and `vs2ray.plots`,
so that the command-line front imports nothing from this package (every import runs from `analysis` to `vs2ray`).
"""

from __future__ import annotations

from vs2ray.report import main, write_report

__all__ = ["main", "write_report"]

if __name__ == "__main__":
    raise SystemExit(main())
