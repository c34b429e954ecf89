"""Tests of the method (vlrm.py) and of everything that runs it: the miniature world (shapes.py, and
build_world.py that trains its models), loading, checkpoints, resume, torchrun. Offline, CPU, a few minutes.

    pytest -q test_vlrm.py     (conftest.py provides the tiny test world and the offline environment)

Read the first group to learn the method. Each test pins one rule of VLRM that a wrong implementation
would break: the return of a token (gamma = 1, the penalties still to come), where each penalty lands,
that the rollout samples the policy itself and the update reproduces its log-probs, that the advantage
uses the critic from before its update and is scaled but not centred, that the entropy bonus is a bonus
and the KL penalty a charge, that training and evaluation count the same words and phrases, and that each
baseline is what design choice 9 says. They check what the functions and train() return, not the order
of the calls inside train(). The second group, below the divider, tests the machinery: the world,
loading, checkpoints, resume, errors, torchrun.
"""
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, OPTForCausalLM, PreTrainedTokenizerFast

import bench_paper
import build_world
import shapes
import vlrm


REPO = Path(__file__).parent


def pixels(images) -> torch.Tensor:
    """The world's uint8 images (B, 48, 48, 3) as its models read them: (B, 3, 48, 48)."""
    return build_world.world_pixels(shapes.PRESETS["test"])(images)


def run_env():
    """Environment of a subprocess: offline, and no Triton interpreter (vlrm runs --kernels torch)."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "HF_HUB_OFFLINE": "1"}


class WordTokenizer:
    """Hand-made tokenizer: one token per word piece, EOS id 0."""
    eos_token_id = 0

    def __init__(self, pieces):
        self.pieces = pieces

    def batch_decode(self, ids):
        return [self.pieces[int(i[0])] for i in ids]


@pytest.fixture(scope="module")
def policy(world):
    torch.manual_seed(0)
    model, processor = vlrm.load_policy(world.path("captioner"))
    return model, processor


def sampled_batch(world, model, n, max_new_tokens):
    """Pure samples for the first n test images, seed 1: soft prefix (B, Q, H), tokens and mask (B, T)."""
    torch.manual_seed(1)
    with torch.no_grad():
        prefix = vlrm.soft_prefix(model, model.vision_model(pixels(world.images("test")[:n])).last_hidden_state)
        tokens, mask = vlrm.rollout(model, prefix, max_new_tokens=max_new_tokens)
    return prefix, tokens, mask


def train_args(world_root, tmp, steps, *extra):
    return ["--world", "test", "--world-root", str(world_root), "--steps", str(steps), "--batch-size", "8", "--max-new-tokens", "12",
            "--run-dir", str(tmp), "--log-every", "2", "--val-every", "3", "--val-size", "16", "--save-every", "2",
            "--value-warmup", "1", "--kernels", "torch", *extra]


# ====================================================================================================
# The method

# ----------------------------------------------------------------------------------------------------
# Returns and penalties
def test_returns_to_go_with_gamma_one():
    reward = torch.tensor([1.0, 2.0])
    penalty = torch.tensor([[0.0, 0.5, 0.0, 0.25], [1.0, 0.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])  # second caption: 3 tokens, the 9 is past its EOS
    expected = torch.tensor([[1 - 0.75, 1 - 0.75, 1 - 0.25, 1 - 0.25], [2 - 1.0, 2.0, 2.0, 0.0]])
    assert torch.allclose(vlrm.returns_to_go(reward, penalty, mask), expected)


def test_penalties_land_on_the_right_tokens():
    pieces = ["</s>", "a", " green", " circle", "an", " image", " of", " in", " 2019", " a"]
    tok = WordTokenizer(pieces)
    regex = vlrm.bad_phrase_regex(vlrm.Config.bad_phrases)
    # "an image of a green circle in 2019</s>" ; "a green circle a green circle</s>"
    seqs = torch.tensor([[4, 5, 6, 9, 2, 3, 7, 8, 0], [1, 2, 3, 9, 2, 3, 0, 0, 0]])
    mask = torch.tensor([[1.0] * 9, [1.0] * 7 + [0.0] * 2])
    bad, repeat = vlrm.penalties(seqs, mask, tok, regex, ngram=3)
    assert bad[0].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0]  # "an image of" ends at 'of', the year at '2019'
    assert repeat[1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]  # the second "a green circle" completes at 'circle'
    assert repeat[0].sum() == 0 and bad[1].sum() == 0


def test_repeat_penalty_needs_the_whole_ngram():
    """'green circle' comes back, but no word 3-gram does: ngram=3 charges nothing, ngram=2 the second 'circle'."""
    tok = WordTokenizer(["</s>", "a", " green", " circle", " and"])
    seqs = torch.tensor([[1, 2, 3, 4, 2, 3, 0]])  # "a green circle and green circle</s>"
    mask, regex = torch.ones(1, 7), vlrm.bad_phrase_regex(vlrm.Config.bad_phrases)
    assert vlrm.penalties(seqs, mask, tok, regex, ngram=3)[1].sum() == 0
    assert vlrm.penalties(seqs, mask, tok, regex, ngram=2)[1].tolist() == [[0, 0, 0, 0, 0, 1, 0]]


# ----------------------------------------------------------------------------------------------------
# Rollouts and log-probs: the update sees the sampler's own distribution
def test_rollout_is_pure_sampling(world, policy):
    """The update's log-probs must be those of the distribution that drew the samples: compare with
    generate()'s own per-step scores (no top-k, no min length, nothing warped)."""
    model, _ = policy
    px = pixels(world.images("test")[:4])
    with torch.no_grad():
        prefix = vlrm.soft_prefix(model, model.vision_model(px).last_hidden_state)
        embeds = vlrm._prompt(model, prefix)
        torch.manual_seed(3)
        out = model.language_model.generate(inputs_embeds=embeds, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                            max_new_tokens=8, output_scores=True, return_dict_in_generate=True,
                                            pad_token_id=0, eos_token_id=1)
        torch.manual_seed(3)
        tokens, mask = vlrm.rollout(model, prefix, max_new_tokens=8)
        assert torch.equal(tokens, out.sequences)
        scores = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        hidden = vlrm.caption_states(model, prefix, tokens)
        ours = hidden @ model.language_model.get_output_embeddings().weight.T
        ours = ours.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(scores * mask, ours * mask, atol=1e-4)


def test_rollout_mask_covers_the_eos_and_nothing_after(world, policy):
    model, _ = policy
    eos = model.config.text_config.eos_token_id
    _, tokens, mask = sampled_batch(world, model, 8, max_new_tokens=12)
    ended = (tokens == eos).any(1)
    assert ended.any()
    for row, m, done in zip(tokens, mask, ended):
        n = int((row == eos).nonzero()[0]) + 1 if done else len(row)  # up to and including the first EOS
        assert m.tolist() == [1.0] * n + [0.0] * (len(row) - n)


def test_logprobs_match_blip2_logits(world, policy):
    model, _ = policy
    px = pixels(world.images("test")[:4])
    torch.manual_seed(1)
    with torch.no_grad():
        prefix = vlrm.soft_prefix(model, model.vision_model(px).last_hidden_state)
        tokens, mask = vlrm.rollout(model, prefix, max_new_tokens=12)
        hidden = vlrm.caption_states(model, prefix, tokens)
        W = model.language_model.get_output_embeddings().weight
        ours = vlrm.kernels.fused_logprob(hidden.reshape(-1, hidden.shape[-1]), W, tokens.reshape(-1)).view_as(mask)
        # the library's own forward: image placeholder tokens + BOS + caption
        q = model.config.num_query_tokens
        ids = torch.cat([torch.full((4, q), model.config.image_token_index), torch.ones(4, 1, dtype=torch.long),
                         tokens], 1)
        logits = model(pixel_values=px, input_ids=ids).logits[:, q:-1]
        theirs = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(ours * mask, theirs * mask, atol=1e-4)
    assert mask[:, 0].all() and (mask.sum(1) >= 1).all()


def test_trainable_set_is_what_the_authors_released(world, policy):
    model, _ = policy
    names = set(vlrm.trainable_parameters(model))
    assert "query_tokens" in names and any(n.startswith("qformer.") for n in names)
    assert {"language_projection.weight", "language_projection.bias"} <= names
    assert not any(n.startswith(("vision_model.", "language_model.")) for n in names)


# ----------------------------------------------------------------------------------------------------
# The advantage and the losses of steps 2 and 3
def test_a2c_step_raises_logprob_of_positive_advantage(world):
    torch.manual_seed(0)
    model, _ = vlrm.load_policy(world.path("captioner"))
    params = vlrm.trainable_parameters(model)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    px = pixels(world.images("test")[:8])
    with torch.no_grad():
        image_embeds = model.vision_model(px).last_hidden_state
        tokens, mask = vlrm.rollout(model, vlrm.soft_prefix(model, image_embeds), max_new_tokens=10)
    W = model.language_model.get_output_embeddings().weight
    returns = torch.tensor([1.0, 0.0] * 4)[:, None].expand_as(mask) * mask  # even captions good, odd neutral
    advantages = vlrm.scaled_advantages(returns, torch.zeros_like(returns), mask)  # b = 0: positive on the even

    def seq_logp():
        hidden = vlrm.caption_states(model, vlrm.soft_prefix(model, image_embeds), tokens)
        logp = vlrm.kernels.fused_logprob(hidden[mask.bool()], W, tokens[mask.bool()])
        return torch.zeros_like(mask).masked_scatter(mask.bool(), logp).sum(1)

    before = seq_logp().detach()
    opt = torch.optim.SGD(params.values(), lr=0.01)  # small: the first-order effect dominates
    hidden, valid = vlrm.caption_states(model, vlrm.soft_prefix(model, image_embeds), tokens), mask.bool()
    logp, entropy = vlrm.kernels.fused_logprob(hidden[valid], W, tokens[valid], with_entropy=True)
    vlrm.actor_loss(logp, entropy, advantages[valid], 0.0, mask.sum())["loss"].backward()
    assert all(p.grad is not None for p in params.values()) and W.grad is None
    opt.step()
    change = seq_logp().detach() - before
    assert change[0::2].sum() > 0  # the gradient of sum(A * log pi) raises the good samples' log-prob
    assert change[0::2].sum() > change[1::2].sum()


def test_advantages_use_the_critic_from_before_its_update(world_root, world, tmp_path):
    """Design choice 1: each step's advantage A = R - V takes V before step 2 fits the value head to these
    returns. So the critic's learning rate cannot change the first actor update: with no warm-up, one step
    at value_lr 1e-3 and one at 1.0 move the critic apart and leave the policy bit for bit the same."""
    runs = {lr: tmp_path / f"lr{lr}" for lr in ("1e-3", "1.0")}
    for lr, run in runs.items():
        vlrm.train(vlrm.parse_config(train_args(world_root, run, 1, "--value-warmup", "0", "--value-lr", lr)))
    policies = [torch.load(run / "checkpoint/vlrm-trainable.pt") for run in runs.values()]
    critics = [torch.load(run / "checkpoint/trainer.pt", weights_only=False)["value_head"] for run in runs.values()]
    start = vlrm.trainable_parameters(vlrm.load_policy(world.path("captioner"))[0])
    assert any(not torch.equal(policies[0][k], start[k]) for k in start)  # the actor did update
    assert any(not torch.equal(critics[0][k], critics[1][k]) for k in critics[0])  # the critics differ
    assert all(torch.equal(policies[0][k], policies[1][k]) for k in policies[0])  # the actors do not


def test_advantages_are_scaled_by_their_std_not_centred():
    """Design choice 6: A = (R - b) / std(R - b), not centred (b is the baseline): with b = 0, A = R / std(R)."""
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    returns = (1 + torch.rand(mask.shape)) * mask  # all positive
    advantages = vlrm.scaled_advantages(returns, torch.zeros_like(returns), mask)
    valid = mask.bool()
    std = (returns[valid] - returns[valid].mean()).pow(2).mean().add(1e-8).sqrt()
    assert torch.allclose(advantages[valid], returns[valid] / std) and (advantages[~valid] == 0).all()


def test_actor_loss_subtracts_the_entropy_bonus(world, policy):
    model, _ = policy
    prefix, tokens, mask = sampled_batch(world, model, 4, max_new_tokens=8)
    with torch.no_grad():
        hidden = vlrm.caption_states(model, prefix, tokens)
    W, valid = model.language_model.get_output_embeddings().weight, mask.bool()
    logp, entropy = vlrm.kernels.fused_logprob(hidden[valid], W, tokens[valid], with_entropy=True)
    out = vlrm.actor_loss(logp, entropy, torch.randn(len(logp)), 0.5, mask.sum())
    assert out["entropy"] > 0
    assert torch.allclose(out["loss"], out["policy"] - 0.5 * out["entropy"])  # a bonus: maximised, not minimised


def test_kl_penalty_measures_the_move_away_from_the_base(world):
    """frozen_base copies what is trained and shares what is frozen; the log ratio is 0 until the policy
    moves, then nonzero on the caption tokens and 0 after EOS, while the base stays where it was."""
    torch.manual_seed(0)
    model, _ = vlrm.load_policy(world.path("captioner"))
    base = vlrm.frozen_base(model)
    assert base.language_model is model.language_model and base.vision_model is model.vision_model
    assert base.qformer is not model.qformer and not any(p.requires_grad for p in base.parameters())
    px = pixels(world.images("test")[:4])
    W = model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        image_embeds = model.vision_model(px).last_hidden_state
        tokens, mask = vlrm.rollout(model, vlrm.soft_prefix(model, image_embeds), max_new_tokens=10)

        def ratio():
            logp = vlrm.sampled_logprobs(model, image_embeds, tokens, mask.bool(), W)  # the policy's log pi
            return vlrm.log_ratio_to_base(base, image_embeds, tokens, mask, logp, W)
        assert ratio().abs().max() < 1e-5
        model.language_projection.weight.add_(torch.randn_like(model.language_projection.weight))  # the policy moves
        moved, valid = ratio(), mask.bool()
    assert moved[valid].abs().mean() > 0.01 and (moved[~valid] == 0).all()
    assert not torch.equal(base.language_projection.weight, model.language_projection.weight)


def test_kl_penalty_is_charged_not_paid(world_root, world, tmp_path):
    """Design choice 8: every sampled token pays kl_coef * (log pi - log pi_base). With c = 0.5 and a log
    ratio of 1 at every token, R(t_k) falls by 0.5 per remaining token. In train(), each logged return is
    the reward less every penalty the caption paid, the KL charge with them; the charge is 0 until the
    policy moves, and not after its first update."""
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])  # the second caption: 2 tokens
    returns = vlrm.returns_to_go(torch.tensor([3.0, 3.0]), 0.5 * torch.ones_like(mask), mask)
    assert returns.tolist() == [[1.0, 1.5, 2.0, 2.5], [2.0, 2.5, 0.0, 0.0]]
    run = tmp_path / "r"
    vlrm.train(vlrm.parse_config(train_args(world_root, run, 3, "--value-warmup", "0", "--log-every", "1",
                                            "--kl-coef", "0.5", "--w-bad", "2", "--w-repeat", "1")))
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "charts/return" in l]
    for m in lines:
        paid = 2 * m["penalty/bad"] + m["penalty/repeat"] + 0.5 * m["penalty/kl"]
        assert m["charts/return"] == pytest.approx(m["reward/sequence"] - paid, abs=1e-4)
    assert lines[0]["penalty/kl"] == 0 and all(m["penalty/kl"] != 0 for m in lines[1:])


def test_training_and_evaluation_charge_the_same_words_and_phrases():
    """One definition of a word and of a bad phrase: a mixed-case caption with a filler phrase and a repeated
    3-gram costs what eval.py counts. The filler, capitalised, is charged once and counted; "a red circle"
    comes back once, charged at its second "circle" and counted; "Red" and "red" are one word."""
    import eval as evaluation
    caption = "An image of a red circle, a Red circle"
    pieces = ["</s>", "An", " image", " of", " a", " red", " circle", ",", " Red"]
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 4, 8, 6, 0]])
    assert "".join(pieces[i] for i in seqs[0, :-1]) == caption  # the tokens spell the caption, then EOS
    regex = vlrm.bad_phrase_regex(vlrm.Config.bad_phrases)
    bad, repeat = vlrm.penalties(seqs, torch.ones(1, 11), WordTokenizer(pieces), regex, ngram=3)
    assert bad[0].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # "An image of" ends at "of"
    assert repeat[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]  # the second "a red circle" ends at "circle"
    stats = evaluation.caption_stats([caption])
    assert stats["bad_phrase"] == 1.0 and stats["repeat_3gram"] == 1.0 and stats["loop_3gram"] == 0.0
    assert stats["words"] == 9 == len(vlrm.words(caption))
    assert vlrm.words("A café's sign_post") == ["a", "café", "s", "sign", "post"]  # letters or digits, any script
    clean = evaluation.caption_stats(["a red circle with a blue cross"])
    assert clean["bad_phrase"] == clean["repeat_3gram"] == 0.0


# ----------------------------------------------------------------------------------------------------
# The baselines of design choice 9
def test_leave_one_out_baselines_are_exact():
    """Two images, K = 3 captions each: caption j's baseline is the mean whole-caption return R(t_1) of
    the other two captions of its image, at every valid token."""
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    first = torch.tensor([3.0, 6.0, 9.0, -1.0, 1.0, 3.0])
    returns = (first[:, None] - torch.tensor([0.0, 0.5, 1.0])) * mask  # later tokens: penalties removed
    b = vlrm.leave_one_out_baseline(returns, mask, 3)
    expected = torch.tensor([7.5, 6.0, 4.5, 2.0, 1.0, 0.0])[:, None] * mask
    assert torch.equal(b, expected)


def test_identical_returns_in_a_group_give_zero_rloo_advantage():
    mask = torch.tensor([[1.0, 1, 1]] * 4)
    returns = torch.tensor([2.0, 2.0, -5.0, -5.0])[:, None] * mask  # two images x two identical captions
    advantages = vlrm.scaled_advantages(returns, vlrm.leave_one_out_baseline(returns, mask, 2), mask)
    assert torch.equal(advantages, torch.zeros_like(advantages))


def test_batch_baseline_is_the_batch_mean_of_whole_caption_returns():
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0]])
    returns = torch.tensor([[1.0, 0.5, 0], [4.0, 4.0, 3.0], [-2.0, 0, 0]])
    b = vlrm.batch_baseline(returns, mask)
    assert torch.allclose(b, torch.tensor(1.0) * mask)  # (1 + 4 - 2) / 3, at every valid token
    assert vlrm.explained_variance(b, returns, mask) == pytest.approx(0.0, abs=1e-6)  # a constant foresees nothing


# ====================================================================================================
# The machinery: the world, loading, running, checkpoints, errors, the paper setting, torchrun

# ----------------------------------------------------------------------------------------------------
# The world: scenes and captions
def test_scenes_are_deterministic_and_splits_disjoint():
    cfg = shapes.PRESETS["test"]
    a, b = shapes.make_splits(cfg), shapes.make_splits(cfg)
    assert a == b
    assert np.array_equal(np.asarray(shapes.render(a["test"][0])), np.asarray(shapes.render(b["test"][0])))
    test_keys = [s.key() for s in a["test"]]
    assert len(set(test_keys)) == len(test_keys), "test scenes must be unique"
    held_out = set(test_keys) | {s.key() for s in a["val"]}
    assert not held_out & {s.key() for s in a["train"]}
    other = shapes.make_splits(dataclasses.replace(cfg, seed=1))
    assert [s.key() for s in other["test"]] != test_keys


def test_render_draws_the_attributes():
    scene = shapes.Scene((shapes.Obj("square", "red", "large", 4),), "black")
    img = np.asarray(shapes.render(scene, 48)).astype(int)
    assert (np.abs(img[24, 24] - shapes.COLOURS["red"]) < 10).all()  # the middle cell is red
    assert (np.abs(img[2, 2] - shapes.BACKGROUNDS["black"]) < 10).all()
    small = np.asarray(shapes.render(shapes.Scene((shapes.Obj("square", "red", "small", 4),), "black"), 48))
    assert (small != img).any(axis=-1).sum() > 0  # sizes differ in pixels


def test_caption_grammar_covers_every_attribute():
    rng = random.Random(0)
    for shape in shapes.SHAPES:
        for colour in shapes.COLOURS:
            for size in shapes.SIZES:
                for cell, phrase in enumerate(shapes.POSITIONS):
                    scene = shapes.Scene((shapes.Obj(shape, colour, size, cell),), "grey")
                    text = shapes.rich_caption(scene)
                    article = "an" if size[0] in "aeiou" else "a"
                    assert text == f"{article} {size} {colour} {shape} {phrase} on a grey background"
    scene = shapes.Scene((shapes.Obj("cross", "orange", "large", 0), shapes.Obj("circle", "blue", "small", 2),
                          shapes.Obj("diamond", "pink", "small", 8)), "white")
    assert shapes.rich_caption(scene) == ("a large orange cross at top left on a white background with a small blue "
                                          "circle at top right and a small pink diamond at bottom right")
    assert shapes.describe(scene, 1, size=False, position=False, background=False) == "an orange cross"
    shallow = [build_world.shallow_caption(scene, rng) for _ in range(200)]
    assert shallow.count("a cross") > 60  # the commonest caption (45%) names only the main object
    assert 1 <= sum(len(c.split()) > 5 for c in shallow) <= 25  # and a thin tail (5%) gives more detail
    lm_texts = [build_world.lm_caption(scene, rng) for _ in range(400)]
    assert any(t.startswith(build_world.FILLERS) for t in lm_texts)  # the LM knows the filler phrases
    assert any(re.search(r"in (19|20)\d\d$", t) for t in lm_texts)


def test_the_parser_reads_back_every_caption_the_grammar_writes():
    """shapes.parse_caption inverts the grammar: every object (shape, colour, size, cell), with every choice of
    attributes named, alone and as the first, second or third object of a caption, with each background or none."""
    O, S = shapes.Obj, shapes.Scene
    others = (O("cross", "pink", "small", 4), O("circle", "green", "large", 0))
    for i, (shape, colour, size, cell) in enumerate(itertools.product(shapes.SHAPES, shapes.COLOURS, shapes.SIZES,
                                                                      range(9))):
        obj = O(shape, colour, size, cell)
        for objects in ((obj,), (obj, *others), (others[0], obj, others[1]), (*others, obj)):
            for (named_size, named_colour, named_position), background in itertools.product(
                    itertools.product((True, False), repeat=3), (*shapes.BACKGROUNDS, None)):
                scene = S(objects, background or "grey")
                text = shapes.describe(scene, size=named_size, colour=named_colour, position=named_position,
                                       background=background is not None)
                named = [{"shape": o.shape, **({"size": o.size} if named_size else {}),
                          **({"colour": o.colour} if named_colour else {}),
                          **({"position": o.cell} if named_position else {})} for o in objects]
                assert shapes.parse_caption(vlrm.words(text)) == (named, [], background), text


def test_truth_of_partial_captions():
    O, S = shapes.Obj, shapes.Scene
    scene = S((O("cross", "orange", "large", 4), O("circle", "blue", "small", 0)), "white")
    said = S((O("circle", "blue", "small", 0), O("cross", "red", "large", 4)), "black")
    assert build_world.is_true(said, scene, objects=1, background=False)  # "a small blue circle at top left"
    assert build_world.is_true(said, scene, objects=2, colour=False, background=False)  # in another order
    assert not build_world.is_true(said, scene, objects=2, background=False)  # the cross is orange, not red
    assert not build_world.is_true(said, scene, objects=1)  # the background is white
    two_circles = S((O("circle", "blue", "small", 0), O("circle", "blue", "small", 0)), "white")
    assert not build_world.is_true(two_circles, scene, objects=2)  # one object cannot stand for two


def test_detailed_captions_show_the_contexts_rl_leads_to():
    """build_world.py's design choice 5: the captioner's detailed half names the small objects in either order,
    each object's position on its own, and every object in about half the captions (+ 1/3 x the rest)."""
    O, rng = shapes.Obj, random.Random(0)
    scene = shapes.Scene((O("cross", "orange", "large", 0), O("circle", "blue", "small", 2),
                          O("diamond", "pink", "small", 8)), "white")
    captions = [build_world.detailed_caption(scene, rng) for _ in range(600)]
    assert all(re.match(r"an? (large )?(orange )?cross", c) for c in captions)  # the main object first
    both = [c for c in captions if "circle" in c and "diamond" in c]
    assert 0.55 < len(both) / len(captions) < 0.8
    assert any(c.index("circle") < c.index("diamond") for c in both)
    assert any(c.index("diamond") < c.index("circle") for c in both)  # the small ones in random order
    main_only = [c for c in both if "top left" in c and "top right" not in c and "bottom right" not in c]
    small_only = [c for c in both if "top left" not in c and ("top right" in c or "bottom right" in c)]
    assert main_only and small_only  # each object's position is named or not on its own


def test_negatives_are_false_and_as_long_as_positives():
    rng = random.Random(0)
    scenes = shapes.make_splits(shapes.PRESETS["test"])["test"][:200]
    for scene in scenes[:100]:
        assert shapes.rich_caption(build_world.corrupt(scene, rng)) != shapes.rich_caption(scene)
        assert build_world.false_caption(scene, scenes, rng, rich=1.0) != shapes.rich_caption(scene)
    positives = [shapes.describe(s, **build_world.true_options(s, rng)) for s in scenes]
    negatives = [build_world.false_caption(s, scenes, rng) for s in scenes]
    words = [np.mean([len(c.split()) for c in texts]) for texts in (positives, negatives)]
    assert abs(words[0] - words[1]) < 0.15 * words[0], words  # length alone cannot tell them apart
    short = [build_world.false_caption(s, scenes, rng, rich=0.0) for s in scenes]
    assert np.mean([len(c.split()) for c in short]) < 0.7 * words[0]


def test_binding_twins_move_one_attribute_between_objects():
    """build_world.py's design choice 9: a twin holds the same objects' attributes, one of them moved to another object;
    the same describe() options give each a caption that is false of the other."""
    O, S, rng = shapes.Obj, shapes.Scene, random.Random(0)
    assert build_world.move_attribute(S((O("cross", "orange", "large", 4),), "white"), rng) is None
    scene = S((O("cross", "orange", "large", 0), O("circle", "blue", "small", 2), O("diamond", "pink", "small", 8)), "white")
    kinds = set()
    for _ in range(300):
        twin = build_world.move_attribute(scene, rng)
        assert twin.key() != scene.key() and twin.background == scene.background
        assert sorted(o.size for o in twin.objects) == sorted(o.size for o in scene.objects)
        moved = {what for what in ("shape", "colour", "cell")
                 if sorted(getattr(o, what) for o in twin.objects) != sorted(getattr(o, what) for o in scene.objects)}
        assert moved <= {"shape", "colour"} and len(moved) <= 1  # taken (one value doubled) or exchanged (same values)
        assert len({o.cell for o in twin.objects}) == 3  # positions are only ever exchanged
        kinds.add(next(iter(moved)) if moved else "exchange")
        options = build_world.twin_options(scene, twin, rng, rich=0.5)
        assert not build_world.is_true(twin, scene, **options) and not build_world.is_true(scene, twin, **options)
    assert kinds == {"shape", "colour", "exchange"}


def test_twin_batches_pair_each_scene_with_its_drawn_twin():
    rng = random.Random(0)
    scenes = shapes.make_splits(shapes.PRESETS["test"])["test"][:40]
    images = np.stack([np.asarray(shapes.render(s, 48)) for s in scenes])
    idx = torch.arange(16)
    batch, pixels, options, pairs = build_world.with_twins(scenes, images, idx, 8, build_world.move_attribute, rng, 0.75, 48)
    multi = [i for i in range(8) if len(scenes[i].objects) > 1]
    assert len(batch) == len(pixels) == len(options) == 16 and [j for j, _ in pairs] == multi
    for j, k in pairs:
        assert options[j] == options[k] and batch[k].key() != batch[j].key()
        assert np.array_equal(pixels[k], np.asarray(shapes.render(batch[k], 48)))
    rest = [s for s in batch if all(s is not batch[k] for _, k in pairs)]
    assert rest == scenes[:16 - len(pairs)]  # the drawn scenes, in order, less as many as there are twins


def test_binding_probes_move_one_attribute_of_the_first_two_objects():
    O, S = shapes.Obj, shapes.Scene
    three = S((O("cross", "orange", "large", 0), O("circle", "blue", "small", 2), O("diamond", "pink", "small", 8)), "white")
    same = S((O("cross", "orange", "large", 0), O("circle", "blue", "small", 2), O("circle", "pink", "small", 8)), "white")
    two = S((O("cross", "orange", "large", 0), O("circle", "blue", "small", 2)), "white")
    idx, changed = build_world.binding_probe([three, same, two], "steal", "colour")
    assert idx == [0, 1] and shapes.describe(changed[0], objects=2) == (
        "a large orange cross at top left on a white background with a small pink circle at top right")
    assert build_world.binding_probe([three, same, two], "steal", "shape")[0] == [0]  # the circles share the shape
    idx, changed = build_world.binding_probe([three, same, two], "swap", "cell")
    assert idx == [0, 1, 2] and shapes.describe(changed[2], objects=2) == (
        "a large orange cross at top right on a white background with a small blue circle at top left")


def test_the_normaliser_is_the_saved_processors(world):
    """vlrm.normalizer, which the build trained every model with, equals what the processors saved beside the
    models compute through the library (PIL in, no resize at the world's size), and a run uses it too."""
    images = np.array(world.images("test")[:4])
    for model in ("captioner", "itm"):
        processor = vlrm.Blip2Processor.from_pretrained(world.path(model))
        library = processor(images=[vlrm.Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
        assert torch.allclose(pixels(images), library, atol=1e-5)
        assert torch.equal(vlrm.processor_normalizer(processor, "cpu")(torch.from_numpy(images)), pixels(images))


# ----------------------------------------------------------------------------------------------------
# The world on disk: loaders of the paper setting, manifest, corruption, the shipped world
def test_models_round_trip_through_the_paper_loaders(world, tmp_path):
    px = pixels(world.images("test")[:3])
    policy, processor = vlrm.load_policy(world.path("captioner"))
    policy.save_pretrained(tmp_path / "p")
    processor.save_pretrained(tmp_path / "p")
    again, _ = vlrm.load_policy(str(tmp_path / "p"))
    ids = torch.tensor([[policy.config.image_token_index] * policy.config.num_query_tokens + [1, 5, 6]] * 3)
    with torch.no_grad():
        assert torch.equal(policy(pixel_values=px, input_ids=ids).logits, again(pixel_values=px, input_ids=ids).logits)

    clip, tokenizer, _ = vlrm.load_clip(world.path("clip"))
    build_world.save_clip(clip, json.loads(Path(world.path("clip"), "open_clip_config.json").read_text())["model_cfg"],
                     tmp_path / "c")
    clip2, _, _ = vlrm.load_clip(f"local-dir:{tmp_path / 'c'}")
    with torch.no_grad():
        assert torch.equal(clip.encode_image(px), clip2.encode_image(px))
        assert torch.equal(clip.encode_text(tokenizer(["a red circle"])), clip2.encode_text(tokenizer(["a red circle"])))

    itm = vlrm._load(Blip2ForImageTextRetrieval, world.path("itm")).eval()
    tok = vlrm._load(vlrm.Blip2Processor, world.path("itm")).tokenizer
    enc = tok(["a red circle", "a blue square at top on a white background", "a cross"], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        library = itm(pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      use_image_text_matching_head=True).logits_per_image
        ours = build_world.itm_logits(itm, itm.vision_model(px).last_hidden_state, enc["input_ids"], enc["attention_mask"])
        library_itc = itm(pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          use_image_text_matching_head=False).logits_per_image
        ours_itc = build_world.itc_logits(itm, itm.vision_model(px).last_hidden_state, enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(library, ours, atol=1e-5)  # the build's fast paths are the library's computation
    assert ours_itc.shape == (len(px), 3) and torch.allclose(library_itc, ours_itc, atol=1e-5)

    lm = vlrm._load(OPTForCausalLM, world.path("ref_lm"))
    lm.save_pretrained(tmp_path / "lm")
    with torch.no_grad():
        assert torch.equal(lm(ids[:, -3:]).logits, OPTForCausalLM.from_pretrained(tmp_path / "lm")(ids[:, -3:]).logits)


def test_blip2_vision_is_the_reward_clips_image_tower(world):
    """BLIP-2's ViT is a CLIP image tower: the converted weights compute CLIP's image embedding exactly."""
    clip, _, _ = vlrm.load_clip(world.path("clip"))
    policy, _ = vlrm.load_policy(world.path("captioner"))
    px = pixels(world.images("test")[:4])
    with torch.no_grad():
        ours = policy.vision_model(px).last_hidden_state[:, 0] @ clip.visual.proj
        assert torch.allclose(ours, clip.encode_image(px), atol=1e-5)


def test_captioner_fine_tunes_its_opt_and_the_reference_lm_stays(world):
    """build_world.py's design choice 3: the captioner's OPT starts as the reference LM and learns with the
    Q-Former; the reference LM is saved before that, so it still scores text as a text-only LM."""
    policy, _ = vlrm.load_policy(world.path("captioner"))
    ours, ref = policy.language_model.state_dict(), vlrm._load(OPTForCausalLM, world.path("ref_lm")).state_dict()
    assert ours.keys() == ref.keys()
    changed = [k for k in ours if not torch.equal(ours[k], ref[k])]
    assert len(changed) > len(ours) // 2, f"only {len(changed)} of {len(ours)} OPT tensors were fine-tuned"


def test_lm_prefix_puts_the_background_first_as_caption_tokens(world):
    """build_world.py's design choice 2: the reference LM's prefix holds the caption's content words, background
    first, each the very token the caption uses for it."""
    tok = PreTrainedTokenizerFast.from_pretrained(world.path("ref_lm"))
    caption = "a red circle at top left on a grey background with a blue cross"
    ids = build_world.content_ids(caption, tok, world.config.num_query_tokens)
    words = [tok.decode([i]).strip() for i in ids if i != tok.pad_token_id]
    assert words == ["grey", "red", "circle", "top", "left", "with", "blue", "cross"]
    assert set(ids) - {tok.pad_token_id} <= set(tok(caption)["input_ids"])
    assert len(ids) == world.config.num_query_tokens


def test_world_manifest_detects_stale_and_corrupt_caches(world, tmp_path):
    assert shapes.manifest_problem(world.root, world.config) is None
    copy = tmp_path / "copy"
    shutil.copytree(world.root, copy)
    assert "stale" in shapes.manifest_problem(copy, dataclasses.replace(world.config, seed=5))
    weights = next((copy / "captioner").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "corrupt" in shapes.manifest_problem(copy, world.config)
    (copy / "manifest.json").unlink()
    assert "no readable manifest" in shapes.manifest_problem(copy, world.config)


def test_world_builds_leave_no_temp_folders(tmp_path, monkeypatch):
    """A killed build's temp folder is removed by the next build; a failed build removes its own; a
    rebuild replaces the world whole. (make_world is stubbed: only the cache's bookkeeping is tested.)"""
    def make_world(cfg, out, quiet=False):
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"world_version": shapes.WORLD_VERSION,
                                                       "config": dataclasses.asdict(cfg), "files": {}}))
        (out / "scenes.json").write_text("{}")
        if fail:
            raise RuntimeError("build failed")
    monkeypatch.setattr(build_world, "make_world", make_world)
    (tmp_path / ".test-seed0.tmp-99999").mkdir()  # a build killed earlier
    fail = True
    with pytest.raises(RuntimeError):
        build_world.build("test", root=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    fail = False
    assert build_world.build("test", root=tmp_path).root == tmp_path / "test-seed0"
    assert shapes.load_world("test", root=tmp_path).root == tmp_path / "test-seed0"  # what a run loads
    (tmp_path / "test-seed0" / "old-file").write_text("from the first build")
    build_world.build("test", root=tmp_path, force=True)
    assert not (tmp_path / "test-seed0" / "old-file").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".test-seed0.lock", "test-seed0"]


def test_shipped_world_loads_and_checks_every_file(tmp_path):
    """The default world ships in world/: the manifest lists every shipped model file with its SHA-256,
    the scenes unpack and render into the cache with the build's own checksums, and world/ is not written."""
    ship = shapes.SHIPPED / "default-seed0"
    stamps = {f: f.stat().st_mtime_ns for f in ship.rglob("*")}
    world = shapes.load_world("default", root=tmp_path, shipped=shapes.SHIPPED)
    assert world.root == ship and world.data == tmp_path / "shipped-default-seed0"
    files = json.loads((ship / "manifest.json").read_text())["files"]
    shipped_models = {str(f.relative_to(ship)) for f in ship.rglob("*") if f.is_file() and f.parent != ship}
    assert shipped_models == {rel for rel in files if shapes.is_model_file(rel)}  # no file goes unchecked
    assert set(files) - shipped_models == {"scenes.json", "images_train.npy", "images_val.npy", "images_test.npy"}
    assert shapes.manifest_problem(world.root, world.config, data=world.data) is None  # all of them, rendered too
    assert {f: f.stat().st_mtime_ns for f in ship.rglob("*")} == stamps
    assert sum(f.stat().st_size for f in ship.rglob("*")) < 25e6  # the size it ships at
    policy, _ = vlrm.load_policy(world.path("captioner"))  # fp16 files, fp32 models
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_a_corrupt_or_missing_world_says_how_to_build_it(world, tmp_path, capsys):
    """The tiny test world stands in for the shipped one. Shipped intact: its images, rendered from its
    scenes, equal the fresh build's. A file that fails its checksum: a run is told how to restore or build
    the world; once build_world.py has built it into the cache, that build is used, with a message. The
    shipped copy is never written. A world never built: the command that builds it."""
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    ship = build_world.ship_world(world, shipped)
    intact = shapes.load_world("test", root=cache, shipped=shipped)
    assert intact.root == ship
    for split in ("train", "val", "test"):
        assert np.array_equal(intact.images(split), world.images(split))
    weights = ship / "clip" / "open_clip_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    stamps = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in ship.rglob("*") if f.is_file()}
    with pytest.raises(shapes.WorldUnavailable, match=r"corrupt: clip/open_clip_model.safetensors.*git checkout -- "
                                                      r"world.*python build_world.py --preset test"):
        shapes.load_world("test", root=cache, shipped=shipped)
    shutil.copytree(world.root, cache / "test-seed0")  # what build_world.build would write there
    capsys.readouterr()
    built = shapes.load_world("test", root=cache, shipped=shipped)
    assert "corrupt: clip/open_clip_model.safetensors" in capsys.readouterr().err
    assert built.root == cache / "test-seed0" and shapes.manifest_problem(built.root, built.config) is None
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in ship.rglob("*") if f.is_file()} == stamps
    with pytest.raises(shapes.WorldUnavailable, match=r"not built.*python build_world.py --preset test --root"):
        shapes.load_world("test", root=tmp_path / "empty")
    proc = subprocess.run([sys.executable, "vlrm.py", "--world", "test", "--world-root", str(tmp_path / "empty")],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "python build_world.py --preset test" in proc.stderr


def test_world_report_shows_the_gap(world):
    """Relaxed form of the default world's targets: the tiny world is trained for seconds only."""
    r = world.report()
    assert r["n_test"] == len(world.scenes["test"]) == world.images("test").shape[0]
    assert r["base_mean_words"] <= 0.5 * r["rich_mean_words"]  # shallow captions
    assert r["lm_logprob_rich"] > r["lm_logprob_salad"]
    assert 0 <= r["base_r1_judge"] <= 1 and 0 <= r["ceiling_r1_judge"] <= 1
    for key in ("itm_roc_auc", "itm_roc_auc_short", "itm_position_pairwise", "position_pairwise_judge",
                "position_pairwise_reward_clip", "small_shape_pairwise_judge", "small_shape_pairwise_reward_clip",
                "itm_small_shape_pairwise"):
        assert 0 <= r[key] <= 1, key
    for probe in ("steal_colour", "steal_shape", "steal_position", "swap_colour", "swap_shape", "swap_position"):
        for key in (f"{probe}_pairwise_judge", f"{probe}_pairwise_reward_clip", f"itm_{probe}_pairwise"):
            assert 0 <= r[key] <= 1, key
    assert r["base_sampled_mean_words"] > 0


# ----------------------------------------------------------------------------------------------------
# Running it: smoke run, checkpoints, resume, stop, bad input
def test_smoke_run_writes_checkpoint_and_metrics(world_root, world, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "vlrm.py", *train_args(world_root, run, 4)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "reward/sequence" in l]
    assert [l["step"] for l in train_lines] == [2, 4]
    for key in ("reward/clip", "reward/itm", "reward/ref", "charts/return", "losses/value", "losses/policy",
                "charts/explained_variance", "charts/approx_kl", "charts/caption_len", "perf/steps_per_s"):
        assert all(np.isfinite(l[key]) for l in train_lines), key
    val = [l for l in lines if "val/judge_r1" in l]
    assert val and all(0 <= l["val/reward_r1"] <= 1 for l in val)  # the reward CLIP beside the judge
    # the checkpoint: plain transformers loads the policy; the trainable-only file loads on the base
    ckpt = run / "checkpoint"
    tuned = Blip2ForConditionalGeneration.from_pretrained(ckpt / "policy")
    state = torch.load(ckpt / "vlrm-trainable.pt")
    base = Blip2ForConditionalGeneration.from_pretrained(world.path("captioner"))
    result = base.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(state) == set(vlrm.trainable_parameters(base))
    for name, value in state.items():
        assert torch.equal(dict(tuned.named_parameters())[name], value)
    assert json.loads(json.dumps(torch.load(ckpt / "trainer.pt", weights_only=False)["config"]))["steps"] == 4


# the preset's KL on: the base must stay the start's; rloo: no critic in the checkpoint, K captions per image
@pytest.mark.parametrize("extra", [("--kl-coef", "0"), (), ("--baseline", "rloo", "--samples-per-image", "2")])
def test_resume_matches_an_uninterrupted_run(world_root, world, tmp_path, monkeypatch, capsys, extra):
    monkeypatch.setattr(vlrm.kernels, "BACKEND", "torch")
    vlrm.train(vlrm.parse_config(train_args(world_root, tmp_path / "full", 4, *extra)))
    vlrm.train(vlrm.parse_config(train_args(world_root, tmp_path / "cut", 2, *extra)))  # "killed" after step 2
    capsys.readouterr()
    vlrm.train(vlrm.parse_config(train_args(world_root, tmp_path / "cut", 4, "--resume", *extra)))
    assert "[warn] resuming" not in capsys.readouterr().out  # more steps is the same run
    full = torch.load(tmp_path / "full/checkpoint/vlrm-trainable.pt")
    cut = torch.load(tmp_path / "cut/checkpoint/vlrm-trainable.pt")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
             if "reward/sequence" in l]
    assert steps == [2, 4]  # nothing logged twice


def test_resume_with_other_settings_warns(world_root, world, tmp_path, monkeypatch, capsys):
    """A run started before a default changed, resumed with the new one, is told what changed."""
    monkeypatch.setattr(vlrm.kernels, "BACKEND", "torch")
    vlrm.train(vlrm.parse_config(train_args(world_root, tmp_path / "r", 2, "--kl-coef", "0")))
    capsys.readouterr()
    vlrm.train(vlrm.parse_config(train_args(world_root, tmp_path / "r", 3, "--resume")))
    assert "differ from the checkpoint's: kl_coef 0.0 -> 0.05;" in capsys.readouterr().out


def test_step_sampler_gives_ranks_disjoint_slices_and_resumes_exactly():
    n, bs, steps, ranks = 10, 2, 7, 2  # 28 draws: crosses two epoch boundaries
    runs = [list(vlrm.StepSampler(n, bs, 0, steps, seed=0, rank=r, world_size=ranks)) for r in range(ranks)]
    order = [i for s in range(steps) for r in range(ranks) for i in runs[r][s]]  # the combined batches, in order
    assert sorted(order[:n]) == sorted(order[n:2 * n]) == list(range(n))  # each epoch: every image once
    for start in range(steps):
        for r in range(ranks):
            assert list(vlrm.StepSampler(n, bs, start, steps, seed=0, rank=r, world_size=ranks)) == runs[r][start:]


def test_a_stop_signal_saves_and_stops(world_root, world, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 1 (no checkpoint due before step 100): the step finishes, is saved, the run stops."""
    monkeypatch.setattr(vlrm.kernels, "BACKEND", "torch")
    rollout = vlrm.rollout

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # train()'s handler only sets the stop flag
        return rollout(*args, **kwargs)
    monkeypatch.setattr(vlrm, "rollout", interrupted)
    run = tmp_path / "r"
    vlrm.train(vlrm.parse_config(train_args(world_root, run, 4, "--save-every", "100", "--kl-coef", "0")))
    assert "interrupted: checkpoint saved at step 1" in capsys.readouterr().out
    assert torch.load(run / "checkpoint/trainer.pt", weights_only=False)["step"] == 1


def test_skipped_steps_still_save_and_stop(world_root, world, tmp_path, capsys):
    """A batch with no readable image skips its update, not the step's bookkeeping: the last step's
    checkpoint is written even so, and train() hands the signal handlers back."""
    listing = tmp_path / "broken.txt"
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(b"not an image")
    listing.write_text("".join(f"{i}.png\n" for i in range(4)))
    handler = signal.getsignal(signal.SIGINT)
    vlrm.train(vlrm.parse_config(["--preset", "paper", "--policy", world.path("captioner"), "--itm", world.path("itm"),
                                  "--ref-lm", "policy", "--clip", world.path("clip"), "--images", str(listing),
                                  "--device", "cpu", "--steps", "2", "--batch-size", "2", "--num-workers", "0",
                                  "--run-dir", str(tmp_path / "run"), "--kernels", "torch"]))
    assert capsys.readouterr().out.count("no readable image in the batch") == 2
    trainer = torch.load(tmp_path / "run/checkpoint/trainer.pt", weights_only=False)
    assert trainer["step"] == 2 and trainer["skipped_images"] == 4
    assert signal.getsignal(signal.SIGINT) is handler


def test_checkpoint_writes_survive_leftovers(world, tmp_path):
    """A save killed while deleting checkpoint.old leaves it behind: the next save must still succeed."""
    policy, processor = vlrm.load_policy(world.path("captioner"))
    head = vlrm.ValueHead(policy.config.text_config.word_embed_proj_dim)
    opt = torch.optim.AdamW(head.parameters())
    cfg = vlrm.parse_config([])
    vlrm.save_checkpoint(tmp_path, policy, processor, head, opt, opt, 1, cfg, [vlrm.rng_state()])
    (tmp_path / "checkpoint.old" / "policy").mkdir(parents=True)  # beside the complete checkpoint/
    (tmp_path / "checkpoint.old" / "policy" / "stale").write_text("left over")
    vlrm.save_checkpoint(tmp_path, policy, processor, head, opt, opt, 2, cfg, [vlrm.rng_state()])
    assert torch.load(vlrm.find_checkpoint(tmp_path) / "trainer.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.tmp").exists()


def test_resume_drops_metric_lines_past_the_checkpoint_and_torn_ones(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10}\n{"step": 20}\n{"step": 30}\n{"step": 3')  # killed mid-line
    vlrm._truncate_metrics(log, 20)
    assert log.read_text() == '{"step": 10}\n{"step": 20}\n'


def test_readme_links_to_vlrm_lines_name_their_functions():
    """The README's "method in ten lines" links each function by line number: each link must still land
    on that function (or on the step it names), or the tutorial points at the wrong code."""
    lines = (REPO / "vlrm.py").read_text().splitlines()
    links = re.findall(r"\[`?([\w ]+?)`?\]\(vlrm\.py#L(\d+)\)", (REPO / "README.md").read_text())
    assert len(links) >= 10
    for name, line in links:
        target = lines[int(line) - 1]
        assert (f"def {name}(" in target or f"class {name}(" in target
                or (name.startswith("step ") and f"# {name}:" in target)), (name, line, target)


def test_a_config_resolves_in_one_place(world_root, world, tmp_path):
    """train(Config()) needs no command line: resolve_config fills what the flags would, and says what a
    Config lacks, before anything loads."""
    given = dict(world="test", world_root=str(world_root), steps=1, batch_size=4, max_new_tokens=6, val_size=8,
                 kernels="torch", run_dir=str(tmp_path / "r"))
    resolved = vlrm.resolve_config(vlrm.Config(**given))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in given.items()]
    assert resolved == vlrm.parse_config(flags) == vlrm.resolve_config(resolved)
    assert resolved.policy == world.path("captioner") and resolved.w_clip == vlrm.REWARDS["vlrm-rs"]["w_clip"]
    vlrm.train(vlrm.Config(**given))
    assert (tmp_path / "r/checkpoint/trainer.pt").is_file()
    with pytest.raises(vlrm.UsageError, match="--preset paper needs --images"):
        vlrm.train(vlrm.Config(preset="paper"))


def test_presets_fill_only_what_is_not_given():
    """shapes adds the entropy bonus and the KL penalty; paper keeps the paper's pure A2C; a flag, even 0, wins."""
    shapes_cfg = vlrm.parse_config([])
    paper_cfg = vlrm.parse_config(["--preset", "paper", "--images", "DIR"])
    assert (shapes_cfg.ent_coef, shapes_cfg.kl_coef) == (0.05, 0.05)
    assert (paper_cfg.ent_coef, paper_cfg.kl_coef) == (0.0, 0.0)
    assert vlrm.parse_config(["--kl-coef", "0"]).kl_coef == 0.0


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--kl-coef", "-0.1"], "--kl-coef must be 0 (off) or positive"),
    (["--reward", "clipscore"], "--reward must be one of"),
    (["--kernels", "cuda"], "--kernels must be one of"),
    (["--bad-phrases", "(unclosed"], "not a valid regular expression"),
    (["--preset", "paper"], "--preset paper needs --images"),
    (["--num-workers", "-1"], "--num-workers must be 0"),
    (["--itm-max-length", "0"], "--itm-max-length must be a positive integer"),
    (["--w-clip", "0", "--w-itm", "0", "--w-ref", "0"], "no reward to learn from"),
    (["--baseline", "rloo"], "--baseline rloo needs --samples-per-image 2 or more"),
    (["--baseline", "critic"], "--baseline must be one of value, rloo, batch"),
    (["--batch-size", "30", "--samples-per-image", "4"], "must be a multiple of --samples-per-image 4"),
])
def test_bad_values_exit_2(args, message):
    proc = subprocess.run([sys.executable, "vlrm.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr


def test_unknown_model_and_checkpoint_errors(world_root, world, tmp_path):
    env = run_env()
    proc = subprocess.run([sys.executable, "vlrm.py", *train_args(world_root, tmp_path / "r", 2), "--policy", "nobody/blip2-nothing"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nobody/blip2-nothing" in proc.stderr and "local folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "vlrm.py", *train_args(world_root, tmp_path / "none", 2, "--resume")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    bad = tmp_path / "bad" / "checkpoint"
    bad.mkdir(parents=True)
    (bad / "trainer.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "vlrm.py", *train_args(world_root, tmp_path / "bad", 2, "--resume")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unreadable" in proc.stderr
    assert (bad / "trainer.pt").read_bytes() == b"not a checkpoint"  # never overwritten


# ----------------------------------------------------------------------------------------------------
# The paper setting: real architecture, bf16, any folder of images, many ranks
def test_paper_architecture_trains_what_the_authors_released():
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(bench_paper.blip2_opt_2_7b_config())
    params = vlrm.trainable_parameters(model)
    assert sum(p.numel() for p in params.values()) == 107_130_880  # the released file's parameter count
    assert {n.split(".")[0] for n in params} == {"query_tokens", "qformer", "language_projection"}
    assert model.query_tokens.shape == (1, 32, 768)


def test_bf16_policy_keeps_fp32_trainable_weights(world):
    """The paper preset loads the policy in bf16; what is trained must stay fp32 (found on a GPU:
    a bf16 Q-Former met the fp32 projection with a dtype error)."""
    model, _ = vlrm.load_policy(world.path("captioner"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in vlrm.trainable_parameters(model).values())
    assert model.language_model.dtype == torch.bfloat16
    embeds = model.vision_model(torch.zeros(2, 3, 48, 48, dtype=torch.bfloat16)).last_hidden_state
    assert vlrm.soft_prefix(model, embeds).dtype == torch.bfloat16  # the frozen LM's dtype
    pixels = torch.zeros(2, 3, 48, 48, dtype=torch.bfloat16)
    assert model.generate(pixel_values=pixels, max_new_tokens=3).shape[0] == 2  # eval.py --bf16 captions so


def test_paper_preset_on_a_folder_of_images(world_root, world, tmp_path):
    """The paper preset's code path (hub-id-or-path loading, image folder, DataLoader workers) with the
    world's tiny models saved on disk; one unreadable file is skipped and counted, not fatal."""
    images = tmp_path / "images"
    images.mkdir()
    for i, arr in enumerate(world.images("train")[:6]):
        vlrm.Image.fromarray(np.array(arr)).resize((64, 80)).save(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    run = tmp_path / "run"
    args = ["--preset", "paper", "--policy", world.path("captioner"), "--itm", world.path("itm"),
            "--ref-lm", "policy", "--clip", world.path("clip"), "--images", str(images), "--device", "cpu",
            "--steps", "2", "--batch-size", "4", "--num-workers", "2", "--max-new-tokens", "8", "--log-every", "1",
            "--run-dir", str(run), "--kernels", "torch"]
    proc = subprocess.run([sys.executable, "vlrm.py", *args], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and lines[-1]["charts/skipped_images"] == 1
    assert {"reward/clip", "reward/itm", "reward/ref"} <= set(lines[-1])
    assert (run / "checkpoint" / "vlrm-trainable.pt").is_file()


def test_unreachable_clip_names_itself():
    with pytest.raises(vlrm.UsageError, match="ViT-L-14/openai"):
        vlrm.load_clip("ViT-L-14/openai")
    with pytest.raises(vlrm.UsageError, match="names no weights.*openai"):  # not random weights, silently
        vlrm.load_clip("ViT-B-32")


def test_openai_clip_weights_get_quick_gelu(monkeypatch):
    """OpenAI's CLIPs were trained with QuickGELU; open_clip 3 would build ViT-L-14 with GELU and only warn."""
    seen = {}

    def create(name, pretrained=None, **kwargs):
        seen[name] = kwargs.get("force_quick_gelu")
        raise RuntimeError("no download here")
    monkeypatch.setattr(vlrm.open_clip, "create_model_and_transforms", create)
    for spec in ("ViT-L-14/openai", "ViT-B-32/laion2b_s34b_b79k", "local-dir:/nowhere"):
        with pytest.raises(vlrm.UsageError):
            vlrm.load_clip(spec)
    assert seen == {"ViT-L-14": True, "ViT-B-32": False, "local-dir:/nowhere": False}


def test_image_list_paths_start_from_the_list_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    vlrm.Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    listing = tmp_path / "train.txt"
    listing.write_text("imgs/a.png\n\n")
    data = vlrm.ImageFiles(str(listing), 16)
    assert len(data) == 1 and data[0].shape == (16, 16, 3)
    listing.write_text("imgs/a.png\nimgs/gone.png\n")
    with pytest.raises(vlrm.UsageError, match="lists 1 files that do not exist.*gone.png"):
        vlrm.ImageFiles(str(listing), 16)


def _rank_losses(rank, world_size, port, captioner, out, baseline):
    """One rank of the gloo test: its half of a fixed batch, global normalisation, summed gradients.
    rloo: the 8 captions are 4 images x 2 samples, so each rank holds whole groups."""
    import torch.distributed as dist
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model, _ = vlrm.load_policy(captioner)
    params = vlrm.trainable_parameters(model)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    value_head = vlrm.ValueHead(model.config.text_config.word_embed_proj_dim)
    px = pixels(np.load(Path(captioner).parent / "images_test.npy")[:8])
    with torch.no_grad():
        embeds = model.vision_model(px).last_hidden_state
        torch.manual_seed(1)
        tokens, mask = vlrm.rollout(model, vlrm.soft_prefix(model, embeds), max_new_tokens=8)
    returns = torch.linspace(-1, 1, 8)[:, None].expand_as(mask) * mask
    part = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    W = model.language_model.get_output_embeddings().weight
    hidden = vlrm.caption_states(model, vlrm.soft_prefix(model, embeds[part]), tokens[part])
    mask, returns, n_valid = mask[part], returns[part], vlrm.all_sum(mask[part].sum())
    values = value_head(hidden.detach())
    if baseline == "value":
        b = values.detach()
    elif baseline == "rloo":
        b = vlrm.leave_one_out_baseline(returns, mask, 2)
    else:
        b = vlrm.batch_baseline(returns, mask, vlrm.all_sum)
    advantages = vlrm.scaled_advantages(returns, b, mask, vlrm.all_sum)
    valid = mask.bool()
    logp, entropy = vlrm.kernels.fused_logprob(hidden[valid], W, tokens[part][valid], with_entropy=True)
    total = (vlrm.actor_loss(logp, entropy, advantages[valid], 0.01, n_valid)["loss"]
             + vlrm.critic_loss(values, returns, mask, n_valid))
    total.backward()
    vlrm.sync_gradients(list(params.values()) + list(value_head.parameters()))
    loss = vlrm.all_sum(total.detach())
    torch.save({"loss": loss, "grads": {n: p.grad for n, p in params.items()}}, f"{out}.{rank}")
    if world_size > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("baseline", vlrm.BASELINES)
def test_two_gloo_ranks_match_one_process_on_the_combined_batch(world, tmp_path, baseline):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    _rank_losses(0, 1, port, world.path("captioner"), out + "-single", baseline)
    torch.multiprocessing.spawn(_rank_losses, args=(2, port, world.path("captioner"), out, baseline), nprocs=2)
    single, ranks = torch.load(out + "-single.0"), [torch.load(f"{out}.{r}") for r in range(2)]
    for r in ranks:
        assert torch.allclose(r["loss"], single["loss"], atol=1e-5)
        for name, g in single["grads"].items():
            assert torch.allclose(r["grads"][name], g, atol=1e-5), name


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "vlrm.py"]


def test_torchrun_two_ranks_end_to_end(world_root, world, tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.run(TORCHRUN + train_args(world_root, run, 2), cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # includes the ranks' weight-checksum agreement check
    assert (run / "checkpoint" / "vlrm-trainable.pt").is_file()
    assert len(torch.load(run / "checkpoint" / "trainer.pt", weights_only=False)["rng"]) == 2


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc; the field after the parenthesised name is the ppid)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
    return pids


def test_torchrun_stop_signal_to_one_rank_stops_both_at_one_step(world_root, world, tmp_path):
    """SIGTERM to rank 1 alone, the extreme of a signal that reaches the ranks at different moments: both
    ranks stop after the same step (any_rank), save it (no periodic save is due), exit cleanly, and a
    --resume run carries on from there. Without the agreement the ranks' collectives part and the run hangs."""
    run, out, err = tmp_path / "ddp", tmp_path / "stdout", tmp_path / "stderr"  # files: no pipe to fill while we wait
    args = train_args(world_root, run, 100_000, "--save-every", "100000", "--val-every", "100000")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(TORCHRUN + args, cwd=REPO, env=run_env(), stdout=stdout, stderr=stderr)
    try:
        metrics, deadline = run / "metrics.jsonl", time.time() + 300
        while not (metrics.is_file() and metrics.stat().st_size) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # the first metrics line: both ranks are in the loop
        assert proc.poll() is None, err.read_text()[-3000:]
        workers = child_pids(proc.pid)
        rank1 = [pid for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGTERM)
        proc.wait(timeout=120)
    except BaseException:  # a hang or a failure: leave no worker running (killing torchrun would not)
        for pid in child_pids(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        raise
    finally:
        proc.kill()  # a no-op once it has exited
        proc.wait()
    assert proc.returncode == 0, err.read_text()[-3000:]
    step = torch.load(run / "checkpoint" / "trainer.pt", weights_only=False)["step"]
    assert f"interrupted: checkpoint saved at step {step}" in out.read_text() and 2 <= step < 100_000
    resumed = subprocess.run(TORCHRUN + train_args(world_root, run, step + 2, "--resume"), cwd=REPO, env=run_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoint" / "trainer.pt", weights_only=False)["step"] == step + 2
