"""Why does the tuned policy stop after the main object? For training scenes with two or more objects,
take the policy's greedy caption (the main object), then measure (1) how often sampling would go on
after it instead of ending (1 - P(EOS)), and (2) what it says when made to go on: sample the rest of
"<greedy caption> with a ..." (v10's grammar: "and a ..."), check the first shape and colour it names
against the scene's small objects, and compare the vlrm-rs reward of the longer caption with the
greedy one's.

With --truth, the caption to go on from is the main object's true description ("a blue circle at
bottom left") instead of the greedy one: does the captioner know the small objects in that context?

    python results/shapes-default/diagnostics/second_object.py RUN_DIR/checkpoint/policy [--truth]
"""
import re
import sys

import numpy as np
import torch

from common import continue_from, vlrm_rs_reward  # first: it puts the repository root on sys.path
import shapes
import vlrm

torch.manual_seed(0)
world = shapes.load_world("default")
policy, processor = vlrm.load_policy(sys.argv[1])
tokenizer, to_pixels = processor.tokenizer, vlrm.processor_normalizer(processor, "cpu")
reward_fn = vlrm_rs_reward(world, policy, tokenizer)
eos = policy.config.text_config.eos_token_id
pick = [i for i, s in enumerate(world.scenes["train"][:2048]) if len(s.objects) > 1][:1024]
scenes = [world.scenes["train"][i] for i in pick]
images = torch.from_numpy(np.array(world.images("train")[pick]))
shape_re, colour_re = "|".join(shapes.SHAPES), "|".join(shapes.COLOURS)
go_on, outcome, gain = [], [], []
for i in range(0, len(scenes), 64):
    batch, batch_scenes = images[i:i + 64], scenes[i:i + 64]
    with torch.no_grad():
        feats = policy.vision_model(to_pixels(batch)).last_hidden_state
        greedy = ([shapes.describe(sc, 1, size=False, background=False) for sc in batch_scenes] if "--truth" in sys.argv
                  else vlrm.greedy_captions(policy, tokenizer, to_pixels(batch), 40))
        # (1) P(EOS) right after the greedy caption, by teacher forcing "<caption></s>"
        enc = tokenizer([c + tokenizer.eos_token for c in greedy], padding=True, return_tensors="pt",
                        add_special_tokens=False)
        hidden = vlrm.caption_states(policy, vlrm.soft_prefix(policy, feats), enc["input_ids"])
        logits = policy.language_model.lm_head(hidden)
        last = enc["attention_mask"].sum(1) - 1  # the EOS position
        p_eos = logits[torch.arange(len(greedy)), last].softmax(-1)[:, eos]
        go_on += (1 - p_eos).tolist()
        # (2) sample a continuation of "<caption> and a"
        stems = [shapes.join_objects([c, "a"]) for c in greedy]
        longer = []
        for j in range(len(stems)):
            rest = continue_from(policy, tokenizer, feats[j:j + 1], stems[j], 12)
            first = re.split(r" and |,", rest)[0]
            shape, colour = re.findall(shape_re, first), re.findall(colour_re, first)
            small = batch_scenes[j].objects[1:]
            shape_ok = bool(shape) and any(o.shape == shape[0] for o in small)
            colour_ok = bool(colour) and any(o.colour == colour[0] and (not shape or o.shape == shape[0]) for o in small)
            outcome.append((shape_ok, bool(colour), colour_ok))
            longer.append((stems[j] + rest).strip())
        gain += (reward_fn(batch, longer) - reward_fn(batch, greedy)).tolist()
outcome, gain = np.array(outcome), np.array(gain)
print(f"scenes with 2+ objects: {len(scenes)}; greedy caption e.g. '{greedy[0]}'")
print(f"P(go on after the greedy caption): mean {np.mean(go_on):.4f}, median {np.median(go_on):.4f}")
print(f"forced continuation: small object's shape right {outcome[:, 0].mean():.2f}, a colour named "
      f"{outcome[:, 1].mean():.2f}, colour and shape both right {outcome[:, 2].mean():.2f}")
for name, sel in (("shape right", outcome[:, 0]), ("shape wrong", ~outcome[:, 0]),
                  ("shape and colour right", outcome[:, 2])):
    print(f"reward gain over the greedy caption, {name:23s}: {gain[sel].mean():+.2f} ({sel.sum()} scenes)")
print(f"reward gain, all: {gain.mean():+.2f}")
