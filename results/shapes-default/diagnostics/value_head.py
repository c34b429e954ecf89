"""Why does the value head explain so little of the return (explained variance ~0.06 at the end of the
default run)? Two questions, on rollouts of a trained run's policy over training scenes, with returns
computed as vlrm.train computes them (penalties and the KL penalty included):
1. Can a value head on these features do better, given more fitting? The run's own head, then fresh heads
   of the same shape fitted offline for 60 epochs on 3/4 of the rollouts, scored on the other 1/4 (the best
   epoch's score, so it flatters them): on the LM's last hidden state (what vlrm's head reads), and on
   every LM layer's state at once. Also at the EOS position alone, where the caption is written and the
   return is all but fixed. And on the last hidden state beside the reward CLIP's embedding of the image,
   which tells the head what the reward model sees (a critic may read anything of the state).
2. How much of the sequence reward's variance could any critic of the state *before* sampling explain?
   Eight captions for each of 512 scenes: the variance of each scene's mean (between scenes) against the
   mean variance among a scene's own captions (within a scene), which is noise to such a critic.

    python results/shapes-default/diagnostics/value_head.py RUN_DIR [SEED]
    python results/shapes-default/diagnostics/value_head.py runs/shapes-vlrm-rs-seed0
"""
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import vlrm_rs_reward  # first: it puts the repository root on sys.path
import shapes
import vlrm

BATCHES, FIT_EPOCHS, SCENES, CAPTIONS_PER_SCENE = 80, 60, 512, 8
run, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
cfg = vlrm.parse_config(["--run-dir", run])  # the shapes preset's settings, as the run had them
world = shapes.load_world("default")
policy, processor = vlrm.load_policy(str(world.path("captioner")))
base = vlrm.frozen_base(policy)  # the captioner as it started, for the KL penalty
policy.load_state_dict(torch.load(f"{run}/checkpoint/vlrm-trainable.pt"), strict=False)
width = policy.config.text_config.word_embed_proj_dim
run_head = vlrm.ValueHead(width)
run_head.load_state_dict(torch.load(f"{run}/checkpoint/trainer.pt", weights_only=False)["value_head"])
tokenizer, to_pixels = processor.tokenizer, vlrm.processor_normalizer(processor, "cpu")
sequence_reward = vlrm_rs_reward(world, policy, tokenizer)
lm_head = policy.language_model.get_output_embeddings().weight
bad_regex = re.compile(cfg.bad_phrases)
clip, _, _ = vlrm.load_clip(str(world.path("clip")), "cpu")
clip_pixels = vlrm.clip_normalizer(clip, "cpu")
scenes = world.images("train")
torch.manual_seed(seed)  # after the loading, whose model constructors draw from it
rng = np.random.default_rng(seed)


@torch.no_grad()
def sample(images):
    """vlrm.train's rollout -> ViT features, soft prefix, tokens (B, T), mask (B, T), sequence rewards (B,)."""
    image_embeds = policy.vision_model(to_pixels(images)).last_hidden_state
    prefix = vlrm.soft_prefix(policy, image_embeds)
    tokens, mask = vlrm.rollout(policy, prefix, cfg.max_new_tokens)
    captions = [c.strip() for c in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    return image_embeds, prefix, tokens, mask, sequence_reward(images, captions).float()


@torch.no_grad()
def rollouts(images):
    """One batch as vlrm.train's step 1 makes it -> features {name: (N, D)}, returns (N,) and tokens left
    (N,) over the valid caption positions."""
    image_embeds, prefix, tokens, mask, reward = sample(images)
    bad, repeat = vlrm.penalties(tokens, mask, tokenizer, bad_regex, cfg.repeat_ngram)
    embeds = vlrm._prompt(policy, prefix, tokens[:, :-1])  # caption_states' forward, every layer kept
    out = policy.language_model.model(inputs_embeds=embeds, output_hidden_states=True,
                                      attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    layers = [h[:, prefix.shape[1]:] for h in out.hidden_states[1:]]  # each (B, T, H); the last = caption_states
    penalty = (cfg.w_bad * bad + cfg.w_repeat * repeat
               + cfg.kl_coef * vlrm.log_ratio_to_base(base, image_embeds, layers[-1], tokens, mask, lm_head))
    returns = vlrm.returns_to_go(reward, penalty, mask)
    valid = mask.bool()
    left = mask.sum(1, keepdim=True) - torch.arange(tokens.shape[1])  # 1 at the EOS position
    image = F.normalize(clip.encode_image(clip_pixels(images)).float(), dim=-1)  # (B, D), unit length
    image = image[:, None].expand(-1, tokens.shape[1], -1)  # (B, T, D): the same at every position
    features = {"last hidden state (vlrm's head)": layers[-1][valid], "every LM layer": torch.cat(layers, -1)[valid],
                "last hidden state and the CLIP image embedding": torch.cat([layers[-1], image], -1)[valid]}
    return features, returns[valid], left[valid]


# 1. the run's head, and heads fitted offline ------------------------------------------------------
batches = [rollouts(torch.from_numpy(np.array([scenes[i] for i in rng.choice(len(scenes), 32, replace=False)])))
           for _ in range(BATCHES)]
features = {name: torch.cat([b[0][name] for b in batches]) for name in batches[0][0]}
returns, left = torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])
train = torch.cat([torch.full((len(b[1]),), i < BATCHES * 3 // 4) for i, b in enumerate(batches)])
test, eos = ~train, left == 1
returns_train, returns_test = returns[train], returns[test]
held_out, held_out_eos = torch.ones(len(returns_test), dtype=torch.bool), eos[test]  # masks over the held-out rows
print(f"{BATCHES} batches of 32 rollouts, {len(returns)} caption positions; variance of the return {returns.var():.2f}")
with torch.no_grad():
    values = run_head(features["last hidden state (vlrm's head)"])
print(f"the run's value head: explained variance {vlrm.explained_variance(values, returns, test):.3f} on the "
      f"held-out quarter, {vlrm.explained_variance(values, returns, test & eos):.3f} at its EOS positions")
for name, x in features.items():
    torch.manual_seed(0)
    head = vlrm.ValueHead(x.shape[-1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    best = (-np.inf, 0, 0.0)
    x_train, x_test = x[train], x[test]  # selected once, not per minibatch
    for epoch in range(FIT_EPOCHS):
        for j in torch.randperm(len(x_train)).split(256):
            loss = ((head(x_train[j]) - returns_train[j]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            values = head(x_test)
            fit = (vlrm.explained_variance(values, returns_test, held_out), epoch + 1,
                   vlrm.explained_variance(values, returns_test, held_out_eos))
        best = max(best, fit)
    print(f"fresh head on the {name} ({x.shape[-1]} wide), fitted offline: best held-out explained variance "
          f"{best[0]:.3f} (epoch {best[1]}; at EOS {best[2]:.3f})")

# 2. between and within scenes ---------------------------------------------------------------------
idx = rng.choice(len(scenes), SCENES, replace=False)
rewards = torch.zeros(SCENES, CAPTIONS_PER_SCENE)
for start in range(0, SCENES, 32):
    images = torch.from_numpy(np.array([scenes[i] for i in idx[start:start + 32]]))
    for k in range(CAPTIONS_PER_SCENE):
        rewards[start:start + 32, k] = sample(images)[-1]
total, within = rewards.var(), rewards.var(1).mean()
between = rewards.mean(1).var() - within / CAPTIONS_PER_SCENE  # less the noise of an 8-sample mean
print(f"sequence reward over {SCENES} scenes x {CAPTIONS_PER_SCENE} captions: variance {total:.2f}; between scenes "
      f"{between:.2f} ({between / total:.0%}), within a scene {within:.2f} ({within / total:.0%})")
