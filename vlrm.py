"""vlrm.py: VLRM ("Vision-Language Models act as Reward Models for Image Captioning", arXiv 2404.01911)
in one readable file.

A captioner (BLIP-2) writes short captions because its training captions were short. VLRM fine-tunes it
with reinforcement learning, and the reward comes from vision-language models that score how well a
caption matches its image (CLIP similarity, the BLIP2-ITM match logit), plus a reference language model
that keeps the text natural and penalties that stop the policy from gaming those scores. No human labels.

Run:
    python vlrm.py --steps 5000                      # the miniature world shipped in world/, CPU
    python vlrm.py --steps 20 --world test           # a smoke run on the tiny test world (first build it, in a
                                                     # minute: python build_world.py --preset test)
    python vlrm.py --steps 5000 --resume             # continue a killed run (same flags) where it stopped
    python vlrm.py --baseline rloo --samples-per-image 4   # a group baseline instead of the critic
    python vlrm.py --preset paper --images DIR       # BLIP-2 OPT-2.7B on a folder of images, one GPU
    torchrun --nproc_per_node=8 vlrm.py --preset paper --images DIR
    python eval.py                                   # evaluate the base captioner and the latest run

Read top to bottom: the config; the method (BLIP-2's pieces, the value head, the rewards, the penalties,
the returns, the baselines and the losses); train(), whose loop is the three steps; then, below one
divider, the machinery (loading, data, torchrun, checkpoints, the command line).

Design choices (what the paper leaves open, and what we chose):
 1. A2C, three steps per iteration: (1) sample captions, returns and A = R - V, (2) fit the value head,
    (3) policy gradient with A. V comes from before step 2: fitted on the very returns it is subtracted
    from, it would depend on the sampled tokens. The value head trains alone for --value-warmup steps.
 2. gamma = 1. The sequence rewards arrive at the last token and penalties where they occur, so every
    token's return holds the whole sequence reward: R(t_k) = sum_j w_j * reward_j - sum_{s >= k} penalty(s),
    penalty = w_bad * bad + w_repeat * repeat (+ the KL charge of choice 8).
 3. Rollouts are pure samples (temperature 1; no top-k/p, min length or n-gram blocking): the update's
    log-probs must belong to the distribution that drew the samples. Repetition is charged by the reward.
 4. Trainable: the Q-Former, the query tokens and the language projection (what the authors released).
    The value head is an MLP on the frozen LM's last hidden state at each caption position (detached):
    the LM already summarises the image and the caption so far.
 5. Log-probs come from the fused kernel in kernels.py, on caption positions only: the (tokens, vocab)
    logits are never materialised.
 6. Advantages are divided by their batch standard deviation and not centred (the baseline centres
    them), so one learning rate serves rewards of any scale.
 7. An entropy bonus, not in the paper (the paper preset has none): a tiny policy's entropy collapses
    onto its first profitable caption before it finds what else the reward pays for.
 8. A penalty on leaving the captioner, not in the paper (off in the paper preset): c * (log pi -
    log pi_base) at every sampled token, pi_base the captioner as it started. The policy then leaves it
    only where the reward pays, and keeps its own guesses where no reward model can see.
 9. The baseline b in A = R - b (--baseline): value, the paper's critic V(s_k); rloo, the mean return of
    the other K - 1 captions of the same image, which removes what the image decides with no critic and
    never sees the caption's own tokens (unbiased); batch, the batch mean, the simplest reference.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, Blip2ForConditionalGeneration,
                          Blip2ForImageTextRetrieval, Blip2Processor, DynamicCache)

import kernels
import shapes


# ----------------------------------------------------------------------------------------------------
# Config: one dataclass, every field documented. Fields left at None are filled in one place,
# resolve_config (below the divider): from PRESETS, REWARDS (the w_* weights) and, in the shapes preset,
# the world's model folders. train(Config()) runs the default.
def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    preset: str = arg("shapes", "shapes: the miniature world (default); paper: BLIP-2 OPT-2.7B, BLIP2-ITM, CLIP")
    world: str = arg("default", "which miniature world (shapes preset): default or test")
    world_root: str = arg(None, "use the worlds built under this folder instead of the shipped one (a world "
                                "missing there is built; the shipped default is in world/)")
    policy: str = arg(None, "captioner to tune: hub id or save_pretrained folder (Blip2ForConditionalGeneration)")
    clip: str = arg(None, "CLIP reward: open_clip 'MODEL/TAG' (e.g. ViT-L-14/openai), 'local-dir:PATH' or a folder")
    itm: str = arg(None, "BLIP2-ITM reward: hub id or folder (Blip2ForImageTextRetrieval)")
    ref_lm: str = arg(None, "reference LM: hub id, folder, or 'policy' to reuse the policy's frozen OPT")
    judge_clip: str = arg(None, "CLIP for validation R@1, never trained against (default: the world's judge; "
                                "--images runs have no held-out set and no validation: use eval.py)")
    images: str = arg(None, "training images (paper preset): a folder, or a text file with one path per line "
                            "(relative to the file's folder)")
    # reward
    reward: str = arg("vlrm-rs", "reward variant: vlrm (ITM-led) or vlrm-rs (retrieval specialised, CLIP-led)")
    w_clip: float = arg(None, "weight of CLIP cosine similarity")
    w_itm: float = arg(None, "weight of the BLIP2-ITM positive logit (before softmax)")
    w_ref: float = arg(None, "weight of the reference LM's mean log-prob of the caption")
    w_bad: float = arg(None, "penalty per bad phrase (filler such as 'an image of', or a year)")
    w_repeat: float = arg(None, "penalty per repeated word n-gram")
    bad_phrases: str = arg("an image of|a picture of|a photo of|a video of|\\b(1[89]|20)\\d\\d\\b",
                           "regex of unwanted phrases, '|'-separated, matched ignoring case; the default ends "
                           "with a year pattern")
    repeat_ngram: int = arg(3, "n of the word n-grams whose repetition is penalised")
    itm_max_length: int = arg(None, "ITM text limit in tokens (LAVIS BLIP2-ITM: 32); longer tails are invisible")
    # optimisation
    steps: int = arg(5000, "training iterations")
    batch_size: int = arg(None, "captions per iteration (per rank under torchrun): images x --samples-per-image")
    samples_per_image: int = arg(1, "captions sampled per image in each rollout (K; --baseline rloo needs 2 or more)")
    baseline: str = arg("value", "what A = R - b subtracts: value (the paper's learned critic), rloo (the other "
                                 "captions of the same image) or batch (the batch mean); design choice 9")
    max_new_tokens: int = arg(None, "caption length limit during rollouts")
    lr: float = arg(3e-4, "actor learning rate (Q-Former, query tokens, projection)")
    value_lr: float = arg(1e-3, "value-head learning rate")
    value_warmup: int = arg(50, "iterations that train only the value head before the first actor update "
                                "(--baseline value; the others have no critic and update from the start)")
    ent_coef: float = arg(None, "entropy bonus (design choice 7)")
    kl_coef: float = arg(None, "penalty per token on log pi - log pi_base, pi_base = the start (design choice 8)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    # machinery
    kernels: str = arg("auto", "log-prob/similarity kernels: auto (Triton on CUDA, or under TRITON_INTERPRET=1), "
                               "torch or triton")
    device: str = arg("auto", "auto, cpu or cuda")
    bf16: bool = arg(None, "run frozen models in bfloat16 (paper preset on GPU)")
    seed: int = arg(0, "seed; ranks use seed + rank for sampling")
    run_dir: str = arg(None, "output folder (default runs/<preset>-<reward>[-<baseline>]-seed<seed>)")
    resume: bool = arg(False, "continue the run in --run-dir from its checkpoint")
    log_every: int = arg(10, "iterations between metrics.jsonl lines")
    val_every: int = arg(250, "iterations between validations (judge R@1 and sample captions; shapes preset)")
    val_size: int = arg(200, "validation images")
    save_every: int = arg(500, "iterations between checkpoints")
    num_workers: int = arg(None, "DataLoader workers decoding images")


PRESETS = {
    "shapes": dict(batch_size=32, max_new_tokens=40, itm_max_length=64, bf16=False, num_workers=0, ent_coef=0.05,
                   kl_coef=0.05),
    "paper": dict(policy="Salesforce/blip2-opt-2.7b", itm="Salesforce/blip2-itm-vit-g", ref_lm="facebook/opt-2.7b",
                  clip="ViT-L-14/openai", batch_size=16, max_new_tokens=60, itm_max_length=32, bf16=True,
                  num_workers=8, ent_coef=0.0, kl_coef=0.0),
}
# Reward variants. vlrm-rs leans on CLIP (the retrieval-specialised model of the paper); vlrm on ITM.
# The paper publishes no weights, learning rates or batch sizes: every value here is ours. Cosine
# similarities move by ~0.1 between a poor and a good caption, ITM logits by ~5: hence the scales.
REWARDS = {
    "vlrm": dict(w_clip=0.0, w_itm=1.0, w_ref=0.3, w_bad=2.0, w_repeat=1.0),
    "vlrm-rs": dict(w_clip=20.0, w_itm=0.3, w_ref=0.3, w_bad=2.0, w_repeat=1.0),
}
BASELINES = ("value", "rloo", "batch")


# ----------------------------------------------------------------------------------------------------
# The method, 1: BLIP-2's pieces. The image becomes a soft prompt; captions are sampled after it, and
# teacher-forced through it again for the update.
def soft_prefix(policy: Blip2ForConditionalGeneration, image_embeds: torch.Tensor) -> torch.Tensor:
    """BLIP-2's bridge: ViT features (B, 1 + P, W) -> Q-Former on the query tokens -> projection ->
    soft prompt (B, Q, H_lm) for the frozen LM. The same computation as `get_image_features` after its ViT
    step; the ViT runs once per batch outside, since it is frozen."""
    query = policy.query_tokens.expand(image_embeds.shape[0], -1, -1)
    out = policy.qformer(query_embeds=query, encoder_hidden_states=image_embeds.float()).last_hidden_state
    return policy.language_projection(out).to(policy.language_model.dtype)


def _prompt(policy, prefix: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """LM input embeddings: [soft prefix (Q), BOS, tokens...] -> (B, Q + 1 + T, H)."""
    bos = torch.full((prefix.shape[0], 1), policy.config.text_config.bos_token_id, device=prefix.device)
    ids = bos if tokens is None else torch.cat([bos, tokens], 1)
    return torch.cat([prefix, policy.get_input_embeddings()(ids)], 1)


@torch.no_grad()
def rollout(policy, prefix: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure sampling after the soft prefix (B, Q, H) -> tokens (B, T) and mask (B, T): 1 up to and
    including EOS. Written out instead of calling generate(), so that nothing can warp the distribution
    (design choice 3), and because generate's per-token bookkeeping costs more than the miniature world's
    LM itself. Draws the very tokens of generate(do_sample=True) under the same seed (tested)."""
    lm, text_cfg = policy.language_model, policy.config.text_config
    cache = DynamicCache(config=lm.config)  # keys and values of the positions so far: one new token per call
    # no attention mask: prompts are never padded, so causal attention is all there is
    logits = lm(inputs_embeds=_prompt(policy, prefix.detach()), past_key_values=cache, logits_to_keep=1).logits
    finished = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
    tokens = []
    for _ in range(max_new_tokens):
        token = torch.multinomial(logits[:, -1].float().softmax(-1), 1)[:, 0]  # (B,) drawn from pi itself
        token = token.masked_fill(finished, text_cfg.pad_token_id)  # finished captions only pad
        tokens.append(token)
        finished |= token == text_cfg.eos_token_id
        if finished.all() or len(tokens) == max_new_tokens:
            break
        logits = lm(input_ids=token[:, None], past_key_values=cache).logits  # (B, 1, V)
    tokens = torch.stack(tokens, 1)
    is_eos = tokens == text_cfg.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return tokens, (~after_eos).float()


def caption_states(policy, prefix, tokens) -> torch.Tensor:
    """Teacher-forced forward: soft prefix (B, Q, H) and (B, T) sampled tokens -> LM final hidden states
    (B, T, H) at the positions that *predict* each token (position Q + k holds BOS or token k-1 and predicts
    token k). Gradients flow through the frozen LM into the prefix's Q-Former. Reproduces the sampler's
    distribution (tested)."""
    embeds = _prompt(policy, prefix, tokens[:, :-1])
    # all-ones mask: tokens after EOS only ever see earlier ones (causal), and are masked in every loss
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    hidden = policy.language_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return hidden[:, prefix.shape[1]:]


def frozen_base(policy: Blip2ForConditionalGeneration) -> Blip2ForConditionalGeneration:
    """The policy as it is now, frozen, for the KL penalty: its trainable modules are copied, its frozen
    ViT and LM shared (deepcopy's memo maps them to themselves), so OPT-2.7B is not held twice."""
    shared = {id(m): m for m in (policy.vision_model, policy.language_model)}
    return copy.deepcopy(policy, shared).requires_grad_(False)


@torch.no_grad()
def sampled_logprobs(model, image_embeds, tokens, valid, lm_head) -> torch.Tensor:
    """log model(t_k) of the sampled tokens at the valid positions (N,), from ViT features, without grad."""
    hidden = caption_states(model, soft_prefix(model, image_embeds), tokens)
    return kernels.fused_logprob(hidden[valid], lm_head, tokens[valid])


@torch.no_grad()
def log_ratio_to_base(base, image_embeds, tokens, mask, logp, lm_head) -> torch.Tensor:
    """log pi(t_k) - log pi_base(t_k) at each sampled token -> (B, T), 0 after EOS. Its sum over a caption
    is a one-sample estimate of KL(pi || pi_base); logp (N,) is the policy's log pi of the valid tokens."""
    valid = mask.bool()
    out = torch.zeros_like(mask)
    out[valid] = logp.detach() - sampled_logprobs(base, image_embeds, tokens, valid, lm_head)
    return out


def trainable_parameters(policy) -> dict[str, nn.Parameter]:
    """What VLRM updates and what the authors released: Q-Former, query tokens, language projection."""
    return {n: p for n, p in policy.named_parameters()
            if n == "query_tokens" or n.startswith(("qformer.", "language_projection."))}


class ValueHead(nn.Module):
    """V(s_k): LM hidden state (.., H) at the position that predicts token k -> expected return (..)."""

    def __init__(self, hidden: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, h):
        return self.net(h.float()).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# The method, 2: rewards. Each *_reward(spec, ...) loads its model once and returns a plain function
# reward(images uint8 (B, S, S, 3), captions list[str]) -> (B,): one score per (image, caption) pair.
# A new reward is one more such function, a w_* weight in Config and REWARDS, a field for its model (and
# its default in PRESETS), and an entry in train()'s `weights` and `rewards`.
def clip_reward(spec: str, device):
    """Cosine similarity of CLIP's image and text embeddings."""
    model, tokenizer, _ = load_clip(spec, device)
    to_pixels = clip_normalizer(model, device)

    @torch.no_grad()
    def reward(images, captions):
        img = model.encode_image(to_pixels(images))
        txt = model.encode_text(tokenizer(captions).to(device))
        return kernels.pair_similarity(img.float(), txt.float())  # (B,) cosine of image i and caption i
    reward.recall = lambda images, captions: clip_recall(model, tokenizer, to_pixels, images, captions)  # validation
    reward.limit = model.context_length  # longer captions are cut: their tails are invisible to the reward
    reward.token_counts = clip_token_counts(tokenizer)
    return reward


def itm_reward(spec: str, max_length: int, device, dtype):
    """BLIP2-ITM: the positive logit of the image-text matching head, before softmax."""
    model = _load(Blip2ForImageTextRetrieval, spec, dtype=dtype).to(device).eval().requires_grad_(False)
    processor = _load(Blip2Processor, spec)
    tokenizer, to_pixels = processor.tokenizer, processor_normalizer(processor, device)

    def reward(images, captions):
        return itm_score(model, tokenizer, to_pixels(images).to(dtype), captions, max_length)
    reward.limit = max_length
    reward.token_counts = lambda captions: [len(ids) for ids in tokenizer(captions)["input_ids"]]
    return reward


def ref_lm_reward(spec: str, policy, policy_tokenizer, device, dtype):
    """Mean log-prob of the caption (and its EOS) under a text-only reference LM: keeps language natural."""
    if spec == "policy":  # BLIP-2's OPT *is* the frozen OPT-2.7B: reuse it and save 5 GB
        lm, tokenizer = policy.language_model, policy_tokenizer
    else:
        lm = _load(AutoModelForCausalLM, spec, dtype=dtype).to(device).eval().requires_grad_(False)
        tokenizer = _load(AutoTokenizer, spec)
    return lambda images, captions: ref_lm_score(lm, tokenizer, captions)


@torch.no_grad()
def itm_score(model, tokenizer, pixels, captions, max_length: int) -> torch.Tensor:
    """The ITM head's match logit (B,) of pixels (B, 3, S, S) and captions; text cut at max_length tokens."""
    enc = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = model(pixel_values=pixels, input_ids=enc["input_ids"].to(pixels.device),
                attention_mask=enc["attention_mask"].to(pixels.device), use_image_text_matching_head=True)
    return out.logits_per_image[:, 1].float()


@torch.no_grad()
def ref_lm_score(lm, tokenizer, captions) -> torch.Tensor:
    """Mean log-prob (B,) of each caption and its EOS under a causal LM."""
    enc = tokenizer([c + tokenizer.eos_token for c in captions], padding=True, padding_side="right",
                    return_tensors="pt").to(lm.device)  # right: position 0 of every row is BOS
    logits = lm(**enc).logits[:, :-1].float()
    ids, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].float()
    logp = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    return (logp * mask).sum(1) / mask.sum(1)


# ----------------------------------------------------------------------------------------------------
# The method, 3: penalties, returns, baselines and the losses of steps 2 and 3. Sums over torchrun's
# ranks are the `total` argument (all_sum in train(); the identity in one process), so that the figures
# are those of the combined batch.
WORD = re.compile(r"[^\W_]+")  # what a word is: a run of letters or digits, any script ("Cat's": cat, s)


def words(text: str) -> list[str]:
    """A text's words, lower-cased: what the repetition penalty counts, and every text metric of eval.py."""
    return [w.lower() for w in WORD.findall(text)]


def bad_phrase_regex(pattern: str) -> re.Pattern:
    """--bad-phrases, compiled to match whatever the case: "An image of" is as bad as "an image of"."""
    return re.compile(pattern, re.IGNORECASE)


def penalty_ends(text: str, bad_regex: re.Pattern, ngram: int) -> tuple[list[int], list[int]]:
    """Where a caption's penalties fall, as character offsets: the end of each unwanted phrase, and the end
    of each word n-gram that already occurred in it. eval.py's bad-phrase and repetition rates count these."""
    found = [(w.group().lower(), w.end()) for w in WORD.finditer(text)]
    seen, repeat_ends = set(), []
    for i in range(ngram - 1, len(found)):
        gram = tuple(w for w, _ in found[i - ngram + 1: i + 1])
        if gram in seen:
            repeat_ends.append(found[i][1])
        seen.add(gram)
    return [m.end() for m in bad_regex.finditer(text)], repeat_ends


def penalties(tokens, mask, tokenizer, bad_regex: re.Pattern, ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position penalties (B, T): bad[b, s] = number of unwanted phrases that end at token s;
    repeat[b, s] = 1 where token s completes a word n-gram that already occurred in the caption."""
    B, T = tokens.shape
    bad, repeat = torch.zeros(B, T), torch.zeros(B, T)
    ids = [row[:int(n)] for row, n in zip(tokens.cpu().tolist(), mask.sum(1).tolist())]  # valid tokens only
    vocab = sorted({i for row in ids for i in row})  # each distinct token is decoded once
    piece = dict(zip(vocab, tokenizer.batch_decode([[i] for i in vocab])))
    piece[tokenizer.eos_token_id] = ""
    for b in range(B):
        texts = [piece[i] for i in ids[b]]
        ends = np.cumsum([len(t) for t in texts])  # char offset just after token s
        bad_ends, repeat_ends = penalty_ends("".join(texts), bad_regex, ngram)
        for end in bad_ends:
            bad[b, int(np.searchsorted(ends, end))] += 1
        for end in repeat_ends:  # the token that completes the word
            repeat[b, int(np.searchsorted(ends, end))] = 1.0
    return bad, repeat


def returns_to_go(sequence_reward, penalty, mask) -> torch.Tensor:
    """gamma = 1: R(t_k) = sequence reward - sum_{s >= k} penalty(s), on valid positions. (B,), (B, T) -> (B, T)"""
    penalty = penalty * mask
    to_go = penalty.flip(1).cumsum(1).flip(1)  # sum over s >= k
    return (sequence_reward[:, None] - to_go) * mask


def leave_one_out_baseline(returns, mask, k: int) -> torch.Tensor:
    """--baseline rloo: rows i*k .. i*k + k - 1 are the k captions of image i. Caption j's baseline, at
    every token, is the mean whole-caption return R(t_1) of the image's other k - 1 captions. (B, T) -> (B, T)"""
    first = returns[:, 0].view(-1, k)  # (images, k): column 0 is R(t_1), the return of the whole caption
    others = (first.sum(1, keepdim=True) - first) / (k - 1)
    return others.reshape(-1, 1) * mask


def batch_baseline(returns, mask, total=lambda x: x) -> torch.Tensor:
    """--baseline batch: the mean whole-caption return R(t_1) over the batch, at every token. (B, T) -> (B, T)"""
    first = returns[:, 0]  # R(t_1)
    return total(first.sum()) / total(torch.tensor(float(len(first)), device=first.device)) * mask


def scaled_advantages(returns, baseline, mask, total=lambda x: x) -> torch.Tensor:
    """A_k = R(t_k) - b_k, divided by the standard deviation of A over the valid tokens (design choice 6).
    The baseline (B, T) is constant to the update: V detached, or other captions' returns."""
    advantages = (returns - baseline) * mask
    n = total(mask.sum()).clamp(min=1)
    mean = total(advantages.sum()) / n
    std = torch.sqrt(total(((advantages - mean) ** 2 * mask).sum()) / n + 1e-8)
    return advantages / std  # scaled, not centred


def critic_loss(values, returns, mask, n_valid) -> torch.Tensor:
    """Step 2: regress V(s_k) (B, T) on the return R(t_k), squared error per valid token. n_valid: the
    valid tokens of the whole batch, so that the ranks' losses add up to the combined batch's."""
    return ((values - returns) ** 2 * mask).sum() / n_valid


def actor_loss(logp, entropy, advantages, ent_coef: float, n_valid) -> dict:
    """Step 3: the policy gradient -A_k log pi(t_k), minus the entropy bonus, per valid token. logp and
    entropy (N,) of the valid tokens carry the graph into the Q-Former; advantages (N,).
    -> {"loss": what step 3 backpropagates, "policy": -A log pi alone, "entropy": the mean entropy}"""
    policy_loss = -(advantages * logp).sum() / n_valid  # raise log pi(t_k) where A_k > 0
    entropy_mean = entropy.sum() / n_valid
    return {"loss": policy_loss - ent_coef * entropy_mean, "policy": policy_loss, "entropy": entropy_mean}


def explained_variance(baseline, returns, mask) -> float:
    """1 - Var(R - b) / Var(R) over valid tokens: how much of the return the baseline foresaw. 1: all of
    it; 0: no better than a constant (--baseline batch is a constant: 0 by construction). Logged for
    every --baseline as charts/explained_variance, on rank 0's batch under torchrun."""
    m = mask.bool()
    var_r = returns[m].var()
    return float(1 - (returns[m] - baseline[m]).var() / var_r) if var_r > 0 else float("nan")


@torch.no_grad()
def approx_kl(policy, image_embeds, tokens, valid, logp_before, lm_head) -> float:
    """How far this update moved the policy on its own samples: E[(r - 1) - log r], r = pi_new / pi_old."""
    log_ratio = sampled_logprobs(policy, image_embeds, tokens, valid, lm_head) - logp_before  # updated policy
    return float((log_ratio.exp() - 1 - log_ratio).mean())


# ----------------------------------------------------------------------------------------------------
# Training: load everything, then the loop of three steps.
def train(cfg: Config) -> Path:
    cfg = resolve_config(cfg)  # every field filled: presets, reward weights, the world's models, run_dir
    rank, world_size, device, own_group = init_distributed(cfg)
    main_rank, run_dir = rank == 0, Path(cfg.run_dir)
    dtype = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else torch.float32
    ckpt = checkpoint_to_resume(cfg, run_dir, main_rank)
    world = load_world(cfg.world, cfg.world_root) if cfg.preset == "shapes" else None  # training, validation images
    if main_rank:  # the resolved config, every field filled; it is saved with every checkpoint
        print(json.dumps(dataclasses.asdict(cfg), indent=1))

    # the policy, the frozen models it is measured against, and the critic
    torch.manual_seed(cfg.seed)
    # in eval mode throughout: no dropout, so that rollout and update see one distribution
    policy, processor = load_policy(cfg.policy, dtype=dtype, device=device)
    base = frozen_base(policy) if cfg.kl_coef else None  # pi_base of design choice 8, before a checkpoint loads
    params = trainable_parameters(policy)
    policy.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    tokenizer, to_pixels = processor.tokenizer, processor_normalizer(processor, device)
    lm_head = policy.language_model.get_output_embeddings().weight  # (V, H), frozen
    weights = {"clip": cfg.w_clip, "itm": cfg.w_itm, "ref": cfg.w_ref}
    rewards = {}  # only the models with a non-zero weight are loaded
    if cfg.w_clip:
        rewards["clip"] = clip_reward(cfg.clip, device)
    if cfg.w_itm:
        rewards["itm"] = itm_reward(cfg.itm, cfg.itm_max_length, device, dtype)
    if cfg.w_ref:
        rewards["ref"] = ref_lm_reward(cfg.ref_lm, policy, tokenizer, device, dtype)
    bad_regex = bad_phrase_regex(cfg.bad_phrases)
    actor_opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    value_head, critic_opt, first_actor_step = None, None, 0  # rloo and batch: no critic, nothing to warm up
    if cfg.baseline == "value":  # caption states come out of OPT's project_out: word_embed_proj_dim wide
        value_head = ValueHead(policy.config.text_config.word_embed_proj_dim).to(device)
        critic_opt = torch.optim.AdamW(value_head.parameters(), lr=cfg.value_lr, weight_decay=0.0)
        first_actor_step = cfg.value_warmup
    start, skipped_images, rng = 0, 0, None
    if ckpt is not None:
        start, skipped_images, rng = resume(ckpt, cfg, policy, value_head, actor_opt, critic_opt, world_size, main_rank)
    loader, val_images = make_loader(cfg, world, processor, start, rank, world_size)
    judge = load_judge(cfg.judge_clip, device) if main_rank and val_images is not None else None
    # validation R@1 of the judge and of the reward CLIP, if there is one: a gap between them is over-optimisation
    recalls = {"judge": judge, **({"reward": rewards["clip"].recall} if "clip" in rewards else {})}
    # everything is loaded: from here on the RNG drives only sampling, so a resumed run matches an unbroken one
    if rng is not None:
        set_rng_state(rng[rank])
    else:
        torch.manual_seed(cfg.seed + rank)  # ranks draw different samples

    K = cfg.samples_per_image
    stop = StopRequest()  # Ctrl-C / SIGTERM: finish the step, save, exit; a second one stops at once
    bar = tqdm(total=cfg.steps, initial=start, disable=not main_rank, desc="vlrm", dynamic_ncols=True)
    t_last, iterations = time.time(), 0
    for step, (images, n_unreadable) in enumerate(loader, start + 1):  # steps count from 1
        skipped_images += n_unreadable
        iterations += 1
        if any_rank(images is None):  # every file of a batch unreadable, on some rank: no update anywhere
            tqdm.write(f"[warn] step {step}: no readable image in the batch ({n_unreadable} files); step skipped")
        else:
            images = images.repeat_interleave(K, 0)  # (B, S, S, 3) uint8: each image K times, in a row
            with torch.no_grad():
                image_embeds = policy.vision_model(to_pixels(images).to(dtype)).last_hidden_state  # frozen ViT, once

            # step 1: rollout, returns and the advantage ---------------------------------------------
            update_actor = step > first_actor_step  # the critic's warm-up builds no actor graph
            with torch.set_grad_enabled(update_actor):  # step 3 backpropagates into the prefix
                prefix = soft_prefix(policy, image_embeds)  # (B, Q, H)
            tokens, mask = rollout(policy, prefix, cfg.max_new_tokens)  # (B, T) each; reads the prefix detached
            captions = [c.strip() for c in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
            parts = {name: fn(images, captions).float().cpu() for name, fn in rewards.items()}  # each (B,)
            sequence_reward = sum(weights[name] * r for name, r in parts.items())  # (B,)
            bad, repeat = penalties(tokens.cpu(), mask.cpu(), tokenizer, bad_regex, cfg.repeat_ngram)  # (B, T) each
            penalty = cfg.w_bad * bad + cfg.w_repeat * repeat
            with torch.set_grad_enabled(update_actor):
                hidden = caption_states(policy, prefix, tokens)  # (B, T, H), grad into the Q-Former
                valid = mask.bool()
                # log pi(t_k) and the entropy (N,) at the valid tokens, once: the KL charge and step 3 use them
                logp, entropy = kernels.fused_logprob(hidden[valid], lm_head, tokens[valid], with_entropy=True)
            if base is not None:  # design choice 8
                log_ratio = log_ratio_to_base(base, image_embeds, tokens, mask, logp, lm_head).cpu()  # (B, T)
                penalty = penalty + cfg.kl_coef * log_ratio
            returns = returns_to_go(sequence_reward, penalty, mask.cpu()).to(device)  # R(t_k) (B, T)
            values = value_head(hidden.detach()) if value_head is not None else None  # V(s_k), before step 2
            if cfg.baseline == "value":
                baseline = values.detach()
            elif cfg.baseline == "rloo":
                baseline = leave_one_out_baseline(returns, mask, K)
            else:
                baseline = batch_baseline(returns, mask, all_sum)
            advantages = scaled_advantages(returns, baseline, mask, all_sum)  # (B, T)
            n_valid = all_sum(mask.sum()).clamp(min=1)  # valid tokens of the combined batch
            finite = not any_rank(not torch.isfinite(advantages).all()
                                  or (values is not None and not torch.isfinite(values).all()))
            if not finite:  # it never reaches the weights
                tqdm.write(f"[warn] step {step}: non-finite reward or value; no update "
                           f"({ {k: v.tolist() for k, v in parts.items()} })")

            # step 2: the critic's loss and update --------------------------------------------------
            if value_head is not None and finite:
                value_loss = critic_loss(values, returns, mask, n_valid)
                critic_opt.zero_grad(set_to_none=True)
                value_loss.backward()
                sync_gradients(list(value_head.parameters()))
                nn.utils.clip_grad_norm_(value_head.parameters(), cfg.max_grad_norm)
                critic_opt.step()

            # step 3: the actor's loss and update (after the critic's warm-up) ----------------------
            actor = actor_loss(logp, entropy, advantages[valid], cfg.ent_coef, n_valid)
            if update_actor and finite:
                actor_opt.zero_grad(set_to_none=True)
                actor["loss"].backward()
                sync_gradients(list(params.values()))
                grad_norm = nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
                if torch.isfinite(grad_norm):
                    actor_opt.step()
                else:
                    tqdm.write(f"[warn] step {step}: non-finite gradient; actor step skipped")

            # logging: the glossary of every key is in README.md ------------------------------------
            caption_len = mean_words(captions)
            bar.set_postfix(reward=f"{sequence_reward.mean():.3f}", words=f"{caption_len:.1f}")
            if finite and (step % cfg.log_every == 0 or step == cfg.steps):
                metrics = {"step": step, "reward/sequence": float(sequence_reward.mean()),
                           **{f"reward/{k}": float(v.mean()) for k, v in parts.items()},
                           "penalty/bad": float(bad.sum(1).mean()), "penalty/repeat": float(repeat.sum(1).mean()),
                           **({"penalty/kl": float(log_ratio.sum(1).mean())} if base is not None else {}),
                           "charts/return": float(returns[:, 0].mean()),
                           **({"losses/value": all_sum(value_loss.detach()).item()} if value_head is not None else {}),
                           "losses/policy": all_sum(actor["policy"].detach()).item(),
                           "charts/entropy": all_sum(actor["entropy"].detach()).item(),
                           "charts/caption_len": caption_len,
                           "charts/caption_tokens": float(mask.sum(1).mean()),
                           "charts/explained_variance": explained_variance(baseline, returns, mask),
                           "charts/approx_kl": approx_kl(policy, image_embeds, tokens, valid, logp.detach(), lm_head),
                           "charts/skipped_images": skipped_images,
                           "perf/steps_per_s": iterations / (time.time() - t_last)}
                if device.type == "cuda":  # peak since the start, weights included
                    metrics["perf/gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                for name in ("clip", "itm"):
                    if name in rewards and rewards[name].token_counts:
                        metrics[f"charts/{name}_truncated"] = truncated_share(rewards[name].token_counts,
                                                                              rewards[name].limit, captions)
                t_last, iterations = time.time(), 0
                if main_rank:
                    append_metrics(run_dir, metrics)

        # validation, checkpoint, stop: every step, updated or skipped ----------------------------------
        bar.update()
        if judge is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            val, val_captions = validate(policy, tokenizer, to_pixels, val_images, recalls, cfg.max_new_tokens)
            append_metrics(run_dir, {"step": step, **val})
            shown = "  ".join(f"{name} R@1 {val[f'val/{name}_r1']:.3f}" for name in recalls)
            tqdm.write(f"[val] step {step}: {shown}  e.g. " + " | ".join(val_captions[:3]))
        stopping = any_rank(stop.requested)  # one answer for all ranks: a signal reaches them at different times
        if step % cfg.save_every == 0 or step == cfg.steps or stopping:
            save_run(run_dir, cfg, step, policy, processor, value_head, actor_opt, critic_opt, skipped_images,
                     [*params.values(), *(value_head.parameters() if value_head else [])], world_size, main_rank)
        if stopping:
            if main_rank:
                tqdm.write(f"interrupted: checkpoint saved at step {step}; continue with --resume --run-dir {run_dir}")
            break
    bar.close()
    stop.restore()
    if dist.is_initialized():
        dist.barrier()
    if own_group:
        dist.destroy_process_group()
    return run_dir


# ====================================================================================================
# The machinery: loading, data, torchrun, checkpoints, validation and the command line. Nothing below
# is VLRM; it is what makes the loop above run on one CPU, on eight GPUs, and after a kill.
# ====================================================================================================
class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Loading: every model by hub id or local path, with an error that says what to do when it fails.
def _load(cls, spec: str, **kwargs):
    try:
        return cls.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UsageError(
            f"cannot load {cls.__name__} from {spec!r}{' (HF_HUB_OFFLINE=1)' if offline else ''}.\n"
            f"  Pass a local folder instead, e.g. one written by save_pretrained, or fetch it where there is a "
            f"network:\n    hf download {spec} --local-dir ./models/{spec.split('/')[-1]}\n"
            f"  then pass that folder. ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_policy(spec: str, trainable_state: str | None = None, dtype=torch.float32, device="cpu"):
    """BLIP-2 captioner and its processor. `trainable_state` optionally names a trainable-only state dict
    in the authors' format (e.g. vlrm-blip2-opt-2.7b.pt), loaded on top with strict=False as they do."""
    policy = _load(Blip2ForConditionalGeneration, spec, dtype=dtype)
    processor = _load(Blip2Processor, spec)
    if trainable_state is not None:
        try:
            state = torch.load(trainable_state, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise UsageError(f"cannot read trainable state dict {trainable_state!r}: {e}") from None
        unexpected = policy.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise UsageError(f"{trainable_state!r} has keys that are not in the policy, e.g. {unexpected[:3]}")
    for p in trainable_parameters(policy).values():  # fp32 master weights, whatever the frozen parts' dtype
        p.data = p.data.float()
    if dtype != torch.float32:  # generate() hands the fp32 projection the ViT's dtype, and its output to the LM
        lm_dtype = policy.language_model.dtype
        policy.language_projection.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype),))
        policy.language_projection.register_forward_hook(lambda m, args, out: out.to(lm_dtype))
    return policy.to(device).eval(), processor


def load_clip(spec: str, device="cpu"):
    """open_clip model + tokenizer from 'MODEL/TAG', 'local-dir:PATH' or a plain folder."""
    if os.path.isdir(spec):
        spec = f"local-dir:{spec}"
    name, _, tag = (spec, "", None) if spec.startswith(("local-dir:", "hf-hub:")) else spec.partition("/")
    if tag == "":  # open_clip would build the architecture with random weights, silently
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
        raise UsageError(f"CLIP {spec!r} names no weights: give 'MODEL/TAG' (tags of {name}: {tags}), "
                         f"'local-dir:PATH' or a folder")
    # open_clip 3 only warns when weights trained with QuickGELU (OpenAI's) are put in a GELU model: ask for it
    quick_gelu = bool(tag) and bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag or None,
                                                                     force_quick_gelu=quick_gelu)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/ValueError/hub errors
        raise UsageError(f"cannot load CLIP {spec!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}\n"
                         f"  Pass 'local-dir:PATH' (open_clip_config.json + weights) or a folder, or "
                         f"'MODEL/TAG' from open_clip.list_pretrained() where the hub is reachable.") from None
    return model.to(device).eval().requires_grad_(False), tokenizer, preprocess


def clip_token_counts(tokenizer):
    """captions -> tokens of each, CLIP's start/end included; None for the tokenizers that cannot count
    (open_clip's HF-hub ones), whose truncated share is then not reported."""
    if not hasattr(tokenizer, "encode"):
        return None
    return lambda captions: [len(tokenizer.encode(c)) + 2 for c in captions]


def normalizer(mean, std, size: int, device):
    """uint8 images (B, H, W, 3) -> float (B, 3, size, size), resized and normalised for one model."""
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def to_pixels(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - mean) / std
    return to_pixels


def processor_normalizer(processor, device):
    ip = processor.image_processor
    return normalizer(ip.image_mean, ip.image_std, ip.size["height"], device)


def clip_normalizer(model, device):
    """The normaliser of an open_clip model (OpenAI's statistics where the model names none)."""
    v = model.visual
    return normalizer(v.image_mean or open_clip.OPENAI_DATASET_MEAN, v.image_std or open_clip.OPENAI_DATASET_STD,
                      v.image_size[0], device)


@functools.cache  # checked once per process: resolve_config wants its model folders, train() its images
def load_world(name: str, root: str | None = None) -> shapes.World:
    """The miniature world `name` (--world, --world-root), or a UsageError that says how to build it."""
    try:
        return shapes.load_world(name, root=root)
    except shapes.WorldUnavailable as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# Data: the world's training scenes, or any folder of images; index order is a function of the step.
class ImageFiles(torch.utils.data.Dataset):
    """Images from a folder (recursively) or a list file, decoded to uint8 (size, size, 3); an unreadable
    file yields None, which the collate function drops and counts."""
    EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, source: str, size: int):
        p = Path(source)
        if p.is_dir():
            self.files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in self.EXT)
        elif p.is_file():  # relative paths start from the list file's folder, wherever the run starts
            self.files = [str(p.parent / line.strip()) for line in p.read_text().splitlines() if line.strip()]
            missing = [f for f in self.files if not os.path.isfile(f)]
            if missing:
                raise UsageError(f"--images {source!r} lists {len(missing)} files that do not exist, e.g. "
                                 f"{missing[0]!r}; relative paths are read from the list file's folder")
        else:
            raise UsageError(f"--images {source!r} is neither a folder nor a list file")
        if not self.files:
            raise UsageError(f"--images {source!r} holds no images ({', '.join(self.EXT)})")
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return torch.from_numpy(center_square(Image.open(self.files[i]), self.size))
        except Exception:  # any decoding problem: skip this file, never stop the run
            return None


def center_square(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), then the centre crop: CLIP's preprocessing, once, at decode time.
    -> uint8 (size, size, 3)."""
    img = img.convert("RGB")
    s = size / min(img.size)
    img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


class WorldImages(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i]))


def collate(items):
    kept = [x for x in items if x is not None]
    return (torch.stack(kept) if kept else None), len(items) - len(kept)


class StepSampler(torch.utils.data.Sampler):
    """Yields the index batch of every step from `start` on: a fixed permutation per epoch, rank r taking
    its own slice. Resuming at step k reproduces the batches an uninterrupted run would have drawn."""

    def __init__(self, n, batch_size, start, steps, seed, rank=0, world_size=1):
        self.n, self.bs, self.start, self.steps, self.seed = n, batch_size, start, steps, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        per_step, perm_epoch, perm = self.bs * self.world_size, None, None
        for step in range(self.start, self.steps):
            first = step * per_step + self.rank * self.bs
            idx = []
            for j in range(first, first + self.bs):
                epoch, pos = divmod(j, self.n)
                if epoch != perm_epoch:  # drawn once per epoch: a million images take ~0.2 s to permute
                    gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                    perm_epoch, perm = epoch, torch.randperm(self.n, generator=gen)
                idx.append(int(perm[pos]))
            yield idx


def make_loader(cfg: Config, world, processor, start: int, rank: int, world_size: int):
    """-> (the loader of each step's images from `start` on, images per step = batch_size / K per rank;
    the validation images (N, S, S, 3) uint8, or None without a world)."""
    if world is not None:
        dataset = WorldImages(world.images("train"))
        val_images = np.array(world.images("val")[:cfg.val_size])
    else:
        dataset, val_images = ImageFiles(cfg.images, processor.image_processor.size["height"]), None
    sampler = StepSampler(len(dataset), cfg.batch_size // cfg.samples_per_image, start, cfg.steps, cfg.seed, rank,
                          world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=collate, generator=torch.Generator())  # global RNG untouched
    return loader, val_images


# ----------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): data parallel by hand. Losses are divided by the *global* count of valid
# tokens and gradients summed over ranks: exactly the combined batch's gradient (DDP averages per-rank
# gradients, which matches it only when every rank holds as many valid tokens).
def init_distributed(cfg: Config) -> tuple[int, int, torch.device, bool]:
    """-> (rank, world size, this rank's device, whether the process group is ours to close). Also checks
    --device and --kernels against what this machine has."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    own_group = world_size > 1 and not dist.is_initialized()  # torchrun: ours to open, and to close
    if own_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cfg.device in ("auto", "cuda") and torch.cuda.is_available()
                          else "cpu")
    if cfg.device == "cuda" and device.type != "cuda":
        raise UsageError("--device cuda, but torch sees no GPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:  # kernels.py's own rule, asked now rather than at the first kernel call, after every model loaded
        kernels._use_triton(cfg.kernels, torch.empty(0, device=device))
    except RuntimeError as e:
        raise UsageError(f"--kernels {cfg.kernels}: {e}; use --kernels auto") from None
    kernels.set_backend(cfg.kernels)
    return rank, world_size, device, own_group


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks; itself in a single process. NCCL reduces on the GPU."""
    if not dist.is_initialized():
        return x
    y = x.detach().to("cuda" if dist.get_backend() == "nccl" else x.device).clone()
    dist.all_reduce(y)
    return y.to(x.device)


def any_rank(flag: bool) -> bool:
    """True if the flag is set on any rank: ranks must take every branch around a collective together."""
    return bool(all_sum(torch.tensor(float(flag))) > 0)


def sync_gradients(params) -> None:
    """Sum gradients over ranks in one flat buffer. Losses are normalised by *global* counts, so the sum
    is the gradient of the combined batch (without DDP's bucketing and overlap)."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def check_ranks_agree(params) -> None:
    """Every rank must hold the same trainable weights (same start, same summed gradients)."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().cpu()
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, checksum.item())
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks diverged: trainable-weight checksums {sums}")


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic folders; the policy as save_pretrained and in the authors' trainable-only format.
def save_checkpoint(run_dir: Path, policy, processor, value_head, actor_opt, critic_opt, step, cfg, rng_states,
                    skipped_images=0):
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "policy")
    processor.save_pretrained(tmp / "policy")
    torch.save({k: v.detach().cpu() for k, v in trainable_parameters(policy).items()}, tmp / "vlrm-trainable.pt")
    torch.save({"step": step, "config": dataclasses.asdict(cfg),
                "value_head": value_head.state_dict() if value_head is not None else None,
                "actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict() if critic_opt else None,
                "rng": rng_states, "skipped_images": skipped_images}, tmp / "trainer.pt")
    if final.exists():
        if old.exists():  # left by a save killed while deleting it; `final` is complete
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)  # the previous checkpoint survives until the new one is complete
    shutil.rmtree(old, ignore_errors=True)


def save_run(run_dir, cfg, step, policy, processor, value_head, actor_opt, critic_opt, skipped_images, params,
             world_size, main_rank) -> None:
    """Every rank: gather the ranks' RNG states and check that their weights agree; rank 0 saves."""
    states = [rng_state()]
    if dist.is_initialized():
        states = [None] * world_size
        dist.all_gather_object(states, rng_state())
        check_ranks_agree(params)
    if main_rank:
        save_checkpoint(run_dir, policy, processor, value_head, actor_opt, critic_opt, step, cfg, states,
                        skipped_images)


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames
        if (run_dir / name / "trainer.pt").is_file():
            return run_dir / name
    return None


def checkpoint_to_resume(cfg: Config, run_dir: Path, main_rank: bool) -> Path | None:
    """The checkpoint --resume continues (None for a new run); refuses to start over an existing one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {cfg.run_dir!r} is a file; give a folder")
    ckpt = find_checkpoint(run_dir)
    if cfg.resume and ckpt is None:
        raise UsageError(f"--resume: no checkpoint in {run_dir}; start without --resume")
    if not cfg.resume and ckpt is not None:
        raise UsageError(f"{run_dir} already holds a checkpoint; pass --resume to continue it, "
                         f"or --run-dir to start a new run")
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    return ckpt


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # this rank's GPU


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Settings a resumed run may change without changing what it computes (--resume warns about the others).
RESUME_MAY_CHANGE = {"steps", "resume", "run_dir", "log_every", "val_every", "val_size", "save_every",
                     "num_workers", "kernels", "device"}


def resume(ckpt: Path, cfg: Config, policy, value_head, actor_opt, critic_opt, world_size, main_rank):
    """Load a checkpoint into the policy, the critic and the optimisers. -> (step, skipped images, the RNG
    states of every rank)."""
    try:
        trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        policy.load_state_dict(torch.load(ckpt / "vlrm-trainable.pt", map_location=policy.device), strict=False)
    except Exception as e:  # truncated or foreign file: say so, touch nothing
        raise UsageError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); it was left as it is. "
                         f"Restore it, or start a new run with another --run-dir") from None
    if (trainer.get("value_head") is None) != (value_head is None):
        was = trainer["config"].get("baseline", "value")
        raise UsageError(f"{ckpt} was trained with --baseline {was}; resume it with --baseline {was}")
    if value_head is not None:
        value_head.load_state_dict(trainer["value_head"])
        critic_opt.load_state_dict(trainer["critic_opt"])
    actor_opt.load_state_dict(trainer["actor_opt"])
    if len(trainer["rng"]) != world_size:
        raise UsageError(f"{ckpt} was written by {len(trainer['rng'])} ranks; resume it with as many")
    if main_rank:
        print(f"resumed from {ckpt} at step {trainer['step']}")
        _truncate_metrics(ckpt.parent / "metrics.jsonl", trainer["step"])
        changed = [f"{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in trainer["config"].items()
                   if k not in RESUME_MAY_CHANGE and hasattr(cfg, k) and getattr(cfg, k) != v]
        if changed:  # e.g. a default that changed since the run began: the rest is another computation
            print(f"[warn] resuming with settings that differ from the checkpoint's: {', '.join(changed)}; "
                  f"pass the run's own values to continue the same run")
    return trainer["step"], trainer.get("skipped_images", 0), trainer["rng"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint (the resumed run logs those steps again) and a line torn by
    the kill; written to a new file, then renamed, so a second kill cannot tear the log."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        os.replace(tmp, path)


class StopRequest:
    """Ctrl-C or SIGTERM sets `requested`: the loop finishes its step, saves and exits. A second signal
    stops at once (KeyboardInterrupt), leaving the last checkpoint as it was."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------
# Validation and logging: greedy captions of held-out images, retrieved by the judge CLIP.
def load_judge(spec: str, device):
    """The judge CLIP (never a reward): recall(images, captions) -> R@K of clip_recall."""
    model, tokenizer, _ = load_clip(spec, device)
    to_pixels = clip_normalizer(model, device)
    return lambda images, captions: clip_recall(model, tokenizer, to_pixels, images, captions)


@torch.no_grad()
def caption_images(policy, tokenizer, to_pixels, images, batch: int = 256, **decoding) -> list[str]:
    """Captions of uint8 images (N, S, S, 3), `batch` at a time: greedy, unless generate() keywords in
    `decoding` say otherwise. Validation, eval.py and the world's quality report all caption with it."""
    out = []
    for i in range(0, len(images), batch):
        pixels = to_pixels(torch.from_numpy(np.array(images[i:i + batch]))).to(policy.dtype)
        ids = policy.generate(pixel_values=pixels, **{"do_sample": False, **decoding})
        out += [c.strip() for c in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


@torch.no_grad()
def clip_image_embeddings(model, to_pixels, images, batch: int = 256) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> CLIP image embeddings (N, D), fp32, not normalised."""
    return torch.cat([model.encode_image(to_pixels(torch.from_numpy(np.array(images[i:i + batch])))).float()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def clip_text_embeddings(model, tokenizer, captions, batch: int = 256) -> tuple[torch.Tensor, list[int]]:
    """-> CLIP text embeddings (N, D), fp32, cut at its context length, and (N,) text keys: equal keys =
    the same token ids, one text to CLIP (it lowercases and drops extra spaces: "A circle" = "a  circle").
    Each distinct text is encoded once, so that copies get bit-identical embeddings, whatever batch they
    fall in: eval.py's image-to-text ranks count exact ties."""
    tokens = torch.cat([tokenizer(captions[i:i + batch]) for i in range(0, len(captions), batch)])
    unique, keys = torch.unique(tokens, dim=0, return_inverse=True)  # (U, L), (N,)
    device = next(model.parameters()).device
    emb = torch.cat([model.encode_text(unique[i:i + batch].to(device)).float() for i in range(0, len(unique), batch)])
    return emb[keys.to(emb.device)], keys.tolist()


def text_to_image_recall(text_emb, image_emb) -> dict:
    """CLIP Recall, text to image: caption i (N, D) must find its own image i (N, D) among all of them.
    -> R@1, R@5, R@10 (fractions), median and mean rank."""
    return kernels.recall_at_k(kernels.retrieval_ranks(text_emb, image_emb))


def clip_recall(model, tokenizer, to_pixels, images, captions) -> dict:
    """The judge's R@K of captions of uint8 images (N, S, S, 3): text_to_image_recall of their embeddings."""
    text_emb = clip_text_embeddings(model, tokenizer, captions)[0]
    return text_to_image_recall(text_emb, clip_image_embeddings(model, to_pixels, images))


def validate(policy, tokenizer, to_pixels, images, recalls, max_new_tokens) -> tuple[dict, list[str]]:
    """Greedy captions of the validation images (N, S, S, 3), and how well each CLIP of `recalls` (name ->
    recall(images, captions)) finds each caption's image: val/judge_r1, val/reward_r1, ..."""
    captions = caption_images(policy, tokenizer, to_pixels, images, max_new_tokens=max_new_tokens)
    val = {}
    for name, recall in recalls.items():
        r = recall(images, captions)
        val.update({f"val/{name}_r1": r["R@1"], f"val/{name}_r5": r["R@5"]})
    return {**val, "val/caption_len": mean_words(captions)}, captions


def mean_words(captions: list[str]) -> float:
    """Mean words per caption: charts/caption_len, val/caption_len and eval.py's words per caption."""
    return float(np.mean([len(words(c)) for c in captions]))


def append_metrics(run_dir: Path, metrics: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def truncated_share(token_counts, limit: int, captions) -> float:
    """Share of captions longer than a model's text limit (`token_counts`: captions -> tokens of each):
    their tails are invisible to it. charts/clip_truncated, charts/itm_truncated, eval.py's own."""
    return float(np.mean([n > limit for n in token_counts(captions)]))


# ----------------------------------------------------------------------------------------------------
# The command line: flags from Config, and the one place where a Config is checked and completed.
def resolve_config(cfg: Config) -> Config:
    """A copy of cfg with every field left at None filled, in this order: PRESETS[preset], REWARDS[reward],
    the world's model folders (shapes preset), run_dir. Every problem raises a UsageError that names it;
    nothing heavy loads before the checks. A resolved config resolves to itself."""
    cfg, problems = dataclasses.replace(cfg), []
    if cfg.preset not in PRESETS:
        problems.append(f"--preset must be one of {sorted(PRESETS)}, not {cfg.preset!r}")
    if cfg.reward not in REWARDS:
        problems.append(f"--reward must be one of {sorted(REWARDS)}, not {cfg.reward!r}")
    if cfg.baseline not in BASELINES:
        problems.append(f"--baseline must be one of {', '.join(BASELINES)}, not {cfg.baseline!r}")
    if cfg.kernels not in kernels.BACKENDS:
        problems.append(f"--kernels must be one of {list(kernels.BACKENDS)}, not {cfg.kernels!r}")
    if cfg.world not in shapes.PRESETS:
        problems.append(f"--world must be one of {sorted(shapes.PRESETS)}, not {cfg.world!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu or cuda, not {cfg.device!r}")
    for name in ("steps", "log_every", "val_every", "save_every", "val_size", "repeat_ngram", "itm_max_length",
                 "samples_per_image", "batch_size", "max_new_tokens"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be a positive integer")
    if cfg.baseline == "rloo" and cfg.samples_per_image < 2:
        problems.append(f"--baseline rloo needs --samples-per-image 2 or more (got {cfg.samples_per_image}): "
                        f"each caption's baseline is the other captions of its image")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        problems.append("--num-workers must be 0 (decode in the main process) or a positive integer")
    for name in ("lr", "value_lr", "max_grad_norm"):
        if not getattr(cfg, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if cfg.kl_coef is not None and not cfg.kl_coef >= 0:  # a negative one would pay for leaving the captioner
        problems.append("--kl-coef must be 0 (off) or positive")
    try:
        bad_phrase_regex(cfg.bad_phrases)
    except re.error as e:
        problems.append(f"--bad-phrases is not a valid regular expression: {e}")
    if problems:
        raise UsageError("; ".join(problems))
    for key, value in {**PRESETS[cfg.preset], **REWARDS[cfg.reward]}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.preset == "paper" and not cfg.images:
        raise UsageError("--preset paper needs --images: a folder of training images, or a text file of paths")
    if cfg.batch_size % cfg.samples_per_image:
        raise UsageError(f"--batch-size {cfg.batch_size} counts captions, so it must be a multiple of "
                         f"--samples-per-image {cfg.samples_per_image} (images per step x captions per image)")
    if not (cfg.w_clip or cfg.w_itm or cfg.w_ref):
        raise UsageError("--w-clip, --w-itm and --w-ref are all 0: there is no reward to learn from")
    world_models = {"policy": "captioner", "itm": "itm", "ref_lm": "ref_lm", "clip": "clip", "judge_clip": "judge_clip"}
    if cfg.preset == "shapes" and any(getattr(cfg, key) is None for key in world_models):
        world = load_world(cfg.world, cfg.world_root)  # the world's models fill every model left at None
        for key, model in world_models.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, world.path(model))
    baseline = "" if cfg.baseline == "value" else f"-{cfg.baseline}"
    cfg.run_dir = cfg.run_dir or f"runs/{cfg.preset}-{cfg.reward}{baseline}-seed{cfg.seed}"
    return cfg


def parse_config(argv=None) -> Config:
    """The command line -> a resolved Config; a bad value exits with code 2 and says what is wrong."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" and f.default is False:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    try:
        return resolve_config(Config(**vars(parser.parse_args(argv))))
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def main(argv=None) -> None:
    cfg = parse_config(argv)
    try:
        train(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
