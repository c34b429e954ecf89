"""Draw validation R@1 against step for one or more runs, as the SVG the README shows: the judge's, and the
reward CLIP's where the run logged it (val/reward_r1). A gap that opens between the two is over-optimisation.

    python results/curves.py OUT.svg NAME=RUN_DIR_OR_METRICS_JSONL [NAME=...]

Each run is a run folder (its metrics.jsonl) or a recorded metrics.jsonl; the chart is eval.py's
svg_curve, one line per run.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ev  # noqa: E402  (the repository root, wherever this is run from)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        sys.exit(__doc__)
    series = {}
    for arg in argv[1:]:
        name, path = arg.split("=", 1)
        curves = ev.read_curves(Path(path))
        if "val/judge_r1" not in curves:
            sys.exit(f"{path}: no val/judge_r1 in its metrics")
        series[f"{name} judge"] = curves["val/judge_r1"]
        if "val/reward_r1" in curves:
            series[f"{name} reward CLIP"] = curves["val/reward_r1"]
    title = "validation R@1, judge and reward CLIP (200 held-out scenes, greedy)"
    Path(argv[0]).write_text(ev.svg_curve(title, series, w=640, h=300))
    print(f"wrote {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
