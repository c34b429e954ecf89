"""How much detail must a caption carry? True captions of the 1,000 test scenes at fixed levels of detail:
the judge CLIP's and the reward CLIP's R@1, and the mean vlrm-rs reward (20 x CLIP + 0.3 x ITM + 0.3 x
reference LM) on the first 300 of them. "repeated shape" is the v6 policy's hack: the main shape once
per object ("a square, a square and a square" in v10's grammar). "run form" is how the v10 run writes
(the main object's colour, shape and position, the small ones' colour and shape, the background), with
two objects, or three, in the grammar of the world built. The lab notebook's figures for it
(results/shapes-default/NOTEBOOK.md) are world v10's.

    python results/shapes-default/diagnostics/detail_levels.py
"""

import dataclasses

import numpy as np
import torch

from common import vlrm_rs_reward  # first: it puts the repository root on sys.path
import eval as ev
import shapes
import vlrm


def repeated_shape(scene):
    return shapes.join_objects([f"a {scene.objects[0].shape}"] * len(scene.objects))


def run_form(scene, objects, guessed_shapes=False):
    """The tuned run's form: the main object's colour, shape and position, the small ones' colour and
    shape, the background. With guessed_shapes, each small object gets the main one's shape (no model
    here reads a small shape)."""
    main, small = scene.objects[0], scene.objects[1:objects]
    if guessed_shapes:
        small = [dataclasses.replace(o, shape=main.shape) for o in small]
    phrases = [shapes.object_phrase(main, size=False)] + [shapes.object_phrase(o, size=False, position=False)
                                                          for o in small]
    return shapes.join_objects(phrases, scene.background)


LEVELS = {  # name: caption of a scene
    "main: shape": lambda s: shapes.describe(s, 1, size=False, colour=False, position=False, background=False),
    "main: colour shape": lambda s: shapes.describe(s, 1, size=False, position=False, background=False),
    "main: colour shape position": lambda s: shapes.describe(s, 1, size=False, background=False),
    "main: colour shape + background": lambda s: shapes.describe(s, 1, size=False, position=False),
    "main: all but size + background": lambda s: shapes.describe(s, 1, size=False),
    "all: shape": lambda s: shapes.describe(s, size=False, colour=False, position=False, background=False),
    "repeated shape": repeated_shape,
    "all: colour shape": lambda s: shapes.describe(s, size=False, position=False, background=False),
    "all: colour shape + background": lambda s: shapes.describe(s, size=False, position=False),
    "all: colour shape position": lambda s: shapes.describe(s, size=False, background=False),
    "all: all but size + background": lambda s: shapes.describe(s, size=False),
    "run form: two objects": lambda s: run_form(s, 2),
    "run form: two, small shape guessed": lambda s: run_form(s, 2, guessed_shapes=True),
    "run form: three objects": lambda s: run_form(s, 3),
    "run form: three, small shapes guessed": lambda s: run_form(s, 3, guessed_shapes=True),
    "rich (the ceiling)": shapes.rich_caption,
}
world = shapes.load_world("default")
scenes, images = world.scenes["test"], np.array(world.images("test"))
judge = ev.ClipJudge(str(world.path("judge_clip")), images, "cpu")
reward_clip = ev.ClipJudge(str(world.path("clip")), images, "cpu")
policy, processor = vlrm.load_policy(str(world.path("captioner")))
reward_fn = vlrm_rs_reward(world, policy, processor.tokenizer)
print(f"{'caption':38s} {'judge R@1':>9s} {'reward-CLIP R@1':>15s} {'vlrm-rs reward':>14s}")
for name, caption in LEVELS.items():
    captions = [caption(s) for s in scenes]
    r1 = [m.recall(captions)["t2i/R@1"] for m in (judge, reward_clip)]
    few, pixels = captions[:300], torch.from_numpy(images[:300])
    reward = reward_fn(pixels, few).mean()
    print(f"{name:38s} {r1[0]:9.3f} {r1[1]:15.3f} {reward:14.2f}")
