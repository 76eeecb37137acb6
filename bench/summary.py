"""One table of every benchmark check of one `make bench` run, PASS/FAIL against its target.

    .venv/bin/python bench/summary.py [--dir .state/bench]

Reads the JSON the benchmarks wrote in this run (engine.json, e2e.json, roofline.json), prints
the table, and writes summary.json and summary.png (a bar per check: value / target, the line at
1 is the target) next to them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def load(directory: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in ("engine", "e2e"):
        path = directory / f"{name}.json"
        if not path.exists():
            print(f"note: {path} is missing (run bench/{name}.py --json {path})", file=sys.stderr)
            continue
        for check in json.loads(path.read_text())["checks"]:
            rows.append({"bench": name, **check, "pass": check["value"] >= check["target"]})
    return rows


def chart(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no PNG (pip install -e '.[bench]' adds matplotlib)", file=sys.stderr)
        return False
    labels = [f"{r['bench']}: {r['label'][:60]}" for r in rows]
    ratios = [r["value"] / r["target"] for r in rows]
    figure, axes = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    axes.barh(labels, ratios, color=["tab:green" if r["pass"] else "tab:red" for r in rows])
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xlabel("measured / target (>= 1 passes)")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=REPO / ".state" / "bench")
    args = parser.parse_args(argv)
    rows = load(args.dir)
    roofline_path = args.dir / "roofline.json"
    if roofline_path.exists():
        roofline = json.loads(roofline_path.read_text())
        print(f"CPU: {roofline['cpu']['model']}; {', '.join(roofline['cpu']['flags'])}")
        print(f"INT8 kernels: {roofline['cpu']['int8_kernels']}")
        for name, figures in roofline["engine"].items():
            print(f"  {name:13} {figures['fraction_of_ceiling']:6.1%} of the GEMM-only ceiling")
    print(f"\n{'':4}  {'bench':6}  {'check':80}  {'value':>8}  {'target':>7}")
    for row in rows:
        verdict = "PASS" if row["pass"] else "FAIL"
        print(
            f"{verdict}  {row['bench']:6}  {row['label'][:80]:80}  {row['value']:8.2f}  {row['target']:7.2f}"
        )
    passed = sum(r["pass"] for r in rows)
    print(f"\n{passed} of {len(rows)} checks pass")
    (args.dir / "summary.json").write_text(json.dumps(rows, indent=2))
    if rows and chart(rows, args.dir / "summary.png"):
        print(f"wrote {args.dir / 'summary.json'} and {args.dir / 'summary.png'}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
