"""Can the trainable set (Q-Former, query tokens, projection; ViT and OPT frozen) write captions the judge
retrieves? Teacher-force it on true captions that name every object's colour and shape and the
background, then caption the test scenes greedily. An upper bound for what RL could reach, not RL.

    python results/shapes-default/diagnostics/sft_upper_bound.py [STEPS] [LR]     # defaults 300, 1e-3
"""
import random
import sys

import numpy as np
import torch

from common import caption_loss  # first: it puts the repository root on sys.path
import eval as ev
import shapes
import vlrm

steps, lr = int(sys.argv[1]) if len(sys.argv) > 1 else 300, float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
torch.manual_seed(0)
world = shapes.load_world("default")
policy, processor = vlrm.load_policy(str(world.path("captioner")))
tokenizer, to_pixels = processor.tokenizer, vlrm.processor_normalizer(processor, "cpu")
train, train_images = world.scenes["train"], np.array(world.images("train"))
params = list(vlrm.trainable_parameters(policy).values())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
rng = random.Random(0)
for step in range(steps):
    idx = rng.sample(range(len(train)), 64)
    with torch.no_grad():
        feats = policy.vision_model(to_pixels(torch.from_numpy(train_images[idx]))).last_hidden_state
    loss = caption_loss(policy, tokenizer, feats, [shapes.describe(train[i], size=False, position=False) for i in idx])
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
test, test_images = world.scenes["test"], np.array(world.images("test"))
captions = vlrm.greedy_captions(policy.eval(), tokenizer, to_pixels(torch.from_numpy(test_images)), 60)
judge = ev.ClipJudge(str(world.path("judge_clip")), test_images, "cpu")
r = judge.recall(captions)
print(f"{steps} steps at lr {lr}: judge R@1 {r['t2i/R@1']:.3f}, words {np.mean([len(c.split()) for c in captions]):.1f}, "
      f"hallucination {ev.attribute_metrics(captions, test)['attr/all/hallucination']:.3f}")
print("e.g.", " | ".join(captions[:3]))
