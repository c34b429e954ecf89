"""What a run's test captions name, counted against the test scenes: how many objects per caption by the
scene's object count, captions naming three objects with all three colours right, the background, small
objects named twice (same colour and shape) and whether the scene holds two such, the other repeating
captions (small objects sharing a colour; a small object named as the main one, no size telling them
apart), the main object's position named and right, and the colour claims eval.py counts wrong, split
into colours absent from the scene and colours present but bound to a shape the scene has in another
colour (a guessed small shape). Last, how often true captions repeat a 3-gram: rich, without positions
(as the c = 0 run on v14 writes), and without positions or sizes (as the c = 0.05 run writes).

    python results/shapes-default/diagnostics/caption_counts.py results/shapes-default/captions_shapes-vlrm-rs-seed0.json
"""
import json
import sys
from collections import Counter

import common  # noqa: F401  (puts the repository root on sys.path)
import eval as ev
import shapes


def repeats_3gram(caption):
    """eval.py's repeat_3gram, for one caption."""
    grams = ev.ngrams(ev.words(caption), 3)
    return len(set(grams)) < len(grams)


scenes = shapes.load_world("default").scenes["test"]
captions = json.load(open(sys.argv[1]))
c = Counter()
for key, caption in captions.items():
    scene = scenes[int(key)]
    objects, _, background = ev.parse_caption(caption)
    c[f"captions naming {len(objects)} objects, in {len(scene.objects)}-object scenes"] += 1
    c["background named"] += background is not None
    c["background right"] += background == scene.background
    if len(objects) == 3:
        c["three objects named, all three colours right"] += (sorted(str(o.get("colour")) for o in objects)
                                                              == sorted(o.colour for o in scene.objects))
    small = [(o.get("colour"), o["shape"]) for o in objects[1:]]  # named small objects (colour, shape)
    true_small = [(o.colour, o.shape) for o in scene.objects[1:]]  # the scene's
    doubled = len(small) == 2 and small[0] == small[1]
    if doubled:
        c["a small object (colour, shape) named twice"] += 1
        c["  ... and the scene holds two such"] += true_small.count(small[0]) == 2
        c["  ... its colour is a small object's"] += any(o.colour == small[0][0] for o in scene.objects[1:])
        c["  ... one copy with a position"] += sum("position" in o for o in objects[1:]) == 1
    if objects and "position" in objects[0]:
        c["the main object's position named"] += 1
        c["  ... and right"] += objects[0]["position"] == scene.objects[0].cell
    if repeats_3gram(caption):
        c["repeat a 3-gram"] += 1
        if not doubled and len(small) == 2 and small[0][0] == small[1][0]:
            c["  other repeating: both small objects share a colour"] += 1
            c["  ... true"] += [o.colour for o in scene.objects[1:]].count(small[0][0]) == 2
        main = objects and (objects[0].get("colour"), objects[0]["shape"])
        if not doubled and main in small and not any("size" in o for o in objects):  # sizes would tell them apart
            c["  other repeating: a small object named as the main one, no sizes"] += 1
            c["  ... and the scene holds one such"] += (scene.objects[0].colour, scene.objects[0].shape) in true_small
    for i, o in enumerate(objects):
        if "colour" not in o:
            continue
        c["colour claims"] += 1
        same_shape = [t for t in scene.objects if t.shape == o["shape"]] or scene.objects
        if not any(t.colour == o["colour"] for t in same_shape):  # eval.attribute_counts' rule
            c["colour claims wrong"] += 1
            c["  ... on the main object"] += i == 0
            c["  ... the colour is in the scene"] += any(t.colour == o["colour"] for t in scene.objects)
for name, count in c.items():
    print(f"{name:60s} {count}")
for name, caption in (("rich", shapes.rich_caption),
                      ("without positions", lambda s: shapes.describe(s, position=False)),
                      ("without positions or sizes", lambda s: shapes.describe(s, size=False, position=False))):
    share = sum(repeats_3gram(caption(s)) for s in scenes) / len(scenes)
    print(f"{'true captions repeating a 3-gram, ' + name:60s} {share:.3f}")
