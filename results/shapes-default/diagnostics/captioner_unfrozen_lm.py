"""The experiment behind world v7 (run on world v6, commit dcb3ffd; v7 builds the OPT's fine-tuning into
the captioner stage): the frozen tiny OPT couples *how often* the captioner names a colour with *how
precisely*. Continue training the world's captioner for 300 steps on its own shallow captions, once
with the OPT trainable and once frozen (the control), and save each. Then sample them with
sampled_rewards.py, or fine-tune one with vlrm.py (the recorded figures used one thread here):

    OMP_NUM_THREADS=1 python results/shapes-default/diagnostics/captioner_unfrozen_lm.py OUT_DIR [--frozen]
    python results/shapes-default/diagnostics/sampled_rewards.py OUT_DIR
    python vlrm.py --steps 1000 --val-every 250 --policy OUT_DIR --run-dir runs/lm-unfrozen-1000
"""
import random
import sys

import numpy as np
import torch

from common import caption_loss  # first: it puts the repository root on sys.path
import shapes
import vlrm

out, frozen = sys.argv[1], "--frozen" in sys.argv[2:]
torch.manual_seed(0)
world = shapes.load_world("default")
policy, processor = vlrm.load_policy(str(world.path("captioner")))
tokenizer, to_pixels = processor.tokenizer, vlrm.processor_normalizer(processor, "cpu")
params = list(vlrm.trainable_parameters(policy).values())
if not frozen:
    params += list(policy.language_model.parameters())
    policy.language_model.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
train, train_images = world.scenes["train"], np.array(world.images("train"))
rng = random.Random(1)
for step in range(300):
    idx = rng.sample(range(len(train)), 128)
    with torch.no_grad():
        feats = policy.vision_model(to_pixels(torch.from_numpy(train_images[idx]))).last_hidden_state
    loss = caption_loss(policy, tokenizer, feats, [shapes.shallow_caption(train[i], rng) for i in idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 99:
        print(f"step {step + 1}: caption loss {loss.item():.3f}")
policy.requires_grad_(False).save_pretrained(out)
processor.save_pretrained(out)
val = torch.from_numpy(np.array(world.images("val")[:200]))
greedy = vlrm.greedy_captions(policy.eval(), tokenizer, to_pixels(val), 40)
print(f"greedy words {np.mean([len(c.split()) for c in greedy]):.2f}, e.g. " + " | ".join(greedy[:3]))
