"""Print each figure of a `bench/run_all.py` result beside `bench/baseline.json`, as a ratio.

Machines are noisy: read a ratio beyond about ±20% as worth a look, not as a verdict.

    python bench/compare.py [bench/results/latest.json] [--baseline bench/baseline.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: figures where a larger number is better; for the rest, smaller is better
HIGHER_IS_BETTER = ("dispatch_per_s", "results_per_s")


def verdict(name: str, ratio: float) -> str:
    better = ratio > 1 if name.startswith(HIGHER_IS_BETTER) else ratio < 1
    if abs(ratio - 1) < 0.2:
        return "same"
    return "better" if better else "WORSE"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, nargs="?", default=HERE / "results" / "latest.json")
    ap.add_argument("--baseline", type=Path, default=HERE / "baseline.json")
    args = ap.parse_args()
    try:
        result = json.loads(args.result.read_text())
        baseline = json.loads(args.baseline.read_text())
    except (OSError, ValueError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print(f"{'figure':<32}{'baseline':>12}{'now':>12}{'ratio':>8}")
    for name, base in baseline.items():
        now = result.get(name)
        if not isinstance(base, (int, float)) or not isinstance(now, (int, float)) or name == "agents":
            continue
        ratio = now / base if base else float("inf")
        print(f"{name:<32}{base:>12.3f}{now:>12.3f}{ratio:>8.2f}  {verdict(name, ratio)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
