"""eval.py: measure what VLRM claims. Every test image is captioned, each caption must find its own image
among all test images by CLIP (the paper's CLIP Recall: R@1 = 0.90 on the 5,000-image COCO Karpathy test
split), and on the miniature world every named attribute is checked against the scene's ground truth, so
richer captions can be told apart from invented ones.

Run:
    python eval.py                                   # base captioner + latest runs/*/checkpoint, miniature world
    python eval.py --world test --limit 50           # quick look on the tiny test world
    python eval.py --policy tuned=runs/shapes-vlrm-rs-seed0 --policy base=PATH_TO/captioner
    python eval.py --captions mine=captions.json     # captions written by anything else
    python eval.py --dataset coco --coco-json dataset_coco.json --image-root COCO_DIR --device cuda --bf16 \\
        --policy blip2=Salesforce/blip2-opt-2.7b \\
        --policy vlrm=Salesforce/blip2-opt-2.7b --trainable-state vlrm-blip2-opt-2.7b.pt
    python eval.py --dataset folder --images DIR [--references refs.json]
Decoding: greedy by default (the authors' model card); the paper's table quotes
    --num-beams 5 --no-repeat-ngram-size 2 --min-new-tokens 4 --max-new-tokens 60;  --sample draws instead.

Captions files (--captions [NAME=]FILE, also what captions_<name>.json in --out holds):
    JSON {image_id: caption}, JSON [caption, ...] in image order, COCO results [{"image_id":.., "caption":..}],
    or a text file with one caption per line in image order. Image ids: the test index ("0", "1", ...) on the
    miniature world, the Karpathy "cocoid" (or the file name) on COCO, the path relative to --images for a folder
    (whose image order is that of those paths as strings, what `LC_ALL=C sort` gives).

Output: the table on stdout, timings per stage on stderr; in --out (default eval_out/): results.json
(every number), captions_<name>.json, and report.html (table, training curves, test images with captions;
self-contained: inline SVG and embedded PNG, no script, no network). R@K are fractions, as in the paper.
The curves are drawn as SVG here (svg_curve, 30 lines) rather than with matplotlib: a report that opens
anywhere as one file, for four line charts, is not worth a plotting library and the packages it pulls in.

Design choices:
 1. Recall in both directions comes from kernels.retrieval_ranks (rank = gallery items scoring strictly
    higher than the match); text to image is training's validation recall (vlrm.text_to_image_recall).
    Image-to-text galleries hold identical captions whenever a captioner repeats itself; a tie there
    would count in the image's favour, and "a circle" for every image would score R@1 = 100%. So
    identical captions are ranked above the match (ties count against): each of k images
    sharing one caption gets rank >= k - 1.
 2. Attribute checks parse captions with the world's own grammar (shapes.parse_caption, beside the grammar
    that writes them: article, size?, colour?, shape, position?; "on a X background") but tolerate anything
    else: unknown words are skipped, a modifier is bound to the next shape and a position phrase to the
    shape before it. A named attribute is correct if an object in the scene has it, bound to its shape
    when that shape is in the scene ("a blue circle" is wrong beside a red circle and a blue square).
    Hallucination rate = share of named attributes absent from the scene; recall = share of the scene's
    attributes (4 per object + background) named, bound.
    Pooled over the test set, per kind (shape, colour, size, position, background) and overall. This
    asks whether each attribute exists, not how many objects carry it: design choice 5 counts.
 3. BLEU-4 and CIDEr-D are written out here (about 40 lines) rather than installed: pycocoevalcap is a
    104 MB wheel whose tokenizer needs Java. Both follow coco-caption and are tested against its numbers.
 4. The CLIP judge is the world's judge_clip (never a reward) on the miniature world, and ViT-L-14/openai
    elsewhere: the CLIP most captioning-recall papers report with (its weights must be on disk or reachable).
 5. Object hallucination as CHAIR (Rohrbach et al., 2018), counted exactly against the scene: each object
    mention (a shape with the colour, size and position bound to it, as parsed in 2.) is matched one to
    one to a distinct scene object having every attribute it names (a maximum bipartite matching), so
    "a pink triangle and a pink triangle" is right only where the scene holds two. An unmatched mention
    is hallucinated: objects/chair_i = hallucinated / all mentions, objects/chair_s = share of captions
    with one or more. loop_3gram is the share of captions in which a word 3-gram occurs three or more
    times: the degenerate looping that the repetition penalty exists to stop (repeat_3gram, any repeat,
    also counts true captions such as "a small red circle at top and a small red cross").
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
import time

STARTED = time.time()  # the imports below take seconds on a small CPU: the timing report counts them
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import kernels
import shapes
import vlrm

BAD_PHRASES = vlrm.bad_phrase_regex(vlrm.Config.bad_phrases)  # the phrases the training penalises, as it does
IMAGE_EXT = vlrm.ImageFiles.EXT
CURVES = ("reward/sequence", "reward/clip", "reward/itm", "reward/ref", "val/judge_r1", "val/reward_r1",
          "charts/caption_len")


class UsageError(vlrm.UsageError):
    """Bad input: printed without a traceback, exit code 2 (vlrm's own errors are caught the same way)."""


# ----------------------------------------------------------------------------------------------------
# Data: images as uint8 (N, S, S, 3), an id per image, optional references and (miniature world) scenes.
@dataclass
class Dataset:
    ids: list[str]
    images: np.ndarray
    references: list[list[str]] | None = None
    scenes: list | None = None
    world: shapes.World | None = None
    files: list[str] | None = None  # file names, accepted as image ids in captions files
    all_ids: list[str] | None = None  # before unreadable images were dropped: in-order caption lists count them
    bad: list[str] = field(default_factory=list)  # "path: why" of each image that could not be read


def load_image(path: Path, size: int) -> np.ndarray:
    """The same preprocessing as training (vlrm.ImageFiles)."""
    return vlrm.center_square(Image.open(path), size)


def load_files(ids, paths, references, size, skip_bad) -> Dataset:
    """Decode every file; unreadable ones are listed, and stop the run unless --skip-bad-images."""
    kept, images, bad = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path, size))
        except Exception as e:  # missing, truncated, not an image: PIL raises many kinds
            bad.append(f"{path}: {type(e).__name__}: {str(e)[:120]}")
            continue
        kept.append(i)
    if bad and not skip_bad:
        raise UsageError(f"{len(bad)} of {len(paths)} images cannot be read:\n  " + "\n  ".join(bad[:10]) +
                         ("\n  ..." if len(bad) > 10 else "") + "\n  Fix or remove them, or pass --skip-bad-images.")
    if not kept:
        raise UsageError("no readable images to evaluate")
    return Dataset([ids[i] for i in kept], np.stack(images), [references[i] for i in kept] if references else None,
                   bad=bad, files=[Path(paths[i]).name for i in kept], all_ids=list(ids))


def load_dataset(args) -> Dataset:
    if args.dataset == "shapes":
        world = vlrm.load_world(args.world, args.world_root)
        scenes, images = world.scenes["test"][:args.limit], world.images("test")[:args.limit]
        return Dataset([str(i) for i in range(len(scenes))], np.array(images),
                       [[shapes.rich_caption(s)] for s in scenes], scenes, world)
    if args.dataset == "coco":
        if not args.coco_json or not args.image_root:
            raise UsageError("--dataset coco needs --coco-json dataset_coco.json (Karpathy split) and --image-root DIR")
        try:
            entries = [e for e in json.loads(Path(args.coco_json).read_text())["images"] if e.get("split") == "test"]
            entries = entries[:args.limit]
            paths = [Path(args.image_root) / e.get("filepath", "") / e["filename"] for e in entries]
            ids = [str(e.get("cocoid", e["filename"])) for e in entries]
            refs = [[s["raw"] for s in e.get("sentences", [])] for e in entries]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"cannot read the Karpathy split file {args.coco_json!r} ({type(e).__name__}: {e}); "
                             f"pass dataset_coco.json from Karpathy's caption_datasets archive") from None
        if not entries:
            raise UsageError(f"{args.coco_json!r} has no images with \"split\": \"test\"")
        return load_files(ids, paths, refs, args.image_size, args.skip_bad_images)
    if not args.images or not Path(args.images).is_dir():
        raise UsageError(f"--dataset folder needs --images DIR, a folder of images (got {args.images!r})")
    root = Path(args.images)
    # image order: relative paths sorted as strings (what `LC_ALL=C sort` gives), the order of in-order captions
    paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT),
                   key=lambda p: p.relative_to(root).as_posix())[:args.limit]
    if not paths:
        raise UsageError(f"--images {args.images!r} holds no images ({', '.join(IMAGE_EXT)})")
    ids = [p.relative_to(root).as_posix() for p in paths]
    refs = None
    if args.references:
        table = read_json(args.references, "--references")
        if not isinstance(table, dict):
            raise UsageError(f"--references {args.references!r} must be a JSON object "
                             f"{{relative path: caption or [captions]}}, not a {type(table).__name__}")
        refs = [table.get(i, table.get(Path(i).name)) for i in ids]
        missing = [i for i, r in zip(ids, refs) if r is None]
        if missing:
            raise UsageError(f"--references {args.references!r} has no entry for {missing[0]!r} "
                             f"({len(missing)} images lack one); key it by the path relative to --images")
        refs = [[r] if isinstance(r, str) else r for r in refs]
        wrong = [i for i, r in zip(ids, refs) if not (isinstance(r, list) and r and all(isinstance(c, str) for c in r))]
        if wrong:
            raise UsageError(f"--references {args.references!r}: the entry for {wrong[0]!r} is not a caption or a "
                             f"non-empty list of captions ({len(wrong)} such entries)")
    return load_files(ids, paths, refs, args.image_size, args.skip_bad_images)


def read_json(path, flag):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path!r} is not a readable JSON file ({type(e).__name__}: {e})") from None


def read_captions(path: str, data: Dataset, limited: bool) -> list[str]:
    """A captions file in any of the documented formats -> one caption per image, in image order.
    In-order lists count every image, including those skipped as unreadable."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"--captions {path!r} cannot be read ({e})") from None
    try:
        table = json.loads(text)
    except ValueError:
        table = None if path.endswith(".json") else text.splitlines()
    if isinstance(table, list) and table and all(isinstance(d, dict) for d in table):  # COCO results format
        table = {d.get("image_id"): d.get("caption") for d in table}
    elif isinstance(table, list):
        every = data.all_ids or data.ids
        if len(table) < len(every) or (len(table) > len(every) and not limited):
            n = min(len(table), len(every))
            what = f"image {every[n]!r} has no caption" if n < len(every) else f"caption {table[n]!r} has no image"
            raise UsageError(f"--captions {path!r} holds {len(table)} captions for {len(every)} images: from "
                             f"position {n} on, {what}; write one caption per image, in order")
        table = dict(zip(every, table))
    if not isinstance(table, dict):
        raise UsageError(f"--captions {path!r} is neither a JSON list/dict nor a lines file")
    names, ids = Counter(data.files or []), set(data.ids)  # a file name is accepted as an id if it names one image
    by_name = {f: i for f, i in zip(data.files or [], data.ids) if names[f] == 1 and f not in ids}
    table = {by_name.get(str(k), str(k)): v for k, v in table.items()}
    missing = [i for i in data.ids if i not in table]
    if missing:
        raise UsageError(f"--captions {path!r} has no caption for image {missing[0]!r} ({len(missing)} missing); "
                         f"key captions by image id (see eval.py's docstring)")
    known = set(data.ids) | set(data.all_ids or [])
    extra = [k for k in table if k not in known]
    if extra and not limited:
        raise UsageError(f"--captions {path!r} names image {extra[0]!r}, which is not in the test set")
    captions = [table[i] for i in data.ids]
    wrong = [i for i, c in zip(data.ids, captions) if not isinstance(c, str)]
    if wrong:
        raise UsageError(f"--captions {path!r}: the caption of image {wrong[0]!r} is not a string")
    return [c.strip() for c in captions]


# ----------------------------------------------------------------------------------------------------
# Captioning
@dataclass
class Policy:
    name: str
    spec: str | None = None          # what load_policy gets
    state: str | None = None         # optional trainable-only state dict (authors' format)
    run_dir: Path | None = None      # for the training curves
    captions_file: str | None = None  # instead of a model


def resolve(policy: Policy) -> Policy:
    """A run directory or its checkpoint -> the save_pretrained folder inside; anything else is passed on."""
    p = Path(policy.spec)
    ckpt = vlrm.find_checkpoint(p) if p.is_dir() else None
    if ckpt is None and (p / "trainer.pt").is_file():
        ckpt, p = p, p.parent
    if ckpt is not None:
        policy.spec, policy.run_dir = str(ckpt / "policy"), p
    return policy


def latest_run(runs: Path) -> Path | None:
    ckpts = [c for c in (vlrm.find_checkpoint(d) for d in runs.glob("*") if d.is_dir()) if c is not None]
    return max(ckpts, key=lambda c: (c / "trainer.pt").stat().st_mtime).parent if ckpts else None


def caption(policy, processor, images: np.ndarray, args, device) -> list[str]:
    """Captions of every image with the decoding of the flags: greedy unless --sample or --num-beams."""
    decoding = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                    num_beams=args.num_beams, no_repeat_ngram_size=args.no_repeat_ngram_size)
    if args.sample:  # pure samples, as the RL rollouts draw them
        decoding.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    return vlrm.caption_images(policy, processor.tokenizer, vlrm.processor_normalizer(processor, device), images,
                               args.batch_size, **decoding)


# ----------------------------------------------------------------------------------------------------
# CLIP Recall
class ClipJudge:
    """The CLIP judge over one gallery of images, encoded once for every policy (vlrm's CLIP embeddings)."""

    def __init__(self, spec: str, images: np.ndarray, device):
        self.model, self.tokenizer, _ = vlrm.load_clip(spec, device)
        self.image_emb = vlrm.clip_image_embeddings(self.model, vlrm.clip_normalizer(self.model, device), images)

    def recall(self, captions: list[str]) -> dict:
        """CLIP Recall of one caption per gallery image, in gallery order: see retrieval(). Copies of one text
        (vlrm.clip_text_embeddings' keys) get bit-identical embeddings: design choice 1 relies on exact ties."""
        text_emb, text_keys = vlrm.clip_text_embeddings(self.model, self.tokenizer, captions)
        return retrieval(text_emb, self.image_emb, text_keys)

    def truncated_share(self, captions) -> float | None:
        """Captions longer than CLIP's text window: their tails are invisible to it (None: cannot count)."""
        count = vlrm.clip_token_counts(self.tokenizer)
        return None if count is None else vlrm.truncated_share(count, self.model.context_length, captions)


def image_to_text_ranks(text_emb: torch.Tensor, image_emb: torch.Tensor, text_keys: list) -> torch.Tensor:
    """(N, D) caption and image embeddings, item i of each belonging to item i of the other, and (N,) text
    keys (equal for captions the judge reads as one text: vlrm.clip_text_embeddings') -> (N,) ranks
    image-to-text, 0 = found first, identical captions ranked above the match (design choice 1)."""
    i2t = kernels.retrieval_ranks(image_emb, text_emb)
    copies = Counter(text_keys)
    return i2t + torch.tensor([copies[k] - 1 for k in text_keys], dtype=i2t.dtype, device=i2t.device)


def retrieval(text_emb: torch.Tensor, image_emb: torch.Tensor, text_keys: list) -> dict:
    """CLIP Recall both ways: text to image as training's validation measures it (vlrm.text_to_image_recall),
    image to text with design choice 1's ties. R@1/5/10 as fractions, median and mean rank (1-based)."""
    i2t = image_to_text_ranks(text_emb, image_emb, text_keys)
    return {**{f"t2i/{k}": v for k, v in vlrm.text_to_image_recall(text_emb, image_emb).items()},
            **{f"i2t/{k}": v for k, v in kernels.recall_at_k(i2t).items()}}


# ----------------------------------------------------------------------------------------------------
# Caption statistics and reference metrics
def ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def caption_stats(captions: list[str]) -> dict:
    """Words are vlrm.words, as in training. words: mean words per caption (vlrm's charts/caption_len);
    colour_rate: share naming a colour word; distinct_n: distinct / total word n-grams over all captions;
    repeat_3gram and bad_phrase: share of captions that training's repetition penalty (at n = 3) and
    bad-phrase penalty charge (vlrm.penalty_ends); loop_3gram: share with a word 3-gram that occurs three
    or more times (design choice 5)."""
    toks = [vlrm.words(c) for c in captions]
    charged = [vlrm.penalty_ends(c, BAD_PHRASES, ngram=3) for c in captions]  # (bad ends, repeat ends) each
    distinct = {}
    for n in (1, 2):
        grams = [g for t in toks for g in ngrams(t, n)]
        distinct[f"distinct_{n}"] = len(set(grams)) / max(1, len(grams))
    most = [max(Counter(ngrams(t, 3)).values(), default=0) for t in toks]  # the commonest 3-gram's count
    return {"words": vlrm.mean_words(captions),
            "colour_rate": float(np.mean([any(w in shapes.COLOUR_WORDS for w in t) for t in toks])),
            **distinct,
            "repeat_3gram": float(np.mean([bool(repeat) for _, repeat in charged])),
            "loop_3gram": float(np.mean([m >= 3 for m in most])),
            "bad_phrase": float(np.mean([bool(bad) for bad, _ in charged]))}


def bleu4(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 as coco-caption computes it: clipped n-gram counts summed over the corpus, the closest
    reference length (the shorter on a tie) for the brevity penalty."""
    correct, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, rs in zip(hyps, refs):
        h, rs = vlrm.words(hyp), [vlrm.words(r) for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            best = Counter()
            for r in rs:
                best |= Counter(ngrams(r, n))  # max count of each n-gram over the references
            counts = Counter(ngrams(h, n))
            correct[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if min(correct) == 0:
        return 0.0
    brevity = min(1.0, math.exp(1 - ref_len / hyp_len))
    return brevity * math.exp(sum(math.log(c / t) for c, t in zip(correct, total)) / 4)


def cider_d(hyps: list[str], refs: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (coco-caption): tf-idf n-gram vectors (n = 1..4, document frequency over the references of
    this test set), cosine with the hypothesis counts clipped to the reference's, a Gaussian length
    penalty, averaged over n and references, times 10."""
    def grams(text):
        t = vlrm.words(text)
        return [Counter(ngrams(t, n)) for n in range(1, 5)], len(t)
    hyp_c = [grams(h) for h in hyps]
    ref_c = [[grams(r) for r in rs] for rs in refs]
    df = Counter(g for rs in ref_c for g in {g for r, _ in rs for c in r for g in c})
    log_docs = math.log(len(refs))

    def tfidf(counts):
        vec = [{g: tf * (log_docs - math.log(max(1.0, df[g]))) for g, tf in c.items()} for c in counts]
        return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec]
    scores = []
    for (hc, hl), rs in zip(hyp_c, ref_c):
        hv, hn = tfidf(hc)
        total = 0.0
        for rc, rl in rs:
            rv, rn = tfidf(rc)
            penalty = math.exp(-((hl - rl) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                dot = sum(min(v, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, v in hv[n].items())
                total += penalty * (dot / (hn[n] * rn[n]) if hn[n] and rn[n] else 0.0) / 4
        scores.append(10.0 * total / len(rs))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------
# Attributes against the miniature world's ground truth
KINDS = ("shape", "colour", "size", "position", "background")


def parse(caption: str):
    """shapes.parse_caption of the caption's words: (objects, attributes bound to no shape, background)."""
    return shapes.parse_caption(vlrm.words(caption))


def attribute_counts(caption: str, scene) -> Counter:
    """-> per attribute kind: named, correct (in the scene, bound to its shape where the shape is present),
    truth (the scene's attributes), recalled (ground-truth attributes the caption names, bound)."""
    objects, loose, background = parse(caption)
    truth = shapes.scene_objects(scene)
    c = Counter({f"{k}/{what}": 0 for k in KINDS for what in ("named", "correct", "truth", "recalled")})

    def name(kind, value, among):
        c[f"{kind}/named"] += 1
        c[f"{kind}/correct"] += any(o[kind] == value for o in among)
    for obj in objects:
        same_shape = [o for o in truth if o["shape"] == obj["shape"]]
        for kind, value in obj.items():
            name(kind, value, same_shape or truth)  # an absent shape: its modifiers are judged on their own
    for kind, value in loose:
        name(kind, value, truth)
    if background is not None:
        c["background/named"] += 1
        c["background/correct"] += background == scene.background
    for o in truth:
        for kind in ("shape", "colour", "size", "position"):
            c[f"{kind}/truth"] += 1
            c[f"{kind}/recalled"] += any(n["shape"] == o["shape"] and n.get(kind) == o[kind] for n in objects)
    c["background/truth"] += 1
    c["background/recalled"] += background == scene.background
    return c


def attribute_metrics(captions: list[str], scenes) -> dict:
    """Pooled over the test set: precision = correct / named, hallucination = 1 - precision (None where
    nothing of a kind was named), recall = recalled / truth; per kind and overall."""
    total = Counter()
    for cap, scene in zip(captions, scenes):
        total.update(attribute_counts(cap, scene))
    out = {}
    for kind in KINDS + ("all",):
        get = (lambda w: sum(total[f"{k}/{w}"] for k in KINDS)) if kind == "all" else (lambda w: total[f"{kind}/{w}"])
        precision = get("correct") / get("named") if get("named") else None
        out.update({f"attr/{kind}/precision": precision,
                    f"attr/{kind}/hallucination": None if precision is None else 1 - precision,
                    f"attr/{kind}/recall": get("recalled") / max(1, get("truth"))})
    return out


def match_mentions(mentions: list[dict], scene) -> tuple[list[int], list[int]]:
    """Design choice 5: match each mention to a distinct scene object having every attribute it names, as
    many as possible (Kuhn's augmenting paths: a maximum bipartite matching). -> (indices of the unmatched
    mentions that no scene object fits: not in the image; of those that fit only objects already matched:
    named twice)."""
    truth = shapes.scene_objects(scene)
    fits = [[j for j, o in enumerate(truth) if all(o[k] == v for k, v in m.items())] for m in mentions]
    owner = {}  # scene object -> the mention matched to it

    def augment(i, seen) -> bool:  # find mention i an object, moving earlier mentions along if need be
        for j in fits[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False
    for i in range(len(mentions)):
        augment(i, set())
    unmatched = [i for i in range(len(mentions)) if i not in owner.values()]
    return [i for i in unmatched if not fits[i]], [i for i in unmatched if fits[i]]


def object_metrics(captions: list[str], scenes) -> dict:
    """CHAIR against the scenes (design choice 5): objects/chair_i = hallucinated mentions / mentions (None
    if no caption names an object), objects/chair_s = share of captions with a hallucinated mention,
    objects/mentions = object mentions per caption; and the other side, objects/recall = scene objects
    matched by a mention / scene objects (AMBER's "cover"), so that a caption cannot cut hallucination by
    naming less."""
    mentions = hallucinated = with_one = matched = 0
    for cap, scene in zip(captions, scenes):
        objects = parse(cap)[0]
        absent, doubled = match_mentions(objects, scene)
        mentions, hallucinated = mentions + len(objects), hallucinated + len(absent) + len(doubled)
        matched += len(objects) - len(absent) - len(doubled)
        with_one += bool(absent or doubled)
    return {"objects/chair_i": hallucinated / mentions if mentions else None,
            "objects/chair_s": with_one / len(captions), "objects/mentions": mentions / len(captions),
            "objects/recall": matched / sum(len(s.objects) for s in scenes)}


def mention_text(m: dict) -> str:
    """A parsed mention in the grammar's words: {"colour": "purple", "shape": "diamond"} -> "purple diamond"."""
    return " ".join([m[k] for k in ("size", "colour", "shape") if k in m]
                    + ([shapes.POSITIONS[m["position"]]] if "position" in m else []))


def caption_marks(caption: str, scene) -> tuple[list[str], list[str]]:
    """What the report marks: (named but not in the image: object mentions no scene object fits, a wrong
    background, attributes bound to no shape that no object has; objects named twice)."""
    objects, loose, background = parse(caption)
    absent, doubled = match_mentions(objects, scene)
    truth = shapes.scene_objects(scene)
    missing = [mention_text(objects[i]) for i in absent]
    missing += [f"{background} background"] if background not in (None, scene.background) else []
    missing += [shapes.POSITIONS[v] if k == "position" else v for k, v in loose if not any(o[k] == v for o in truth)]
    return missing, [mention_text(objects[i]) for i in doubled]


# ----------------------------------------------------------------------------------------------------
# The HTML report: metrics, training curves (inline SVG), image grid (embedded PNG). No JS, no network.
PALETTE = ("#1f6fb4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def svg_curve(title: str, series: dict[str, list[tuple[float, float]]], w: int = 300, h: int = 170) -> str:
    """One chart: a line per series {label: [(step, value), ...]}, with a legend when there are several."""
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    if y1 == y0:  # a flat curve sits in the middle of its box
        y0, y1 = y0 - (abs(y0) or 1) / 2, y1 + (abs(y1) or 1) / 2
    pad, sx, sy = 50, (w - 60) / (x1 - x0), (h - 50) / (y1 - y0)  # pad: room for the y labels
    parts = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" class="curve">'
             f'<rect width="{w}" height="{h}" fill="white"/>'
             f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>'
             f'<line x1="{pad}" y1="{h - 25}" x2="{w - 10}" y2="{h - 25}" stroke="#888"/>'
             f'<line x1="{pad}" y1="20" x2="{pad}" y2="{h - 25}" stroke="#888"/>'
             f'<text x="{pad - 3}" y="{h - 25}" text-anchor="end" font-size="10">{y0:.3g}</text>'
             f'<text x="{pad - 3}" y="28" text-anchor="end" font-size="10">{y1:.3g}</text>'
             f'<text x="{pad}" y="{h - 8}" font-size="10">{x0:.0f}</text>'
             f'<text x="{w - 10}" y="{h - 8}" text-anchor="end" font-size="10">step {x1:.0f}</text>']
    for i, (label, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        xy = [(pad + (x - x0) * sx, h - 25 - (y - y0) * sy) for x, y in pts]
        parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}" fill="none" '
                     f'stroke="{colour}" stroke-width="1.5"/>')
        if len(xy) <= 30:
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{colour}"/>' for x, y in xy]
        if len(series) > 1:
            parts.append(f'<text x="{w - 12}" y="{h - 32 - 12 * (len(series) - 1 - i)}" text-anchor="end" '
                         f'font-size="10" fill="{colour}">{html.escape(label)}</text>')
    return "".join(parts) + "</svg>"


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} from a run folder's metrics.jsonl, or from a file of that format."""
    curves = {k: [] for k in CURVES}
    path = path / "metrics.jsonl" if path.is_dir() else path
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a killed run
            continue
        for k in CURVES:
            if isinstance(row.get(k), (int, float)) and math.isfinite(row[k]):
                curves[k].append((row["step"], row[k]))
    return {k: v for k, v in curves.items() if v}


def png_b64(image: np.ndarray, size: int = 144) -> str:
    img = Image.fromarray(np.asarray(image))
    scale = Image.Resampling.NEAREST if img.width < size else Image.Resampling.BICUBIC  # keep tiny scenes crisp
    buf = io.BytesIO()
    img.resize((size, size), scale).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def html_report(results: dict, names: list[str], table: list[tuple[str, list[str]]], data: Dataset,
                captions: dict[str, list[str]], runs: dict[str, Path], grid: int) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(m)}</th>" + "".join(f"<td>{esc(v)}</td>" for v in vals) + "</tr>"
                   for m, vals in table)
    parts = [f"<h1>VLRM evaluation: {esc(results['dataset']['name'])}, {len(data.ids)} images</h1>",
             f"<p>CLIP judge: {esc(results['clip'])}. Decoding: {esc(json.dumps(results['decoding']))}.</p>",
             "<table><tr><th>metric</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + f"</tr>{rows}</table>"]
    if data.bad:
        parts.append(f"<p>{len(data.bad)} images skipped: {esc('; '.join(data.bad[:20]))}</p>")
    if runs:  # one chart per metric, a line per run
        curves = {name: read_curves(run_dir) for name, run_dir in runs.items()}
        charts = [svg_curve(k, {name: c[k] for name, c in curves.items() if k in c})
                  for k in CURVES if any(k in c for c in curves.values())]
        parts.append("<h2>Training curves: " + esc(", ".join(f"{n} ({d})" for n, d in runs.items())) + "</h2>" +
                     ("".join(charts) or "<p>no metrics.jsonl</p>"))
    cells = []
    for i in range(min(grid, len(data.ids))):
        caps = ""
        for n in names:
            missing, doubled = caption_marks(captions[n][i], data.scenes[i]) if data.scenes else ([], [])
            marks = [f"[{what}: {', '.join(items)}]" for what, items in (("not in the image", missing),
                                                                         ("named twice", doubled)) if items]
            caps += f"<p><b>{esc(n)}:</b> {esc(captions[n][i])}" + (
                f" <span class='wrong'>{esc(' '.join(marks))}</span>" if marks else "") + "</p>"
        ref = f"<p class='ref'><b>reference:</b> {esc(data.references[i][0])}</p>" if data.references else ""
        cells.append(f"<div class='cell'><img src='data:image/png;base64,{png_b64(data.images[i])}' "
                     f"alt='{esc(data.ids[i])}'><div>{caps}{ref}</div></div>")
    parts.append("<h2>Test images</h2><div class='grid'>" + "".join(cells) + "</div>")
    style = ("body{font-family:sans-serif;margin:20px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}th{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:10px}"
             ".cell{display:flex;gap:8px;width:520px;border:1px solid #ddd;padding:6px}.cell p{margin:2px 0;"
             "font-size:13px}.ref{color:#666}.wrong{color:#c00}.curve{margin:4px;border:1px solid #eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>VLRM evaluation</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


# ----------------------------------------------------------------------------------------------------
# Command line
TABLE = [  # (label, key in a policy's metrics, format)
    ("R@1 text->image", "t2i/R@1", "{:.3f}"), ("R@5 text->image", "t2i/R@5", "{:.3f}"),
    ("R@10 text->image", "t2i/R@10", "{:.3f}"), ("median rank t->i", "t2i/median_rank", "{:.0f}"),
    ("mean rank t->i", "t2i/mean_rank", "{:.1f}"), ("R@1 image->text", "i2t/R@1", "{:.3f}"),
    ("R@5 image->text", "i2t/R@5", "{:.3f}"), ("mean rank i->t", "i2t/mean_rank", "{:.1f}"),
    ("words per caption", "words", "{:.2f}"), ("colour-word rate", "colour_rate", "{:.3f}"),
    ("distinct-1", "distinct_1", "{:.3f}"), ("distinct-2", "distinct_2", "{:.3f}"),
    ("repeated 3-gram rate", "repeat_3gram", "{:.3f}"), ("looping 3-gram rate", "loop_3gram", "{:.3f}"),
    ("bad-phrase rate", "bad_phrase", "{:.3f}"),
    ("truncated by CLIP", "clip_truncated", "{:.3f}"), ("BLEU-4", "bleu4", "{:.3f}"), ("CIDEr-D", "cider_d", "{:.3f}"),
    ("object mentions / caption", "objects/mentions", "{:.2f}"),
    ("object halluc. CHAIR_i", "objects/chair_i", "{:.3f}"), ("captions w/ halluc. CHAIR_s", "objects/chair_s", "{:.3f}"),
    ("objects named (recall)", "objects/recall", "{:.3f}"),
] + [(f"{kind} prec/rec/halluc", f"attr/{kind}", "{:.2f}") for kind in ("all",) + KINDS]  # one cell: three numbers


def cell(m: dict, key: str, fmt: str) -> str:
    keys = [f"{key}/{what}" for what in ("precision", "recall", "hallucination")] if key.startswith("attr/") else [key]
    return "/".join(fmt.format(m[k]) if m.get(k) is not None else "-" for k in keys)


class AddPolicy(argparse.Action):
    """--policy [NAME=]SPEC and --captions [NAME=]FILE append in order; --trainable-state attaches to the
    --policy just before it, so several policies can each carry their own."""

    def __call__(self, parser, ns, value, option):
        policies = list(ns.policies or [])  # a fresh list: never the shared default
        if option == "--trainable-state":
            if not policies or policies[-1].spec is None:
                parser.error("--trainable-state FILE must follow the --policy it applies to")
            policies[-1].state = value
        else:
            name, _, spec = value.partition("=") if "=" in value.split("/")[0] else ("", "", value)
            path = Path(spec.rstrip("/"))  # a hub id's last part ("blip2-opt-2.7b") keeps its dots, a file not
            name = name or (path.name if option == "--policy" else path.stem) or spec
            policies.append(Policy(name, spec=spec) if option == "--policy" else Policy(name, captions_file=spec))
        ns.policies = policies


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("Design choices")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to evaluate (default: the world's base captioner and the latest run)")
    g.add_argument("--policy", action=AddPolicy, dest="policies", default=None, metavar="[NAME=]SPEC",
                   help="run dir, its checkpoint, save_pretrained dir or hub id; repeatable")
    g.add_argument("--trainable-state", action=AddPolicy, dest="policies", metavar="FILE",
                   help="authors'-format trainable-only state dict, loaded on top of the --policy before it")
    g.add_argument("--captions", action=AddPolicy, dest="policies", metavar="[NAME=]FILE",
                   help="captions written by anything else (formats: see the docstring); repeatable")
    g.add_argument("--runs", default="runs", help="where the latest run is looked for when no --policy is given")
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", choices=("shapes", "coco", "folder"), default="shapes")
    g.add_argument("--world", choices=sorted(shapes.PRESETS), default="default", help="miniature world preset")
    g.add_argument("--world-root", default=None, help="use the worlds built under this folder instead of the "
                   "shipped one (as vlrm.py --world-root)")
    g.add_argument("--coco-json", help="Karpathy split file dataset_coco.json (images with split == test)")
    g.add_argument("--image-root", help="COCO root: image paths are IMAGE_ROOT/filepath/filename")
    g.add_argument("--images", help="--dataset folder: a folder of images (recursive)")
    g.add_argument("--references", help="--dataset folder: JSON {relative path: caption or [captions]}")
    g.add_argument("--image-size", type=int, default=224, help="COCO/folder images are decoded to this square size")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N test images only")
    g.add_argument("--skip-bad-images", action="store_true", help="evaluate without unreadable images, listing them")
    g = ap.add_argument_group("decoding (default: greedy)")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 40 on the miniature world, else 60")
    g.add_argument("--sample", action="store_true", help="sample at temperature 1 (seeded by --seed)")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("machinery and output")
    g.add_argument("--clip", default=None, help="CLIP judge: 'MODEL/TAG', 'local-dir:PATH' or a folder "
                   "(default: the world's judge_clip; ViT-L-14/openai on coco/folder)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--bf16", action="store_true", help="run the captioners in bfloat16 (GPU)")
    g.add_argument("--batch-size", type=int, default=None, help="images per generate() call (default 1024 on the "
                   "miniature world, where per-step overhead dominates; 32 elsewhere)")
    g.add_argument("--grid", type=int, default=24, help="test images shown in the report")
    g.add_argument("--out", default="eval_out", help="results.json, captions_<name>.json and report.html go here")
    args = ap.parse_args(argv)
    for flag in ("limit", "batch_size", "num_beams", "image_size", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be a positive integer")
    for flag in ("min_new_tokens", "no_repeat_ngram_size"):
        if getattr(args, flag) < 0:
            ap.error(f"--{flag.replace('_', '-')} must be 0 (off) or a positive integer")
    if args.sample and args.num_beams > 1:
        ap.error("--sample and --num-beams > 1 together would be beam sampling; pick one")
    args.policies = args.policies or []
    names = [p.name for p in args.policies]
    if len(set(names)) < len(names):
        ap.error(f"two policies are both called {max(names, key=names.count)!r}; name them with NAME=SPEC")
    args.max_new_tokens = args.max_new_tokens or (40 if args.dataset == "shapes" else 60)
    if args.min_new_tokens > args.max_new_tokens:
        ap.error(f"--min-new-tokens {args.min_new_tokens} exceeds --max-new-tokens {args.max_new_tokens}")
    args.batch_size = args.batch_size or (1024 if args.dataset == "shapes" else 32)
    return args


def evaluate(args) -> dict:
    t0, timing = STARTED, {}

    def lap(stage):
        nonlocal t0
        timing[stage] = round(time.time() - t0, 2)
        print(f"[time] {stage}: {timing[stage]:.1f} s", file=sys.stderr)
        t0 = time.time()
    lap("start-up (imports)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise UsageError("--device cuda, but torch sees no GPU; use --device cpu")
    try:  # now, not after hours of captioning
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out!r} cannot be made a folder ({e}); pick another path") from None
    data = load_dataset(args)
    policies = args.policies
    if not policies:  # the defaults: the captioner before RL, and the newest run
        base = data.world.path("captioner") if data.world else "Salesforce/blip2-opt-2.7b"
        policies = [Policy("base", spec=base)]
        run = latest_run(Path(args.runs))
        policies += [Policy(run.name, spec=str(run))] if run else []
        if run is None:
            print(f"no trained run under {args.runs}/ (train one with: python vlrm.py --steps 5000); "
                  f"evaluating the base captioner alone", file=sys.stderr)
        if run and run.name == "base":
            raise UsageError(f"the latest run {str(run)!r} is called 'base', the base captioner's name; "
                             f"name both with --policy NAME=SPEC")
    policies = [resolve(p) if p.spec else p for p in policies]
    captions = {p.name: read_captions(p.captions_file, data, args.limit is not None)
                for p in policies if p.captions_file}  # mismatches surface before any model loads
    clip_spec = args.clip or (data.world.path("judge_clip") if data.world else "ViT-L-14/openai")
    lap("load data")
    judge = ClipJudge(clip_spec, data.images, device)
    lap("CLIP image embeddings")
    results = {"dataset": {"name": args.dataset + (f"/{args.world}" if args.dataset == "shapes" else ""),
                           "images": len(data.ids), "bad_images": data.bad},
               "clip": clip_spec, "decoding": {k: getattr(args, k) for k in (
                   "num_beams", "no_repeat_ngram_size", "min_new_tokens", "max_new_tokens", "sample")},
               "timing_s": timing, "policies": {}}
    for p in policies:
        if p.name not in captions:
            torch.manual_seed(args.seed)
            dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32
            model, processor = vlrm.load_policy(p.spec, p.state, dtype=dtype, device=device)
            captions[p.name] = caption(model, processor, data.images, args, device)
            del model
            lap(f"{p.name}: captioning")
        caps = captions[p.name]
        m = judge.recall(caps)
        m.update(caption_stats(caps), clip_truncated=judge.truncated_share(caps))
        if data.references:
            m.update(bleu4=bleu4(caps, data.references), cider_d=cider_d(caps, data.references))
        if data.scenes:
            m.update(attribute_metrics(caps, data.scenes), **object_metrics(caps, data.scenes))
        results["policies"][p.name] = {"source": p.captions_file or p.spec, "trainable_state": p.state,
                                       "run_dir": str(p.run_dir) if p.run_dir else None, "metrics": m}
        lap(f"{p.name}: metrics")
    write_outputs(args, results, data, captions, {p.name: p.run_dir for p in policies if p.run_dir})
    lap("report")
    return results


def write_outputs(args, results, data, captions, runs) -> None:
    names = list(results["policies"])
    metrics = [results["policies"][n]["metrics"] for n in names]
    table = [(label, [cell(m, key, fmt) for m in metrics])
             for label, key, fmt in TABLE if any(k.startswith(key) for m in metrics for k in m)]
    width = max(16, *(len(n) + 2 for n in names))
    print(f"\n{results['dataset']['name']}: {len(data.ids)} images, CLIP judge {results['clip']}")
    print(f"{'metric':<28}" + "".join(f"{n:>{width}}" for n in names))
    for label, vals in table:
        print(f"{label:<28}" + "".join(f"{v:>{width}}" for v in vals))
    out = Path(args.out)  # made by evaluate() before any captioning
    for n in names:  # the format --captions reads back
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", n)
        (out / f"captions_{safe}.json").write_text(json.dumps(dict(zip(data.ids, captions[n])), indent=1))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.html").write_text(html_report(results, names, table, data, captions, runs, args.grid))
    print(f"\nwrote {out / 'results.json'}, {out / 'report.html'} and the captions", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        evaluate(args)
    except vlrm.UsageError as e:  # ours derive from it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
