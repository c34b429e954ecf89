"""What do a captioner's *sampled* captions (temperature 1, as in RL rollouts) say, and what reward
(vlrm-rs weights: 20 x CLIP + 0.3 x ITM + 0.3 x reference LM) do they earn? 1,024 training scenes, grouped
by whether the first colour named belongs to the main object; then, for each main-object colour, how
often a colour is named first and how often that colour is right.

    python results/shapes-default/diagnostics/sampled_rewards.py [POLICY]   # default: the world's base captioner
"""
import collections
import sys

import numpy as np
import torch

from common import vlrm_rs_reward  # first: it puts the repository root on sys.path
import eval as ev
import shapes
import vlrm

torch.manual_seed(0)
world = shapes.load_world("default")
policy, processor = vlrm.load_policy(sys.argv[1] if len(sys.argv) > 1 else str(world.path("captioner")))
tokenizer, to_pixels = processor.tokenizer, vlrm.processor_normalizer(processor, "cpu")
reward_fn = vlrm_rs_reward(world, policy, tokenizer)
scenes, images = world.scenes["train"][:1024], torch.from_numpy(np.array(world.images("train")[:1024]))
groups, by_colour = collections.defaultdict(list), collections.defaultdict(list)
for i in range(0, len(scenes), 64):
    batch = images[i:i + 64]
    with torch.no_grad():
        feats = policy.vision_model(to_pixels(batch)).last_hidden_state
        tokens, _ = vlrm.rollout(policy, vlrm.soft_prefix(policy, feats), 40)
    captions = [c.strip() for c in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    reward = reward_fn(batch, captions)
    for scene, caption, r in zip(scenes[i:i + 64], captions, reward.tolist()):
        colours = [o["colour"] for o in ev.parse_caption(caption)[0] if "colour" in o]
        group = ("no colour" if not colours else "main object's colour" if colours[0] == scene.objects[0].colour
                 else "a small object's colour" if colours[0] in [o.colour for o in scene.objects] else "a colour not in the scene")
        groups[group].append(r)
        by_colour[scene.objects[0].colour].append(colours[0] if colours else None)
n = sum(len(v) for v in groups.values())
for group, rewards in sorted(groups.items(), key=lambda kv: -len(kv[1])):
    print(f"{group:26s} {len(rewards) / n:6.1%} of captions, mean reward {np.mean(rewards):6.2f}")
for colour, said in by_colour.items():
    named = [c for c in said if c is not None]
    print(f"main object {colour:7s}: a colour named in {len(named) / len(said):4.0%}, right in "
          f"{np.mean([c == colour for c in named]) if named else float('nan'):4.0%} of those")
