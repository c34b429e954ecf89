"""Does the reward pay for a doubled small object? A run's test captions that name three objects, split
into those whose third object repeats an earlier one's colour and shape ("... with a pink triangle and a
pink triangle") and the rest. For each, the third object's shape is swapped for each of the other four
shapes, and the third object is cut ("... with a pink triangle"). The vlrm-rs sequence reward (no
penalties), the reward CLIP's cosine and the judge CLIP's cosine of the caption as written, minus the
mean over the swaps and minus the cut. The repetition penalty charges w_repeat (1 in the preset) for the
repeated 3-gram a double writes, so a double that the sequence reward pays by more than w_repeat over
the other shapes is what a policy maximising the return keeps.
Then, given a run's directory, how far RL moved the choice: the probability that the run's policy and the
base captioner give the repeated shape, and how often it is the likeliest next token (the one greedy
decoding writes), on the stems where the run wrote a double and, free of that selection, on every
three-object test scene's true caption as the run writes it (no sizes or positions), cut where a double
would begin: "... with a pink triangle and a pink".

    python results/shapes-default/diagnostics/doubles.py CAPTIONS.json [RUN_DIR]
    python results/shapes-default/diagnostics/doubles.py results/shapes-default/captions_shapes-vlrm-rs-seed0.json runs/shapes-vlrm-rs-seed0
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from common import vlrm_rs_reward  # first: it puts the repository root on sys.path
import eval as ev
import shapes
import vlrm

world = shapes.load_world("default")
policy, processor = vlrm.load_policy(str(world.path("captioner")))  # the reference LM reward needs its tokenizer
scorers = {"vlrm-rs reward": vlrm_rs_reward(world, policy, processor.tokenizer),
           "reward CLIP cosine": vlrm.clip_reward(str(world.path("clip")), "cpu"),
           "judge CLIP cosine": vlrm.clip_reward(str(world.path("judge_clip")), "cpu")}
scenes, images = world.scenes["test"], world.images("test")
captions = json.load(open(sys.argv[1]))
THIRD = re.compile(r" and an? (?:\w+ ){0,2}(" + "|".join(shapes.SHAPES) + r")\b.*$")  # the third object, to the end

groups = {"doubled": [], "not doubled": []}  # (scene index, caption, its third object's shape at match.start(1))
for key, caption in captions.items():
    objects, _, _ = ev.parse_caption(caption)
    match = THIRD.search(caption)
    if len(objects) != 3 or match is None:
        continue
    named = [(o.get("colour"), o["shape"]) for o in objects]
    groups["doubled" if named[2] in named[:2] else "not doubled"].append((int(key), caption, match))

with torch.no_grad():
    for group, items in groups.items():
        print(f"\n{group}: {len(items)} captions naming three objects")
        if not items:
            continue
        idx = [i for i, _, _ in items]
        pixels = torch.from_numpy(np.array([images[i] for i in idx]))
        written = [c for _, c, _ in items]
        swaps = [[c[:m.start(1)] + s + c[m.end(1):] for s in shapes.SHAPES if s != m.group(1)] for _, c, m in items]
        cut = [c[:m.start()] for _, c, m in items]
        for name, score in scorers.items():
            as_written = score(pixels, written)  # (n,)
            swapped = torch.stack([score(pixels, [s[k] for s in swaps]) for k in range(len(shapes.SHAPES) - 1)], 1)
            minus_swaps = as_written - swapped.mean(1)
            print(f"  {name}: as written {as_written.mean():.3f}; minus the mean of the other shapes "
                  f"{minus_swaps.mean():+.3f} (above the best swap in {(as_written > swapped.max(1).values).float().mean():.2f}); "
                  f"minus the cut {(as_written - score(pixels, cut)).mean():+.3f}")


@torch.no_grad()
def p_shape(model, stems):
    """P(" " + shape | image, stem) for (scene index, stem text, shape) triples, and whether it is the
    likeliest next token, the one greedy decoding writes -> two (n,) arrays."""
    to_pixels, tokenizer, probs, greedy = vlrm.processor_normalizer(processor, "cpu"), processor.tokenizer, [], []
    for i, stem, shape in stems:
        feats = model.vision_model(to_pixels(torch.from_numpy(np.array(images[i]))[None])).last_hidden_state
        ids = torch.tensor([tokenizer(stem, add_special_tokens=False)["input_ids"]])
        logits = model.language_model(inputs_embeds=vlrm._prompt(model, vlrm.soft_prefix(model, feats), ids)).logits
        shape_id = tokenizer(" " + shape, add_special_tokens=False)["input_ids"][0]
        probs.append(logits[0, -1].float().softmax(-1)[shape_id].item())
        greedy.append(logits[0, -1].argmax().item() == shape_id)
    return np.array(probs), np.array(greedy)


if len(sys.argv) > 2:
    checkpoint = vlrm.find_checkpoint(Path(sys.argv[2]))
    if checkpoint is None:
        sys.exit(f"no checkpoint in {sys.argv[2]}: give the run directory of vlrm.py (e.g. runs/shapes-vlrm-rs-seed0)")
    run = vlrm.load_policy(str(checkpoint / "policy"))[0]
    # (scene, stem, the shape that makes it a double): the run's own stems, and the true ones, cut after
    # "... and a C", C being the second object's colour
    written = [(i, c[:m.start(1)].rstrip(), m.group(1)) for i, c, m in groups["doubled"]]
    made = []
    for i, scene in enumerate(scenes):
        if len(scene.objects) == 3:
            truth = shapes.describe(scene, size=False, position=False)
            second = scene.objects[1]
            double = shapes.object_phrase(second, size=False, position=False)  # "a red triangle"
            made.append((i, truth[:THIRD.search(truth).start()] + " and " + double[:-len(second.shape) - 1],
                         second.shape))
    print(f"\nP(the repeated shape): on the {len(written)} stems where the run wrote a double / on {len(made)} "
          "true three-object stems ending in the second object's colour")
    for name, model in (("base captioner", policy), ("the run's policy", run)):
        print(f"  {name}: " + " / ".join(f"mean {p.mean():.2f}, the likeliest next token in {g.mean():.2f}"
                                          for p, g in (p_shape(model, stems) for stems in (written, made) if stems)))
