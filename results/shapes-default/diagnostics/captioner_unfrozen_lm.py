"""A lead for the next world version: the frozen tiny OPT couples *how often* the captioner names a
colour with *how precisely*. Continue training the world's captioner for 300 steps on its own shallow
captions, once with the OPT trainable and once frozen (the control), and save each. Then sample them
with sampled_rewards.py, or fine-tune one with vlrm.py:

    python results/shapes-default/diagnostics/captioner_unfrozen_lm.py OUT_DIR [--frozen]
    python results/shapes-default/diagnostics/sampled_rewards.py OUT_DIR
    python vlrm.py --steps 1000 --val-every 250 --policy OUT_DIR --run-dir runs/lm-unfrozen-1000
"""
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import shapes  # noqa: E402
import vlrm  # noqa: E402

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
    captions = [shapes.shallow_caption(train[i], rng) + tokenizer.eos_token for i in idx]
    enc = tokenizer(captions, padding=True, return_tensors="pt", add_special_tokens=False)
    logits = policy.language_model.lm_head(vlrm.caption_states(policy, feats, enc["input_ids"]))  # (B, T, V)
    mask = enc["attention_mask"].float()
    loss = (F.cross_entropy(logits.transpose(1, 2), enc["input_ids"], reduction="none") * mask).sum() / mask.sum()
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
