"""What the diagnostics scripts share: the vlrm-rs reward as vlrm.py computes it, the teacher-forced
caption loss, and sampling how a captioner goes on from a given text. Not a script; the scripts beside
it import it."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import vlrm  # noqa: E402


def vlrm_rs_reward(world, policy, tokenizer):
    """(images uint8 (B, H, W, 3), captions) -> (B,) sequence reward with the vlrm-rs weights and the
    shapes preset's ITM text limit and the world's reference OPT, as vlrm.train has them."""
    weights = vlrm.REWARDS["vlrm-rs"]
    clip = vlrm.clip_reward(str(world.path("clip")), "cpu")
    itm = vlrm.itm_reward(str(world.path("itm")), vlrm.PRESETS["shapes"]["itm_max_length"], "cpu", torch.float32)
    ref = vlrm.ref_lm_reward(world.path("ref_lm"), policy, tokenizer, "cpu", torch.float32)
    return lambda images, captions: (weights["w_clip"] * clip(images, captions) + weights["w_itm"] * itm(images, captions)
                                     + weights["w_ref"] * ref(images, captions))


def caption_loss(policy, tokenizer, feats, captions) -> torch.Tensor:
    """Mean cross-entropy of `captions` (each ending in EOS) given ViT features (B, 1 + P, W), through the
    same teacher-forced forward as vlrm's actor update (caption_states)."""
    enc = tokenizer([c + tokenizer.eos_token for c in captions], padding=True, return_tensors="pt",
                    add_special_tokens=False)
    hidden = vlrm.caption_states(policy, vlrm.soft_prefix(policy, feats), enc["input_ids"])
    logits = policy.language_model.lm_head(hidden)  # (B, T, V)
    mask = enc["attention_mask"].float()
    return (F.cross_entropy(logits.transpose(1, 2), enc["input_ids"], reduction="none") * mask).sum() / mask.sum()


@torch.no_grad()
def continue_from(policy, tokenizer, image_embeds, stem: str, max_new_tokens: int) -> str:
    """Sample (temperature 1, as in vlrm's rollouts) what the captioner writes after `stem`, given one
    image's ViT features (1, 1 + P, W); returns the new text only. One image per call: stems differ in
    length, and none is padded."""
    ids = torch.tensor([tokenizer(stem, add_special_tokens=False)["input_ids"]])
    embeds = vlrm._prompt(policy, vlrm.soft_prefix(policy, image_embeds), ids)
    text_cfg = policy.config.text_config
    out = policy.language_model.generate(inputs_embeds=embeds, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                         max_new_tokens=max_new_tokens, eos_token_id=text_cfg.eos_token_id,
                                         pad_token_id=text_cfg.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
