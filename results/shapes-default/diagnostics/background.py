"""Does a captioner know the background? No run has ever named one, though the judge needs it most
("What the target needs": every object's colour and shape gives R@1 0.224; with the background, 0.474).

(1) Is it in the soft prefix? A linear probe (logistic regression, 4,000 training scenes, 300 Adam steps)
    reads the background from the flattened soft prefix (Q, H_lm), scored on the 1,000 test scenes.
(2) Does the OPT say it? For 384 training scenes, make the captioner go on from its greedy caption with
    " on a" and sample up to 6 tokens: which background does it name, and is it right? Then the vlrm-rs
    reward of the greedy caption plus the sampled background, and plus the true one, minus the greedy
    caption's own.

    python results/shapes-default/diagnostics/background.py [POLICY]   # default: the world's base captioner
"""
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import continue_from, vlrm_rs_reward  # first: it puts the repository root on sys.path
import shapes
import vlrm

torch.manual_seed(0)
world = shapes.load_world("default")
policy, processor = vlrm.load_policy(sys.argv[1] if len(sys.argv) > 1 else str(world.path("captioner")))
tokenizer, to_pixels = processor.tokenizer, vlrm.processor_normalizer(processor, "cpu")
backgrounds = list(shapes.BACKGROUNDS)


# (1) the probe
@torch.no_grad()
def prefix_features(split, n):
    images = torch.from_numpy(np.array(world.images(split)[:n]))
    prefix = vlrm.soft_prefix(policy, policy.vision_model(to_pixels(images)).last_hidden_state)  # (n, Q, H)
    labels = torch.tensor([backgrounds.index(s.background) for s in world.scenes[split][:n]])
    return prefix.flatten(1), labels


x_train, y_train = prefix_features("train", 4000)
x_test, y_test = prefix_features("test", 1000)
mean, std = x_train.mean(0), x_train.std(0) + 1e-6
x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
probe = torch.nn.Linear(x_train.shape[1], len(backgrounds))
opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
for _ in range(300):
    opt.zero_grad()
    (F.cross_entropy(probe(x_train), y_train) + 1e-3 * probe.weight.pow(2).sum()).backward()
    opt.step()
with torch.no_grad():
    print(f"(1) linear probe of the soft prefix: background right in {(probe(x_test).argmax(1) == y_test).float().mean():.3f}"
          f" of test scenes (chance 0.33)")

# (2) the forced continuation
reward_fn = vlrm_rs_reward(world, policy, tokenizer)
scenes, images = world.scenes["train"][:384], torch.from_numpy(np.array(world.images("train")[:384]))
named, right, gain_sampled, gain_true = [], [], [], []
for i in range(0, len(scenes), 64):
    batch, batch_scenes = images[i:i + 64], scenes[i:i + 64]
    with torch.no_grad():
        feats = policy.vision_model(to_pixels(batch)).last_hidden_state
        greedy = vlrm.greedy_captions(policy, tokenizer, to_pixels(batch), 40)
        sampled = []
        for j, caption in enumerate(greedy):
            rest = continue_from(policy, tokenizer, feats[j:j + 1], caption + " on a", 6)
            said = re.findall("|".join(backgrounds), rest)
            named.append(bool(said))
            right.append(bool(said) and said[0] == batch_scenes[j].background)
            sampled.append(f"{caption} on a {said[0]} background" if said else caption)
        truth = [f"{c} on a {s.background} background" for c, s in zip(greedy, batch_scenes)]
        base = reward_fn(batch, greedy)
        gain_sampled += (reward_fn(batch, sampled) - base).tolist()
        gain_true += (reward_fn(batch, truth) - base).tolist()
print(f"(2) made to go on with ' on a' ({len(scenes)} training scenes; greedy caption e.g. '{greedy[0]}'):")
print(f"    a background named {np.mean(named):.2f}, the right one {np.mean(right):.2f} (chance 0.33)")
print(f"    reward gain over the greedy caption: the sampled background {np.mean(gain_sampled):+.2f}, "
      f"the true one {np.mean(gain_true):+.2f}")
