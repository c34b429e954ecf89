"""Print the baselines' head-to-head table (docs/baselines.md) from the recorded runs.

    python results/head_to_head.py FOLDER

The world v16 head-to-head of docs/baselines.md: its records stand at commit 6ba1db8,
    git checkout 6ba1db8 -- results/shapes-default/v16 && python results/head_to_head.py results/shapes-default/v16

Reads metrics_<run>.jsonl (validation judge R@1 over training, the baseline's explained variance),
eval_results.json (the test figures of eval.py, one policy per run, named as the run) and
wall_clock.txt ("<run>: <h:mm:ss or m:ss>" lines). The ceiling is the world report's.
"""
import json
import sys
from pathlib import Path

RUNS = ("value-seed0", "value-seed1", "rloo-seed0", "rloo-seed1", "batch-seed0")
STEPS = (250, 500, 1000, 2000)


def main(folder: Path) -> None:
    ceiling = json.loads((folder / "world_report.json").read_text())["ceiling_r1_judge"]
    tests = json.loads((folder / "eval_results.json").read_text())["policies"]
    clocks = dict(line.split(": ", 1) for line in (folder / "wall_clock.txt").read_text().splitlines() if ": " in line)
    print(f"| run | val R@1 at {' / '.join(f'{s:,}' for s in STEPS)} | first step >= 0.9 x ceiling | test R@1 "
          f"(x ceiling) | CHAIR_i | attribute halluc. | words | explained variance, last 50 lines | wall clock |")
    print("| --- " * 9 + "|")
    for run in RUNS:
        rows = [json.loads(line) for line in (folder / f"metrics_{run}.jsonl").read_text().splitlines()]
        val = {r["step"]: r["val/judge_r1"] for r in rows if "val/judge_r1" in r}
        first = next((s for s in sorted(val) if val[s] >= 0.9 * ceiling), None)
        ev = [r["charts/explained_variance"] for r in rows if "charts/explained_variance" in r][-50:]
        m = tests[run]["metrics"]
        print(f"| {run} | {' / '.join(f'{val[s]:.3f}' for s in STEPS)} | {first if first else 'never'} | "
              f"{m['t2i/R@1']:.3f} ({m['t2i/R@1'] / ceiling:.2f}) | {m['objects/chair_i']:.3f} | "
              f"{m['attr/all/hallucination']:.3f} | {m['words']:.1f} | {sum(ev) / len(ev):.3f} | {clocks[run].strip()} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
