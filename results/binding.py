"""Print the binding experiment's two tables (docs/binding.md) from its records.

    python results/binding.py [results/shapes-default/v17]

Reads the world reports (world_report.json: v17; control_world_report.json: the control world, the same
recipe without binding twins; v16_world_report.json: world v16's weights under the same report) and
eval_results.json, one eval.py over every run with v17's judge, each policy named <world>-<run>.
"""
import json
import sys
from pathlib import Path

WORLDS = {"v16": "v16_world_report.json", "control": "control_world_report.json", "v17": "world_report.json"}
PROBES = [f"{kind}_{what}" for kind in ("steal", "swap") for what in ("colour", "shape", "position")]
MODELS = (("judge", "{}_pairwise_judge"), ("reward CLIP", "{}_pairwise_reward_clip"), ("ITM", "itm_{}_pairwise"))
RUNS = ("v16-value-seed0", "v16-value-seed1", "control-value-seed0", "control-value-seed1",
        "v17-value-seed0", "v17-value-seed1", "v17-vlrm-seed0")
METRICS = (("test R@1", "t2i/R@1", "{:.3f}"), ("CHAIR_i", "objects/chair_i", "{:.3f}"),
           ("CHAIR_s", "objects/chair_s", "{:.3f}"), ("objects/recall", "objects/recall", "{:.3f}"),
           ("mentions", "objects/mentions", "{:.2f}"), ("attr. recall", "attr/all/recall", "{:.2f}"),
           ("attr. halluc.", "attr/all/hallucination", "{:.3f}"), ("position recall", "attr/position/recall", "{:.2f}"),
           ("looping", "loop_3gram", "{:.3f}"), ("words", "words", "{:.1f}"))


def main(folder: Path) -> None:
    reports = {w: json.loads((folder / f).read_text()) for w, f in WORLDS.items()}
    print("| probe: judge / reward CLIP / ITM | " + " | ".join(WORLDS) + " |")
    print("| --- " * (len(WORLDS) + 1) + "|")
    for probe in PROBES + ["small_colour", "background"]:
        cells = [" / ".join(f"{r[key.format(probe)]:.2f}" for _, key in MODELS) for r in reports.values()]
        print(f"| {probe} | " + " | ".join(cells) + " |")
    auc = [f"{r['itm_roc_auc']:.3f} / {r['itm_roc_auc_short']:.3f}" for r in reports.values()]
    print("| ITM ROC-AUC rich / short | " + " | ".join(auc) + " |")
    print()
    policies = json.loads((folder / "eval_results.json").read_text())["policies"]
    runs = [r for r in RUNS if r in policies]
    print("| run | " + " | ".join(label for label, _, _ in METRICS) + " |")
    print("| --- " * (len(METRICS) + 1) + "|")
    for run in runs:
        m = policies[run]["metrics"]
        print(f"| {run} | " + " | ".join(fmt.format(m[key]) for _, key, fmt in METRICS) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "shapes-default" / "v17"))
