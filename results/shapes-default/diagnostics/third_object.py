"""Why no run names a third object, though 359 of the 1,000 test scenes have one.

Written for world v10 (commit 4577a21 and before; the grammar changed in v14). In its grammar the road
to a third object forks right after the first: "a X at P, a Y ... and a Z ..." takes a comma there,
while "a X at P and a Y ..." can only end after the second object.
On the test scenes with three objects, taking the main object's true description (colour, shape,
position) as the stem:
(1) What does the captioner say next: P(",") against P(" and") and P(" on") (the background)? The same
    after the main object of the scenes with exactly two objects, where a comma is wrong. And after the
    first two objects' true description, P(" and") (a third object off the grammar) against P(" on"),
    in both kinds of scene? (P(" with") is the road in the v11/v12 drafts' grammar, "A with B and C".)
(2) What would naming the third object pay? The vlrm-rs reward, the reward CLIP's cosine and the judge's
    cosine of the true three-object caption minus those of the true two-object one (no sizes), and how
    often each model scores the true caption above one with the third object's shape, or colour, changed.

    python results/shapes-default/diagnostics/third_object.py [POLICY]   # default: the world's base captioner
"""
import dataclasses
import random
import sys

import numpy as np
import torch

from common import vlrm_rs_reward  # first: it puts the repository root on sys.path
import shapes
import vlrm

world = shapes.load_world("default")
policy, processor = vlrm.load_policy(sys.argv[1] if len(sys.argv) > 1 else str(world.path("captioner")))
tokenizer, to_pixels = processor.tokenizer, vlrm.processor_normalizer(processor, "cpu")
scenes, images = world.scenes["test"], world.images("test")
three = [i for i, s in enumerate(scenes) if len(s.objects) == 3]
two = [i for i, s in enumerate(scenes) if len(s.objects) == 2]
pixels = torch.from_numpy(np.array([images[i] for i in three]))
print(f"{len(three)} test scenes with three objects, e.g. {shapes.describe(scenes[three[0]], size=False)!r}")


# (1) the next word after a true stem
WORDS = (",", " with", " and", " on")
word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
with torch.no_grad():  # each image's soft prefix (1, Q, H), computed once for both stems
    prefixes = {i: vlrm.soft_prefix(policy, policy.vision_model(to_pixels(torch.from_numpy(np.array(images[i]))[None]))
                                    .last_hidden_state) for i in three + two}


@torch.no_grad()
def next_word_probs(indices, n):
    """Mean P(word | image, true description of its first n objects) over the test scenes `indices`."""
    probs = []
    for i in indices:
        stem = shapes.describe(scenes[i], n, size=False, background=False)
        ids = torch.tensor([tokenizer(stem, add_special_tokens=False)["input_ids"]])
        state = vlrm.caption_states(policy, prefixes[i], torch.cat([ids, ids[:, :1]], 1))[:, -1]  # after the stem
        probs.append(policy.language_model.lm_head(state).softmax(-1)[0, word_ids])
    return torch.stack(probs).mean(0)


for label, indices, n in (("three objects, after the main one", three, 1), ("two objects, after the main one", two, 1),
                          ("three objects, after the first two", three, 2), ("two objects, after the first two", two, 2)):
    probs = next_word_probs(indices, n)
    print(f"(1) {len(indices)} scenes with {label}: " + ", ".join(f"P({w!r}) {float(p):.3f}" for w, p in zip(WORDS, probs)))

# (2) what the third object is worth to each model
rng = random.Random(0)


def third_changed(scene, attribute):
    o = scene.objects[2]
    pool = shapes.SHAPES if attribute == "shape" else tuple(shapes.COLOURS)
    changed = dataclasses.replace(o, **{attribute: rng.choice([v for v in pool if v != getattr(o, attribute)])})
    return dataclasses.replace(scene, objects=scene.objects[:2] + (changed,))


captions = {"two": [shapes.describe(scenes[i], 2, size=False) for i in three],
            "three": [shapes.describe(scenes[i], 3, size=False) for i in three],
            "wrong shape": [shapes.describe(third_changed(scenes[i], "shape"), 3, size=False) for i in three],
            "wrong colour": [shapes.describe(third_changed(scenes[i], "colour"), 3, size=False) for i in three]}


models = {"vlrm-rs reward": vlrm_rs_reward(world, policy, tokenizer),
          "reward CLIP": vlrm.clip_reward(str(world.path("clip")), "cpu"),  # vlrm's CLIP reward: the cosine
          "judge CLIP": vlrm.clip_reward(str(world.path("judge_clip")), "cpu")}
for name, fn in models.items():
    with torch.no_grad():
        s = {k: torch.cat([fn(pixels[i:i + 64], v[i:i + 64]) for i in range(0, len(three), 64)]) for k, v in captions.items()}
    gain = s["three"] - s["two"]
    print(f"(2) {name}: true third object {float(gain.mean()):+.3f} (above two objects in "
          f"{float((gain > 0).float().mean()):.2f}); right above wrong shape {float((s['three'] > s['wrong shape']).float().mean()):.2f}, "
          f"colour {float((s['three'] > s['wrong colour']).float().mean()):.2f}")
