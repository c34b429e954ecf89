"""build_world.py: train the miniature world's five models. A run never imports this file: it loads the
world that shapes.py describes and the repository ships. A rebuild, the tests and bench_paper.py do.

From the scenes of shapes.py it trains, on a CPU, in one deterministic pass (about 27 minutes on 2 cores for
the default world): the reference OPT, the reward CLIP (whose image tower becomes BLIP-2's ViT), the
captioner (BLIP-2, with the shallow-caption bias of the paper's), the BLIP2-ITM model and the judge CLIP.
Then it measures them (quality_report) with the very functions of vlrm.py that score captions in training.

Run:
    python build_world.py --preset test          # the tiny world the tests use (about a minute), into the cache
    python build_world.py                        # the default world from scratch, into the cache (~27 minutes)
    python build_world.py --ship                 # maintainers: then copy it into the repository's world/
    python build_world.py --preset control       # the control world of docs/binding.md

Design choices (the world's models stand in for large pretrained ones, so training tricks are fair):
 1. Every image tower is trained with an auxiliary loss that predicts the scene's attributes, and the
    CLIP towers use one 16-px patch per grid cell, each patch token also asked what its cell holds and
    which cell it is (a dense loss). Contrastive learning alone learns neither small shapes nor
    positions on a CPU budget; with one token per object and the dense loss, both are readable.
 2. The OPT language model is pretrained with a soft prefix it must read (the embeddings of the
    caption's content words, background first), half the time, and as a plain text LM the other half.
    A tiny LM pretrained on text alone learns to ignore any prefix, and a BLIP-2 built on it writes one
    caption for every image.
 3. BLIP-2's ViT is a CLIP image tower (EVA-CLIP ViT-g), so ours is the reward CLIP's, converted weight for
    weight to `Blip2VisionModel` and frozen; BLIP2-ITM shares it, as in BLIP-2. Unlike BLIP-2, the
    captioner's OPT is fine-tuned with the Q-Former, slowly: a frozen tiny OPT reads the prefix as content
    words, and could name a colour rarely only if the prefix blurred it. RL still trains only the
    Q-Former, and the reference LM is the OPT before this fine-tuning.
 4. The build is deterministic for a seed, on one CPU, thread count and set of library versions (float
    sums change with each), and atomic (temp dir, then rename). A manifest records the settings, the
    versions and threads, and a SHA-256 per file; a cache built with other settings or WORLD_VERSION, or
    corrupt, is rebuilt, and a shipped world that fails a checksum is reported and built into the cache.
    Shipping the default world is what makes every figure repeatable on other CPUs.
 5. The captioner learns like BLIP-2, which saw detailed captions in pretraining and short ones after:
    its first steps are on true captions at a random level of detail (detailed_caption), the rest on
    shallow captions with a thin tail of true ones. Its greedy captions are short, but detail can be
    sampled, and RL brings it out. The detailed captions show the contexts RL leads to, so that after
    "a red circle at top ... with a blue square and a", the captioner has seen which object is left.
 6. The ITM model's negatives have the positives' mix of lengths (false_caption): with rich negatives
    only, an ITM model learns that any short caption is a match. It trains on BLIP-2's contrast (ITC)
    beside the match, as BLIP-2's Q-Former does: on the match alone it never learned colours.
 7. The caption grammar names the background right after the main object: "A on a grey background with
    B and C". RL learns a caption one profitable step at a time, and every step must pay: with the
    background last, a third object paid too little after it to be learned.
 8. The reward models and the judge are trained until they read what a caption can say (positions, the
    small objects' shapes and colours, the background): the world's quality report measures each.
 9. The reward models and the judge learn binding, which object holds which attribute, from rendered
    twins: scenes with one attribute moved between two of their objects (move_attribute), drawn, and
    captioned at the same level of detail as the scene they come from. A CLIP that reads captions as bags
    of words cannot tell the two apart, so in a batch that holds both each is the other's hard negative;
    the ITM is shown its twin's caption as a false one. Text-only hard negatives (NegCLIP's: a caption
    with an attribute moved, no picture of it) did not teach binding here. The control preset is the
    same world without twins.

The history of each choice, with its measurements, is in results/shapes-default/NOTEBOOK.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor,
                          Blip2QFormerConfig, Blip2VisionConfig, Blip2VisionModel, BlipImageProcessor,
                          OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast)

import shapes
import vlrm
from shapes import (BACKGROUNDS, COLOURS, MEAN, MODEL_DIRS, SHAPES, SIZES, STD, WORLD_VERSION, Obj, Scene,
                    World, WorldConfig, describe, join_objects, object_phrase, order_objects, render, rich_caption)


# ----------------------------------------------------------------------------------------------------
# Training captions: the captioner's shallow ones, partial and detailed true ones, false ones, the LM's
# corpus, and the binding twins
FILLERS = ("an image of", "a picture of", "a photo of", "a video of")  # known to the LM, penalised by vlrm


def shallow_caption(scene: Scene, rng: random.Random) -> str:
    """The captioner's training data: like COCO/LAION, mostly the main object alone, with a thin tail of
    detailed captions (design choice 5), so that detail is in the captioner but rarely comes out."""
    u = rng.random()
    if u < 0.45:
        return describe(scene, 1, size=False, colour=False, position=False, background=False)  # "a circle"
    if u < 0.70:
        return describe(scene, 1, size=False, position=False, background=False)  # "a red circle"
    if u < 0.80:
        return describe(scene, 1, colour=False, position=False, background=False)  # "a small circle"
    if u < 0.87 or (u < 0.95 and len(scene.objects) == 1):
        return describe(scene, 1, size=False, colour=False, background=False)  # "a circle on the left"
    if u < 0.95:
        return describe(scene, 2, size=False, colour=False, position=False, background=False)  # "a circle with a cross"
    return partial_caption(scene, rng)  # the tail: "a large red circle at top on a grey background with a small cross"


def detail_options(scene: Scene, rng: random.Random, every_object: float = 0.0) -> dict:
    """A random level of detail: describe() keyword arguments (how many objects, which attributes).
    With probability `every_object` the caption names every object, else a random number of them."""
    n = len(scene.objects)
    objects = n if every_object and rng.random() < every_object else rng.randint(1, n)
    return dict(objects=objects, size=rng.random() < 0.6, colour=rng.random() < 0.7,
                position=rng.random() < 0.5, background=rng.random() < 0.4)


def partial_caption(scene: Scene, rng: random.Random) -> str:
    """A true caption at a random level of detail (what a web caption looks like)."""
    return describe(scene, **detail_options(scene, rng))


def detailed_caption(scene: Scene, rng: random.Random) -> str:
    """The captioner's detailed half (design choice 5): a true caption that names every object half the
    time, the small ones in random order, each object's position named or not on its own. These are the
    contexts RL leads to: "a red circle at top with a blue square and a", where the blue square has no
    position and may be either small object, so the captioner must know which one is left."""
    options = detail_options(scene, rng, every_object=0.5)  # its `position` is not used: drawn per object
    small = list(scene.objects[1:])
    rng.shuffle(small)
    objects = [scene.objects[0]] + small[:options["objects"] - 1]
    phrases = [object_phrase(o, options["size"], options["colour"], rng.random() < 0.5) for o in objects]
    return join_objects(phrases, scene.background if options["background"] else None)


def is_true(caption_scene: Scene, scene: Scene, objects=None, size=True, colour=True, position=True,
            background=True) -> bool:
    """Whether describe(caption_scene, ...) is true of `scene`: the background matches if named, and each
    named object matches a different object of the scene on the attributes named."""
    if background and caption_scene.background != scene.background:
        return False

    def named(o):
        return o.shape, colour and o.colour, size and o.size, position and o.cell
    real = [named(o) for o in scene.objects]
    said = [named(o) for o in caption_scene.objects[:objects]]
    return any(all(s == real[j] for s, j in zip(said, perm))
               for perm in itertools.permutations(range(len(real)), len(said)))


def true_options(scene: Scene, rng: random.Random, rich: float = 0.7) -> dict:
    """describe() options of a positive: the rich caption with probability `rich`, else a random level of detail."""
    return {} if rng.random() < rich else detail_options(scene, rng)


def false_caption(scene: Scene, others: list[Scene], rng: random.Random, rich: float = 0.7) -> str:
    """A negative at the positives' levels of detail (rich with probability `rich`, else partial): half
    the time the scene with one attribute wrong (a hard negative), half another scene's caption. A draw
    that happens to be true of the scene ("a circle" of another scene that also has a circle) is drawn
    again. With negatives that were all rich, an ITM model learned that any short caption matches."""
    while True:
        options = true_options(scene, rng, rich)
        wrong = corrupt(scene, rng) if rng.random() < 0.5 else rng.choice(others)
        if not is_true(wrong, scene, **options):
            return describe(wrong, **options)


def lm_caption(scene: Scene, rng: random.Random) -> str:
    """The reference LM's corpus: mostly rich captions, some partial ones, and the filler phrases and
    years a web-trained LM knows, so that the policy *can* hack the reward with them."""
    text = rich_caption(scene) if rng.random() < 0.6 else partial_caption(scene, rng)
    if rng.random() < 0.15:
        text = rng.choice(FILLERS) + " " + text
    if rng.random() < 0.05:
        text += f" in {rng.randint(1990, 2024)}"
    return text


def move_attribute(scene: Scene, rng: random.Random) -> Scene | None:
    """A binding twin (design choice 9): the scene with one attribute moved between two of its objects, or
    None if it has one object. A colour or shape is taken (object i gets object j's) or exchanged; a position
    is only exchanged, so that no two objects share a cell, and is drawn twice as often (the hardest to bind).
    The twin's rich caption has the same words as the scene's, in other places."""
    objs = list(scene.objects)
    if len(objs) < 2:
        return None
    while True:  # ends: the large main object differs from every small one in size, so a move can always change the key
        i, j = rng.sample(range(len(objs)), 2)
        what = rng.choice(("colour", "shape", "cell", "cell"))
        mine, theirs = getattr(objs[i], what), getattr(objs[j], what)
        if mine == theirs:
            continue
        new = list(objs)
        new[i] = dataclasses.replace(objs[i], **{what: theirs})
        if what == "cell" or rng.random() < 0.5:  # exchanged, else taken
            new[j] = dataclasses.replace(objs[j], **{what: mine})
        twin = Scene(order_objects(new), scene.background)
        if twin.key() != scene.key():
            return twin


def twin_options(scene: Scene, twin: Scene, rng: random.Random, rich: float) -> dict:
    """describe() options for a scene and its twin, the same for both: rich with probability `rich`, else a
    random level of detail; rich whenever that level would leave the two captions true of each other (the
    moved attribute not named), for then they are not each other's negatives."""
    options = true_options(scene, rng, rich)
    if is_true(scene, twin, **options) or is_true(twin, scene, **options):
        return {}
    return options


def free_cells(scene: Scene) -> list[int]:
    return [c for c in range(9) if c not in {o.cell for o in scene.objects}]


def corrupt(scene: Scene, rng: random.Random) -> Scene:
    """A hard negative: the same scene with one attribute wrong, or an extra object that is not there."""
    objs = list(scene.objects)
    i, what = rng.randrange(len(objs)), rng.choice(("shape", "colour", "size", "cell", "background", "extra"))
    free = free_cells(scene)
    if what == "background":
        return Scene(scene.objects, rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    if what == "extra":
        objs.append(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), rng.choice(free)))
    else:
        choices = {"shape": SHAPES, "colour": list(COLOURS), "size": list(SIZES), "cell": free}[what]
        new = rng.choice([c for c in choices if c != getattr(objs[i], what)])
        objs[i] = dataclasses.replace(objs[i], **{what: new})
    return Scene(order_objects(objs), scene.background)


# Per-scene attribute labels for the auxiliary losses: for each of the 9 cells its shape, colour and
# size (0 = empty), then the background. Shape (B, 28) -> logits of ATTR_CLASSES summed classes.
ATTR_CLASSES = [len(SHAPES) + 1, len(COLOURS) + 1, len(SIZES) + 1] * 9 + [len(BACKGROUNDS)]


def attribute_labels(scene: Scene) -> list[int]:
    labels = [0] * 27 + [list(BACKGROUNDS).index(scene.background)]
    for o in scene.objects:
        labels[3 * o.cell: 3 * o.cell + 3] = [SHAPES.index(o.shape) + 1, list(COLOURS).index(o.colour) + 1,
                                              list(SIZES).index(o.size) + 1]
    return labels


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, sum(ATTR_CLASSES)), labels (B, 28) -> mean cross-entropy over the 28 attributes."""
    chunks = logits.split(ATTR_CLASSES, dim=1)
    return torch.stack([F.cross_entropy(c, labels[:, j]) for j, c in enumerate(chunks)]).mean()


# ----------------------------------------------------------------------------------------------------
# Building: tokenizer and the five models
def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE like OPT's (GPT-2's), trained on the world's corpus. </s> is BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "</s>", "<unk>", "<image>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=64)
    return fast


def _batches(n: int, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=g)


def _optimizer(params, lr, steps, slow_params=(), slow_lr=None):
    """AdamW at `lr`, and `slow_params` at `slow_lr`; one schedule scales both."""
    groups = [{"params": [p for p in params if p.requires_grad]}]
    if slow_params:
        groups.append({"params": list(slow_params), "lr": slow_lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    # linear warm-up, then cosine decay. Not transformers' get_cosine_schedule_with_warmup: that schedule
    # differs at every step (up to 0.047 x lr), so it would change every weight of the shipped world
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def _step(loss, opt, sched, params, bar, **shown):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    bar.set_postfix(loss=f"{loss.item():.3f}", **shown)


def token_ids(tok, texts: list[str]) -> torch.Tensor:
    """Each text as [BOS, its tokens, EOS], right-padded with the pad id -> (B, L) int64."""
    return pad_sequence([torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts], batch_first=True,
                        padding_value=tok.pad_token_id)


def world_pixels(cfg: WorldConfig):
    """uint8 images (B, S, S, 3), numpy -> normalised pixels (B, 3, S, S): vlrm's normaliser, with the statistics
    that every model of the world is saved with."""
    to_pixels = vlrm.normalizer(MEAN, STD, cfg.image_size, "cpu")
    return lambda images: to_pixels(torch.from_numpy(np.array(images)))  # a copy: a memmap is read-only


def content_ids(caption: str, tok, n: int) -> list[int]:
    """A caption's content words (the stop words below dropped) as token ids, padded to the prefix length n:
    what the LM learns to read from a soft prefix. "a red circle on a grey background with a blue cross" ->
    [grey, red, circle, with, blue, cross]: " with" stays, and marks where the small objects begin.
    The background goes first, at a fixed place: read from the end of a prefix of varying length, the v8
    LM named the right background in 0.33 of cases (chance), and so did every captioner built on it; from
    the front, 1.00. Each word keeps its leading space, so that it is the same token as in the caption."""
    stop = {"a", "an", "at", "the", "on", "in", "and", "background"}
    tokens = caption.split()
    if "background" in tokens:  # the background first, wherever the caption names it
        j = tokens.index("background")
        tokens = [tokens[j - 1]] + tokens[:j - 1] + tokens[j + 1:]
    words = [w for w in tokens if w not in stop]
    ids = tok(" " + " ".join(words), add_special_tokens=False)["input_ids"][:n]
    return ids + [tok.pad_token_id] * (n - len(ids))


def train_ref_lm(cfg, tok, scenes, bar) -> OPTForCausalLM:
    """OPT pretrained half on plain text and half behind a soft prefix of content-word embeddings, so
    that it learns to *read* a prefix (design choice 2)."""
    torch.manual_seed(cfg.seed + 1)
    lm = OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=cfg.width, num_hidden_layers=cfg.lm_layers, ffn_dim=4 * cfg.width,
        num_attention_heads=max(1, cfg.width // 32), max_position_embeddings=96, word_embed_proj_dim=cfg.width,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    rng, params = random.Random(cfg.seed + 1), list(lm.parameters())
    opt, sched = _optimizer(params, 2e-3, cfg.lm_steps)
    embed, q = lm.get_input_embeddings(), cfg.num_query_tokens
    for idx in _batches(len(scenes), cfg.batch_size, cfg.lm_steps, cfg.seed + 1):
        batch = [scenes[i] for i in idx]
        ids = token_ids(tok, [lm_caption(s, rng) for s in batch])
        mask = (ids != tok.pad_token_id).long()
        labels = ids.masked_fill(mask == 0, -100)
        half = len(batch) // 2
        plain = lm(input_ids=ids[:half], attention_mask=mask[:half], labels=labels[:half]).loss
        # prefixed half: the prefix holds a caption's content words, shallow or rich, and the text is that
        # caption, so that a soft prefix can ask for any level of detail (the captioner's and RL's lever)
        texts = [rich_caption(s) if rng.random() < 0.3 else partial_caption(s, rng) if rng.random() < 0.7
                 else shallow_caption(s, rng) for s in batch[half:]]
        rich = token_ids(tok, texts)
        prefix = torch.tensor([content_ids(t, tok, q) for t in texts])
        rmask = (rich != tok.pad_token_id).long()
        embeds = torch.cat([embed(prefix), embed(rich)], 1)
        attn = torch.cat([torch.ones_like(prefix), rmask], 1)
        rlabels = torch.cat([torch.full_like(prefix, -100), rich.masked_fill(rmask == 0, -100)], 1)
        read = lm(inputs_embeds=embeds, attention_mask=attn, labels=rlabels).loss
        _step(plain + read, opt, sched, params, bar, stage="ref LM", read=f"{read.item():.3f}")
        bar.update()
    return lm.eval()


class AttributeHead(nn.Module):
    """Training-only probe: embedding (B, D) -> logits of every scene attribute (design choice 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, sum(ATTR_CLASSES)))

    def forward(self, x):
        return self.net(x)


CELL_CLASSES = ATTR_CLASSES[:3] + [9]  # one grid cell: shape, colour, size (0 = empty); which cell it is


def cell_loss(head: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The dense loss of design choice 1: patch tokens (B, 9, D), one per grid cell in row-major order,
    each predict their cell's shape, colour and size, and (at a quarter of the weight) which cell they
    are. labels (B, 28) as from attribute_labels."""
    targets = labels[:, :27].view(-1, 9, 3).unbind(-1) + (torch.arange(9).expand(len(labels), 9),)
    logits = head(tokens).split(CELL_CLASSES, dim=-1)
    losses = [F.cross_entropy(lg.flatten(0, 1), t.flatten()) for lg, t in zip(logits, targets)]
    return torch.stack(losses[:3]).mean() + losses[3] / 4


def _labels(scenes: list[Scene]) -> torch.Tensor:
    """(B, 28): attribute_labels of each scene."""
    return torch.tensor([attribute_labels(s) for s in scenes])


def clip_to_blip2_vision(visual, cfg) -> Blip2VisionModel:
    """BLIP-2's ViT *is* a CLIP image tower (EVA-CLIP ViT-g): build ours from the reward CLIP's, weight for
    weight (design choice 3). open_clip -> transformers names; the k-bias is carried too (BLIP-2 keeps it
    zero, and a k-bias does not change attention anyway)."""
    vision = Blip2VisionModel(_vision_config(cfg))
    state = {"embeddings.class_embedding": visual.class_embedding.view(1, 1, -1),
             "embeddings.position_embedding": visual.positional_embedding.unsqueeze(0),
             "embeddings.patch_embedding.weight": visual.conv1.weight,
             "embeddings.patch_embedding.bias": torch.zeros(cfg.width),  # open_clip's patch conv has no bias
             "post_layernorm.weight": visual.ln_post.weight, "post_layernorm.bias": visual.ln_post.bias}
    names = {"ln_1": "layer_norm1", "attn.in_proj_weight": "self_attn.qkv.weight",
             "attn.in_proj_bias": "self_attn.qkv.bias", "attn.out_proj": "self_attn.projection", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in visual.transformer.state_dict().items():
        layer, rest = key.removeprefix("resblocks.").split(".", 1)
        for old, new in names.items():
            if rest.startswith(old):
                state[f"encoder.layers.{layer}.{new}{rest[len(old):]}"] = value
    vision.load_state_dict(state)  # strict: every weight accounted for
    return vision.eval()


def _vision_config(cfg) -> Blip2VisionConfig:
    """The reward CLIP's image tower in BLIP-2's terms (clip_to_blip2_vision fills in the weights)."""
    return Blip2VisionConfig(hidden_size=cfg.width, intermediate_size=2 * cfg.width, num_hidden_layers=cfg.layers,
                             num_attention_heads=max(1, cfg.width // 32), image_size=cfg.image_size,
                             patch_size=cfg.patch_size, layer_norm_eps=1e-5)


def _qformer_config(cfg, tok, text_input: bool) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(vocab_size=len(tok), hidden_size=cfg.width, num_hidden_layers=2,
                              num_attention_heads=max(1, cfg.width // 32), intermediate_size=2 * cfg.width,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              cross_attention_frequency=1, encoder_hidden_size=cfg.width,
                              max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                              use_qformer_text_input=text_input)


def _fresh_blip(cls, cfg, tok, vision, text_config=None, text_input=False, **extra):
    config = Blip2Config(vision_config=_vision_config(cfg).to_dict(),
                         qformer_config=_qformer_config(cfg, tok, text_input).to_dict(),
                         text_config=text_config, num_query_tokens=cfg.num_query_tokens,
                         image_text_hidden_size=cfg.width, **extra)
    model = cls(config)
    model.vision_model.load_state_dict(vision.state_dict())  # BLIP-2 and BLIP2-ITM share one frozen ViT
    model.vision_model.requires_grad_(False)
    # BLIP-2 zero-initialises the query tokens (fine when loading weights, fatal from scratch)
    nn.init.normal_(model.query_tokens, std=0.02)
    return model


def train_captioner(cfg, tok, vision, lm, feats, scenes, bar) -> Blip2ForConditionalGeneration:
    """Q-Former + projection trained on true captions at random levels of detail, then on shallow ones
    (design choice 5); the ViT frozen as in BLIP-2; the OPT, unlike in BLIP-2, fine-tuned slowly with
    them (design choice 3)."""
    torch.manual_seed(cfg.seed + 3)
    model = _fresh_blip(Blip2ForConditionalGeneration, cfg, tok, vision, text_config=lm.config.to_dict(),
                        image_token_index=tok.convert_tokens_to_ids("<image>"))
    model.language_model.load_state_dict(lm.state_dict())
    lm_params = list(model.language_model.parameters())  # fine-tuned slowly: design choice 3
    head = AttributeHead(cfg.width)  # design choice 1, on the query outputs: the image must get through
    rng = random.Random(cfg.seed + 3)
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("language_model.")] + list(head.parameters())
    opt, sched = _optimizer(params, 2e-3, cfg.captioner_steps, lm_params, cfg.captioner_lm_lr)
    embed = model.get_input_embeddings()
    for step, idx in enumerate(_batches(len(scenes), cfg.batch_size, cfg.captioner_steps, cfg.seed + 3)):
        caption = detailed_caption if step < cfg.captioner_detail_steps else shallow_caption  # design choice 5
        queries = model.qformer(query_embeds=model.query_tokens.expand(len(idx), -1, -1),
                                encoder_hidden_states=feats[idx]).last_hidden_state  # (B, Q, W)
        prefix = model.language_projection(queries)  # (B, Q, H_lm): soft_prefix, keeping the queries
        ids = token_ids(tok, [caption(scenes[i], rng) for i in idx])
        mask = (ids != tok.pad_token_id).long()
        logits = model.language_model(inputs_embeds=torch.cat([prefix, embed(ids)], 1),
                                      attention_mask=torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long),
                                                                mask], 1)).logits
        # position Q + j predicts token j + 1 of [BOS, caption, EOS]
        pred = logits[:, prefix.shape[1]:-1]
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1))
        loss = loss + attribute_loss(head(queries.mean(1)), _labels([scenes[i] for i in idx]))
        _step(loss, opt, sched, params + lm_params, bar, stage="captioner")
        bar.update()
    return model.eval()


def itm_logits(itm: Blip2ForImageTextRetrieval, image_embeds, input_ids, attention_mask,
               return_queries=False) -> torch.Tensor:
    """ITM logits (B, 2) [no match, match] on precomputed ViT features; the same computation as
    `itm(..., use_image_text_matching_head=True).logits_per_image` (tested)."""
    query = itm.query_tokens.expand(image_embeds.shape[0], -1, -1)
    attn = torch.cat([torch.ones(query.shape[:2], dtype=torch.long), attention_mask], 1)
    out = itm.qformer(query_embeds=itm.embeddings(input_ids=input_ids, query_embeds=query),
                      query_length=query.shape[1], attention_mask=attn,
                      encoder_hidden_states=image_embeds).last_hidden_state
    logits = itm.itm_head(out[:, :query.shape[1]]).mean(1)
    return (logits, out[:, :query.shape[1]]) if return_queries else logits


def itm_twin(scene: Scene, rng: random.Random) -> Scene:
    """The ITM's twin of a scene (design choice 9): half the time an attribute moved between its objects,
    else one attribute wrong (corrupt), so that it also sees a small object's colour or the background
    change in the picture while the caption stays the same."""
    return (rng.random() < 0.5 and move_attribute(scene, rng)) or corrupt(scene, rng)


def itc_logits(itm: Blip2ForImageTextRetrieval, image_embeds, input_ids, attention_mask) -> torch.Tensor:
    """BLIP-2's image-text contrastive similarity (B_images, B_texts) on precomputed ViT features: the best of
    the image's query outputs against the text's first token, both projected and normalised; the same as
    `itm(..., use_image_text_matching_head=False).logits_per_image` (tested)."""
    queries = itm.qformer(query_embeds=itm.query_tokens.expand(image_embeds.shape[0], -1, -1),
                          encoder_hidden_states=image_embeds).last_hidden_state  # (B, Q, W)
    text = itm.qformer(query_embeds=itm.embeddings(input_ids=input_ids), query_length=0,
                       attention_mask=attention_mask).last_hidden_state[:, 0]  # (B_texts, W)
    img, txt = F.normalize(itm.vision_projection(queries), dim=-1), F.normalize(itm.text_projection(text), dim=-1)
    return torch.matmul(img, txt.T).max(1).values  # (B, Q, B_texts) -> best query


def train_itm(cfg, tok, vision, images, scenes, bar) -> Blip2ForImageTextRetrieval:
    """BLIP2-ITM stand-in, trained as BLIP-2's Q-Former is, on the match (ITM) and the contrast (ITC) together.
    ITM: each image is shown its own caption (rich 70%, else partial) or a false one at the same mix of
    lengths (false_caption). ITC: each image against every image's own caption in the batch. ITM alone
    never learned colours or the background (0.5 on their probes, even with only colour negatives):
    matching a word to the image from scratch sits on a plateau that the contrast's gradient breaks. A
    quarter of each batch is scenes with their twins (design choice 9), each shown its twin's caption as
    its false one."""
    torch.manual_seed(cfg.seed + 4)
    pixel_values = world_pixels(cfg)
    model = _fresh_blip(Blip2ForImageTextRetrieval, cfg, tok, vision, text_input=True)
    head = AttributeHead(cfg.width)  # design choice 1, on the query outputs
    rng = random.Random(cfg.seed + 4)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt, sched = _optimizer(params, 2e-3, cfg.itm_steps)
    for idx in _batches(len(scenes), cfg.batch_size, cfg.itm_steps, cfg.seed + 4):
        batch, pixels, options, pairs = with_twins(scenes, images, idx, len(idx) // 4 if cfg.twins else 0, itm_twin,
                                                   rng, rich=0.7, image_size=cfg.image_size)
        partner = {j: k for j, k in pairs} | {k: j for j, k in pairs}
        own = [describe(s, **o) for s, o in zip(batch, options)]  # each image's true caption
        texts, labels = [], []
        for j, s in enumerate(batch):
            if rng.random() < 0.5:
                texts.append(own[j])
                labels.append(1)
            elif j in partner:  # its twin's caption at the same detail, labelled by what is true
                texts.append(own[partner[j]])
                labels.append(int(is_true(batch[partner[j]], s, **options[j])))
            else:
                texts.append(false_caption(s, scenes, rng))
                labels.append(0)
        enc, own_enc = tok(texts, padding=True, return_tensors="pt"), tok(own, padding=True, return_tensors="pt")
        with torch.no_grad():  # the ViT is frozen
            feats = vision(pixel_values(pixels)).last_hidden_state
        logits, queries = itm_logits(model, feats, enc["input_ids"], enc["attention_mask"], return_queries=True)
        similarity = itc_logits(model, feats, own_enc["input_ids"], own_enc["attention_mask"]) / 0.07  # BLIP-2's temperature
        target = torch.arange(len(batch))
        contrast = (F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target)) / 2
        loss = F.cross_entropy(logits, torch.tensor(labels)) + contrast + attribute_loss(head(queries.mean(1)), _labels(batch))
        _step(loss, opt, sched, params, bar, stage="ITM")
        bar.update()
    return model.eval()


def with_twins(scenes, images, idx, n_twins, make_twin, rng, rich, image_size):
    """A batch with binding twins (design choice 9): the scenes drawn as `idx` (B,), the first `n_twins` of
    them followed by their twins (make_twin(scene, rng), or None for no twin), then the rest of `idx` to make
    B in all. -> (scenes, uint8 images (B, H, W, 3), describe() options of each, pairs [(j, k)]: the
    positions of a scene and its twin, which share options)."""
    twins = [(j, t) for j, i in enumerate(idx[:n_twins].tolist()) if (t := make_twin(scenes[i], rng)) is not None]
    kept = torch.cat([idx[:n_twins], idx[n_twins:len(idx) - len(twins)]])
    batch = [scenes[i] for i in kept[:n_twins]] + [t for _, t in twins] + [scenes[i] for i in kept[n_twins:]]
    drawn = np.array([np.asarray(render(t, image_size)) for _, t in twins], np.uint8).reshape(-1, image_size, image_size, 3)
    pixels = np.concatenate([images[kept[:n_twins].numpy()], drawn, images[kept[n_twins:].numpy()]])
    options = [true_options(s, rng, rich) for s in batch]
    pairs = [(j, n_twins + k) for k, (j, _) in enumerate(twins)]
    for j, k in pairs:
        options[j] = options[k] = twin_options(batch[j], batch[k], rng, rich)
    return batch, pixels, options, pairs


def clip_config(cfg, width: int) -> dict:
    return dict(embed_dim=width,
                vision_cfg=dict(image_size=cfg.image_size, layers=cfg.layers, width=width, head_width=32,
                                patch_size=cfg.patch_size, mlp_ratio=2.0, no_ln_pre=True),  # as BLIP-2's ViT
                text_cfg=dict(context_length=32, vocab_size=49408, width=width, heads=max(1, width // 32),
                              layers=cfg.layers, mlp_ratio=2.0))


def train_clip(cfg, width, seed, steps, images, scenes, bar, stage) -> tuple[open_clip.CLIP, dict]:
    """Contrastive CLIP on rich (75%) and partial (25%) captions, with attribute losses on both towers
    and the dense cell loss on the image tower's patch tokens (design choice 1). Half of each batch is
    scenes and their binding twins (design choice 9)."""
    assert cfg.image_size == 3 * cfg.patch_size, "the dense loss needs one patch per grid cell"
    torch.manual_seed(seed)
    pixel_values = world_pixels(cfg)
    model_cfg = clip_config(cfg, width)
    model = open_clip.CLIP(**model_cfg)
    model.visual.output_tokens = True  # during training only: visual() -> (pooled, patch tokens)
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])  # bundled BPE
    heads = nn.ModuleList([AttributeHead(width), AttributeHead(width),
                           nn.Sequential(nn.LayerNorm(width), nn.Linear(width, sum(CELL_CLASSES)))])
    params = list(model.parameters()) + list(heads.parameters())
    opt, sched = _optimizer(params, 1e-3, steps)
    rng = random.Random(seed)
    for idx in _batches(len(scenes), cfg.batch_size, steps, seed):
        batch, pixels, options, _ = with_twins(scenes, images, idx, len(idx) // 2 if cfg.twins else 0, move_attribute,
                                               rng, rich=0.75, image_size=cfg.image_size)
        is_rich = torch.tensor([not o for o in options])
        texts = [describe(s, **o) for s, o in zip(batch, options)]
        pooled, tokens = model.visual(pixel_values(pixels))  # (B, D), (B, 9, D)
        img = F.normalize(pooled, dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(batch))
        labels = _labels(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        loss = loss + attribute_loss(heads[0](img), labels) + attribute_loss(heads[1](txt[is_rich]), labels[is_rich])
        # x4: at x1 the contrastive gradients dominate the clipped norm and a probe reads shapes at 0.58
        loss = loss + 4 * cell_loss(heads[2], tokens, labels)
        _step(loss, opt, sched, params, bar, stage=stage)
        bar.update()
    model.visual.output_tokens = False
    return model.eval(), model_cfg


def ship_precision(model: nn.Module) -> nn.Module:
    """Round every float weight and buffer to fp16 and back, in place. The world ships its weights as fp16
    (half the bytes), so each model is rounded as soon as it is trained: the stages after it, the quality
    report and every run then use exactly the weights that ship."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def save_fp16(folder: Path) -> None:
    """Rewrite the .safetensors files in `folder` with fp16 tensors (exact after ship_precision). The
    configs still say float32, so the loaders build fp32 models and upcast the weights exactly."""
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            metadata, tensors = s.metadata(), {k: s.get_tensor(k) for k in s.keys()}
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, f, metadata=metadata)


def save_clip(model, model_cfg, path: Path) -> None:
    """open_clip's `local-dir:` format: open_clip_config.json + open_clip_model.safetensors."""
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    save_fp16(path)


def make_world(cfg: WorldConfig, out: Path, quiet: bool = False) -> None:
    """Everything a world holds, written into the new folder `out`: scenes and images, the five models,
    manifest.json (settings, versions, a SHA-256 per file) and report.json."""
    t0 = time.time()
    pixel_values = world_pixels(cfg)
    out.mkdir(parents=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    splits = shapes.make_splits(cfg)
    shapes.write_scenes(splits, cfg.image_size, out)
    train, images = splits["train"], np.load(out / "images_train.npy")

    rng = random.Random(cfg.seed)
    tok = train_tokenizer([lm_caption(s, rng) for s in train] + [shallow_caption(s, rng) for s in train])
    total = cfg.lm_steps + cfg.captioner_steps + cfg.clip_steps + cfg.judge_steps + cfg.itm_steps
    seconds, t = {"scenes": time.time() - t0}, time.time()

    def lap(stage):  # stage timings go into the report
        nonlocal t
        seconds[stage], t = round(time.time() - t, 1), time.time()
    with tqdm(total=total, desc=f"building world '{cfg.name}'", disable=quiet, mininterval=1) as bar:
        lm = ship_precision(train_ref_lm(cfg, tok, train, bar))
        lm.save_pretrained(out / "ref_lm")
        save_fp16(out / "ref_lm")
        tok.save_pretrained(out / "ref_lm")
        lap("ref_lm")
        clip, model_cfg = train_clip(cfg, cfg.width, cfg.seed + 5, cfg.clip_steps, images, train, bar, stage="clip")
        ship_precision(clip)
        save_clip(clip, model_cfg, out / "clip")
        vision = clip_to_blip2_vision(clip.visual, cfg)
        with torch.no_grad():  # the ViT is frozen from here on: its features are computed once
            feats = torch.cat([vision(pixel_values(images[i:i + 512])).last_hidden_state
                               for i in range(0, len(train), 512)])
        lap("clip")
        captioner = ship_precision(train_captioner(cfg, tok, vision, lm, feats, train, bar))
        image_processor = BlipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                             image_mean=list(MEAN), image_std=list(STD))
        captioner.save_pretrained(out / "captioner")
        save_fp16(out / "captioner")
        Blip2Processor(image_processor, tok, num_query_tokens=cfg.num_query_tokens).save_pretrained(out / "captioner")
        lap("captioner")
        itm = ship_precision(train_itm(cfg, tok, vision, images, train, bar))
        itm.save_pretrained(out / "itm")
        save_fp16(out / "itm")
        tok.backend_tokenizer.no_padding()  # training's padding=True stuck to it; the saved file must not pad
        Blip2Processor(image_processor, tok).save_pretrained(out / "itm")
        lap("itm")
        judge, model_cfg = train_clip(cfg, cfg.judge_width, cfg.seed + 6, cfg.judge_steps, images, train, bar, stage="judge")
        ship_precision(judge)
        save_clip(judge, model_cfg, out / "judge_clip")
        lap("judge_clip")
    build_seconds = time.time() - t0
    files = {str(p.relative_to(out)): shapes.sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {"world_version": WORLD_VERSION, "config": dataclasses.asdict(cfg), "build_seconds": build_seconds,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "open_clip": open_clip.__version__, "python": sys.version.split()[0],
                             "threads": torch.get_num_threads()},
                "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    report = quality_report(World(out))
    report["build_seconds"] = round(build_seconds, 1)
    report["stage_seconds"] = seconds
    (out / "report.json").write_text(json.dumps(report, indent=2))  # derived; not in the checksummed files


# ----------------------------------------------------------------------------------------------------
# Quality report: is the gap that VLRM must close there?
def binding_probe(scenes: list[Scene], kind: str, what: str) -> tuple[list[int], list[Scene]]:
    """The scenes that a binding probe uses, and each one changed. steal: in three-object scenes whose second
    and third objects differ in `what` (colour, shape or cell), the second gets the third's; swap: in scenes
    whose first two objects differ in it, the two exchange it. The objects keep their order, so that
    describe(changed, objects=2) is the true caption of the first two with one attribute moved."""
    j, k = (1, 2) if kind == "steal" else (0, 1)
    idx = [i for i, s in enumerate(scenes) if len(s.objects) > k and getattr(s.objects[j], what) != getattr(s.objects[k], what)]
    changed = []
    for i in idx:
        objs = list(scenes[i].objects)
        objs[j] = dataclasses.replace(objs[j], **{what: getattr(scenes[i].objects[k], what)})
        if kind == "swap":
            objs[k] = dataclasses.replace(objs[k], **{what: getattr(scenes[i].objects[j], what)})
        changed.append(Scene(tuple(objs), scenes[i].background))
    return idx, changed


@torch.no_grad()
def quality_report(world: World) -> dict:
    """Loads every model back through vlrm.py's loaders and measures the targets of the world, with the
    functions that measure captions in training and evaluation (vlrm.caption_images, clip_recall,
    itm_score, ref_lm_score)."""
    test, images = world.scenes["test"], world.images("test")
    rich = [rich_caption(s) for s in test]
    report = {"n_test": len(test)}

    # Pairwise probes: a true caption against the same caption with one thing changed; the share of scenes
    # where the model scores the true one higher (0.5 = blind to that thing). Each: (test scene indices,
    # true captions, changed captions). Main object moved to a free cell; in scenes with two or more
    # objects, the first two named and the second one's shape or colour changed; the background changed.
    rng = random.Random(world.config.seed + 8)
    moved = [Scene((dataclasses.replace(s.objects[0], cell=rng.choice(free_cells(s))),) + s.objects[1:], s.background)
             for s in test]
    rng = random.Random(world.config.seed + 9)
    multi = [i for i, s in enumerate(test) if len(s.objects) > 1]

    def second_changed(s, what, values):
        new = dataclasses.replace(s.objects[1], **{what: rng.choice([v for v in values if v != getattr(s.objects[1], what)])})
        return Scene((s.objects[0], new) + s.objects[2:], s.background)
    reshaped = [second_changed(test[i], "shape", SHAPES) for i in multi]
    recoloured = [second_changed(test[i], "colour", list(COLOURS)) for i in multi]
    repainted = [Scene(s.objects, rng.choice([b for b in BACKGROUNDS if b != s.background])) for s in test]

    def probe(idx, changed, **options):  # -> (test scene indices, true captions, changed captions)
        return idx, [describe(test[i], **options) for i in idx], [describe(s, **options) for s in changed]
    everything = list(range(len(test)))
    probes = {  # report key stem -> probe
        "position": probe(everything, moved, objects=1, size=False, background=False),
        "small_shape": probe(multi, reshaped, objects=2, size=False, background=False),
        "small_colour": probe(multi, recoloured, objects=2, size=False, background=False),
        "background": probe(everything, repainted, objects=1, size=False, position=False),
    }
    for kind in ("steal", "swap"):  # binding (design choice 9), on the rich caption of the first two objects
        for what, word in (("colour", "colour"), ("shape", "shape"), ("cell", "position")):
            probes[f"{kind}_{word}"] = probe(*binding_probe(test, kind, what), objects=2)

    captioner, processor = vlrm.load_policy(world.path("captioner"))
    to_pixels = vlrm.processor_normalizer(processor, "cpu")
    captions = vlrm.caption_images(captioner, processor.tokenizer, to_pixels, images, batch=250, max_new_tokens=40)
    for name, key in (("judge_clip", "judge"), ("clip", "reward_clip")):
        clip, tokenizer, _ = vlrm.load_clip(world.path(name))
        clip_pixels = vlrm.clip_normalizer(clip, "cpu")
        report[f"ceiling_r1_{key}"] = vlrm.clip_recall(clip, tokenizer, clip_pixels, images, rich)["R@1"]
        if key == "judge":
            report["base_r1_judge"] = vlrm.clip_recall(clip, tokenizer, clip_pixels, images, captions)["R@1"]
        img = F.normalize(vlrm.clip_image_embeddings(clip, clip_pixels, images), dim=-1)
        for stem, (idx, right, wrong) in probes.items():
            right, wrong = (F.normalize(vlrm.clip_text_embeddings(clip, tokenizer, c)[0], dim=-1)
                            for c in (right, wrong))
            report[f"{stem}_pairwise_{key}"] = float(((img[idx] * right).sum(1) > (img[idx] * wrong).sum(1))
                                                     .float().mean())
    report["base_main_shape_accuracy"] = float(np.mean([s.objects[0].shape in vlrm.words(c)
                                                        for s, c in zip(test, captions)]))
    report["base_mean_words"] = vlrm.mean_words(captions)
    report["rich_mean_words"] = vlrm.mean_words(rich)
    report["base_samples"] = captions[:5]
    torch.manual_seed(world.config.seed)  # RL samples at temperature 1: how much detail is there to find?
    sampled = vlrm.caption_images(captioner, processor.tokenizer, to_pixels, images[:250], batch=250, do_sample=True,
                                  top_k=0, max_new_tokens=40)
    report["base_sampled_mean_words"] = vlrm.mean_words(sampled)

    itm = Blip2ForImageTextRetrieval.from_pretrained(world.path("itm")).eval()
    itm_processor = Blip2Processor.from_pretrained(world.path("itm"))
    px = vlrm.processor_normalizer(itm_processor, "cpu")(torch.from_numpy(np.array(images)))
    rng = random.Random(world.config.seed + 7)

    def itm_match(texts, pixels=px):  # the reward's own score, at the world's text limit
        return vlrm.itm_score(itm, itm_processor.tokenizer, pixels, texts, vlrm.PRESETS["shapes"]["itm_max_length"])

    def auc(pos, neg):
        return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())
    # rich: true rich captions against false rich ones; short: true partial captions against false ones
    # at the same levels of detail (an ITM that thinks "short = match" fails the second)
    report["itm_roc_auc"] = auc(itm_match(rich), itm_match([false_caption(s, test, rng, rich=1.0) for s in test]))
    report["itm_roc_auc_short"] = auc(itm_match([partial_caption(s, rng) for s in test]),
                                      itm_match([false_caption(s, test, rng, rich=0.0) for s in test]))
    for stem, (idx, right, wrong) in probes.items():
        report[f"itm_{stem}_pairwise"] = float((itm_match(right, px[idx]) > itm_match(wrong, px[idx])).float().mean())

    lm = OPTForCausalLM.from_pretrained(world.path("ref_lm")).eval()
    lm_tok = PreTrainedTokenizerFast.from_pretrained(world.path("ref_lm"))
    salad = [" ".join(random.Random(i).sample(c.split(), len(c.split()))) for i, c in enumerate(rich)]
    for key, texts in (("lm_logprob_rich", rich), ("lm_logprob_salad", salad)):  # the reward's own score
        report[key] = float(vlrm.ref_lm_score(lm, lm_tok, texts).mean())
    return report


# ----------------------------------------------------------------------------------------------------
# Building a world into the cache, atomically, and shipping it
def build(preset: str = "default", root: str | Path | None = None, seed: int | None = None, quiet: bool = False,
          force: bool = False) -> World:
    """The world for `preset` built into `root` (default $VLRM_CACHE/worlds or ~/.cache/vlrm/worlds), unless
    a usable build is there already (force: build anyway). Atomic: built in a temp folder, then renamed, so
    a killed build leaves no half world. Concurrent callers wait on shapes.world_lock."""
    cfg, target = shapes.world_location(preset, root, seed)
    with shapes.world_lock(target):
        problem = "rebuild requested" if force else shapes.manifest_problem(target, cfg) if target.exists() else None
        if target.exists() and problem is None:
            return World(target)
        if problem and not quiet:
            print(f"[build_world] world at {target} is not usable ({problem}); rebuilding.", file=sys.stderr)
        for left in target.parent.glob(f".{target.name}.tmp-*"):  # of builds that were killed
            shutil.rmtree(left)
        tmp, trash = target.with_name(f".{target.name}.tmp-{os.getpid()}"), target.with_name(f".{target.name}.tmp-old")
        try:
            make_world(cfg, tmp, quiet=quiet)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            os.replace(target, trash)
        os.replace(tmp, target)  # atomic: a killed build leaves only .tmp folders, never a half world
        shutil.rmtree(trash, ignore_errors=True)  # what is left is removed by the next build
    return World(target)


def ship_world(world: World, dest: Path) -> Path:
    """Copy a built world into `dest` as the repository ships it: the five model folders, manifest.json,
    report.json and the scenes gzipped (deterministic bytes); the images are rendered on first use."""
    out = Path(dest) / world.root.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in MODEL_DIRS:
        shutil.copytree(world.root / name, out / name)
    for name in ("manifest.json", "report.json"):
        shutil.copy(world.root / name, out / name)
    (out / "scenes.json.gz").write_bytes(gzip.compress((world.data / "scenes.json").read_bytes(), mtime=0))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build a miniature VLRM world into the cache and print its "
                                                 "quality report.")
    parser.add_argument("--preset", default="default", choices=sorted(shapes.PRESETS))
    parser.add_argument("--root", default=None, help="build under this folder (default: $VLRM_CACHE/worlds or "
                                                     "~/.cache/vlrm/worlds)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="build even if a usable build is there already")
    parser.add_argument("--ship", action="store_true", help="copy the built world into the repository's world/ "
                                                            "(maintainers: after a build that changed it)")
    args = parser.parse_args(argv)
    world = build(args.preset, args.root, seed=args.seed, force=args.force)
    print(f"world: {world.root}")
    shapes.print_report(world.report())
    print(f"\nTo train or evaluate on this build rather than the shipped world: --world-root {world.root.parent}")
    if args.ship:
        print(f"shipped: {ship_world(world, shapes.SHIPPED)}")


if __name__ == "__main__":
    main()
