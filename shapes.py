"""shapes.py: the miniature captioning world that vlrm trains in, offline, on a CPU.

VLRM fine-tunes BLIP-2 OPT-2.7B with rewards from CLIP and BLIP2-ITM. None of those weights can be
downloaded here, and none would run on a 2-core CPU. So the repository ships a world in miniature where the
same code, the same model classes and the same file formats reproduce the paper's premise:

* scenes: 48x48 pictures of a large coloured shape and up to two small ones on a background, each
  with known attributes;
* a captioner (`Blip2ForConditionalGeneration`) that saw detailed captions first and then *shallow*
  ones ("a circle"), like BLIP-2 fine-tuned on COCO/LAION captions that name only the main object;
* reward models that know better: an open_clip CLIP and a `Blip2ForImageTextRetrieval` ITM model,
  trained on rich captions ("a large blue square in the middle on a grey background with a small
  red circle at top left"), plus the OPT the captioner starts from as the reference language model;
* a *judge* CLIP trained independently, that the policy never sees, to score the result honestly.

This file is what a run needs: the scenes, their rendering, the caption grammar and its parser, and the
shipped world's loading and checks. The training of the five models is in build_world.py, with the design
choices behind them; only a rebuild imports it. The default world ships with the repository
(world/default-seed0: the five model folders in fp16, the scenes, the manifest and the quality report);
its images are rendered into the cache on first use and checked against the build's checksums.

Run:
    python shapes.py                  # load the shipped world and print its quality report
    python shapes.py --preset test    # the same for the tiny test world, once build_world.py has built it
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WORLD_VERSION = 17  # bump when scenes, captions or training change, so old caches are rebuilt
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, shared by every model here
STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------
# Settings
@dataclass(frozen=True)
class WorldConfig:
    name: str
    """preset name; also the cache folder's name"""
    seed: int = 0
    """every scene and every weight follows from it"""
    image_size: int = 48
    """pixels"""
    patch_size: int = 16
    """ViT patch side; image_size / 3, so that each grid cell is one patch and each object one token"""
    n_train: int = 20000
    """training scenes (world models and RL rollouts)"""
    n_val: int = 500
    """validation scenes (RL progress)"""
    n_test: int = 1000
    """test scenes (all reported figures); unique, and disjoint from train and val"""
    width: int = 96
    """hidden size of every tiny model"""
    layers: int = 3
    """transformer layers of the vision towers"""
    lm_layers: int = 2
    """transformer layers of the OPT language model"""
    judge_width: int = 64
    """the judge CLIP differs in width and seed from the reward CLIP"""
    num_query_tokens: int = 16
    """BLIP-2 query tokens = soft-prefix length of the LM"""
    batch_size: int = 128
    lm_steps: int = 500
    captioner_steps: int = 750
    captioner_detail_steps: int = 500
    """the captioner's first steps are on detailed true captions, the rest on shallow ones (build_world.py's
    design choice 5)"""
    captioner_lm_lr: float = 5e-4
    """the captioner's OPT is fine-tuned at this rate (Q-Former: 2e-3); build_world.py's design choice 3"""
    clip_steps: int = 3000
    """reward CLIP (its image tower is also BLIP-2's ViT): trained until it reads small shapes and positions"""
    judge_steps: int = 2400
    """the judge: trained until rich ground-truth captions find their image (the ceiling) almost always"""
    itm_steps: int = 3000
    """BLIP2-ITM stand-in; its Q-Former learns the match from the frozen ViT's features"""
    twins: bool = True
    """binding twins in the training batches of the reward CLIP, the judge and the ITM (build_world.py's
    design choice 9); off in the control world, which is otherwise built the same"""


PRESETS = {
    "default": WorldConfig("default"),
    "control": WorldConfig("control", twins=False),  # the default without binding twins: what they change
    "test": WorldConfig("test", n_train=1200, n_val=64, n_test=200, width=32, layers=1, lm_layers=1, judge_width=32,
                        num_query_tokens=8, batch_size=64, lm_steps=120, captioner_steps=120,
                        captioner_detail_steps=60, clip_steps=60, judge_steps=60, itm_steps=60),
}
MODEL_DIRS = ("ref_lm", "captioner", "itm", "clip", "judge_clip")


# ----------------------------------------------------------------------------------------------------
# Scenes: attributes, rendering, captions
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30), "pink": (250, 140, 200)}
# Radius as a fraction of the image side: a small object is 10 px across, a hard but readable target
# (the notebook's v9 and v15 drafts tried larger ones).
SIZES = {"small": 0.11, "large": 0.19}
BACKGROUNDS = {"black": (20, 20, 20), "grey": (120, 120, 120), "white": (235, 235, 235)}
# cell = 3*row + col. No two positions share a word 3-gram, but a 3-gram can run from a shape into its
# position: "a green cross at top and a blue cross at top right" repeats "cross at top". 11% of rich test
# captions repeat a 3-gram that way, so vlrm's default repetition penalty also fires on some true ones.
POSITIONS = ("at top left", "at top", "at top right", "on the left", "in the middle",
             "on the right", "at bottom left", "at bottom", "at bottom right")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int          # 0..8, row-major 3x3 grid
    dx: float = 0.0    # jitter inside the cell, fraction of the image side
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # main object first (the large one), then reading order
    background: str

    def key(self) -> tuple:
        """What a caption can tell apart: the scene without its jitter."""
        return (self.background,) + tuple((o.shape, o.colour, o.size, o.cell) for o in self.objects)


def order_objects(objects) -> tuple[Obj, ...]:
    main = min(objects, key=lambda o: (o.size != "large", o.cell))
    return (main,) + tuple(sorted((o for o in objects if o is not main), key=lambda o: o.cell))


def sample_scene(rng: random.Random) -> Scene:
    """One large main object, like a photo's subject, and up to two small ones. (With sizes drawn freely,
    'main' among equal sizes fell back to reading order, and the base captioner picked the wrong object
    in 23% of two-large scenes but in 0.4% of scenes with one large object.)"""
    cells = rng.sample(range(9), rng.randint(1, 3))
    objects = [Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), "small" if i else "large", c,
                   rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)) for i, c in enumerate(cells)]
    return Scene(order_objects(objects), rng.choice(list(BACKGROUNDS)))


def make_splits(cfg: WorldConfig) -> dict[str, list[Scene]]:
    """Test and val scenes are unique (two identical scenes could not be told apart by any caption);
    train never repeats a test or val scene."""
    rng = random.Random(cfg.seed)
    splits, seen = {}, set()
    for split, n, unique in (("test", cfg.n_test, True), ("val", cfg.n_val, True), ("train", cfg.n_train, False)):
        scenes = []
        while len(scenes) < n:
            s = sample_scene(rng)
            if s.key() in seen:
                continue
            if unique:
                seen.add(s.key())
            scenes.append(s)
        splits[split] = scenes
    return splits


def render(scene: Scene, size: int = 48) -> Image.Image:
    """Draw at 4x and downsample, so edges are anti-aliased like a photo's."""
    big = 4 * size
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        row, col = divmod(o.cell, 3)
        cx, cy = (col + 0.5 + 3 * o.dx) * big / 3, (row + 0.5 + 3 * o.dy) * big / 3
        r, fill = SIZES[o.size] * big, COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = 0.85 * r
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # cross
            t = 0.35 * r
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene, objects: int | None = None, size=True, colour=True, position=True,
             background=True) -> str:
    """A caption naming the first `objects` objects with the chosen attributes. All defaults = rich."""
    phrases = [object_phrase(o, size, colour, position) for o in scene.objects[:objects]]
    return join_objects(phrases, scene.background if background else None)


def object_phrase(o: Obj, size=True, colour=True, position=True) -> str:
    """One object with the chosen attributes: "a small red circle at top left"."""
    words = ([o.size] if size else []) + ([o.colour] if colour else []) + [o.shape]
    return " ".join([_article(words[0])] + words + ([POSITIONS[o.cell]] if position else []))


def join_objects(phrases: list[str], background: str | None = None) -> str:
    """The caption grammar: "A", "A on a grey background", "A with B and C", "A on a grey background with
    B and C". The background comes right after the main object (build_world.py's design choice 7)."""
    return (phrases[0] + (f" on a {background} background" if background else "")
            + ("" if len(phrases) == 1 else " with " + " and ".join(phrases[1:])))


def rich_caption(scene: Scene) -> str:
    return describe(scene)


# The parser of the grammar above, for evaluation (eval.py's attribute and CHAIR checks). It reads any
# caption, not only the grammar's: unknown words are skipped, a modifier binds to the next shape and a
# position phrase to the shape before it.
COLOUR_WORDS = set(COLOURS) | set(BACKGROUNDS) | {  # and the colour words of real captions, recognised as such
    "gray", "brown", "silver", "gold", "golden", "beige", "tan", "cyan", "magenta", "violet", "maroon", "navy",
    "teal", "turquoise", "blond", "blonde"}
PLURALS = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
POSITION_WORDS = sorted(((tuple(p.split()), cell) for cell, p in enumerate(POSITIONS)), key=lambda x: -len(x[0]))


def parse_caption(toks: list[str]) -> tuple[list[dict], list[tuple[str, object]], str | None]:
    """A caption's words (vlrm.words: lower-case, no punctuation) -> (objects named, each {"shape", and
    "colour"/"size"/"position" when given}; attributes bound to no shape, as (kind, value); the background
    named, or None). Tolerant: anything else is skipped."""
    objects, loose, background, pending, i = [], [], None, {}, 0
    while i < len(toks):
        w = toks[i]
        position = next(((n, cell) for n, cell in POSITION_WORDS if tuple(toks[i:i + len(n)]) == n), None)
        if w in COLOUR_WORDS and i + 1 < len(toks) and toks[i + 1] == "background":
            background, i = ("grey" if w == "gray" else w), i + 2
            continue
        if position is not None:
            if objects and "position" not in objects[-1] and not pending:
                objects[-1]["position"] = position[1]  # "a circle at top left": the phrase follows its shape
            else:
                loose.append(("position", position[1]))
            i += len(position[0])
            continue
        if w in SHAPES or w in PLURALS:
            objects.append({"shape": PLURALS.get(w, w), **pending})
            pending = {}
        elif w in SIZES or w in COLOUR_WORDS:
            kind = "size" if w in SIZES else "colour"
            if kind in pending:  # "a red blue circle": the first modifier is left without a shape
                loose.append((kind, pending[kind]))
            pending[kind] = w
        i += 1
    loose += list(pending.items())  # modifiers never followed by a shape
    return objects, loose, background


def scene_objects(scene: Scene) -> list[dict]:
    """The scene's objects in parse_caption's terms."""
    return [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.cell} for o in scene.objects]


# ----------------------------------------------------------------------------------------------------
# The world on disk
SHIPPED = Path(__file__).parent / "world"  # the default world as the repository ships it: nothing to build


class World:
    """A world: scenes with their attributes, rendered images, and model directories that load with the
    paper setting's own functions (transformers `from_pretrained`, open_clip `local-dir:`). A built world
    is one folder; a shipped one keeps its models, manifest and report in the repository (`root`) and its
    scenes and rendered images in the cache (`data`)."""

    def __init__(self, root: Path, data: Path | None = None):
        self.root, self.data = Path(root), Path(data or root)
        manifest = json.loads((self.root / "manifest.json").read_text())
        self.config = WorldConfig(**manifest["config"])
        self.scenes = read_scenes((self.data / "scenes.json").read_text())
        self._images = {}

    def path(self, model: str) -> str:
        """Directory of one of MODEL_DIRS. CLIPs load as open_clip 'local-dir:<path>'."""
        if model not in MODEL_DIRS:
            raise ValueError(f"the world has no model {model!r}; it has {', '.join(MODEL_DIRS)}")
        return str(self.root / model)

    def images(self, split: str) -> np.ndarray:
        """(N, H, W, 3) uint8, memory-mapped."""
        if split not in self._images:
            self._images[split] = np.load(self.data / f"images_{split}.npy", mmap_mode="r")
        return self._images[split]

    def report(self) -> dict:
        return json.loads((self.root / "report.json").read_text())


def read_scenes(text: str) -> dict[str, list[Scene]]:
    """The splits of a scenes.json (write_scenes' format)."""
    raw = json.loads(text)
    return {split: [Scene(tuple(Obj(**o) for o in s["objects"]), s["background"]) for s in scenes]
            for split, scenes in raw.items()}


def write_scenes(splits: dict[str, list[Scene]], image_size: int, out: Path) -> None:
    """scenes.json and each split's rendered images, images_<split>.npy (N, S, S, 3) uint8."""
    for split, scenes in splits.items():
        np.save(out / f"images_{split}.npy", np.stack([np.asarray(render(s, image_size)) for s in scenes]))
    (out / "scenes.json").write_text(json.dumps({k: [dataclasses.asdict(s) for s in v] for k, v in splits.items()}))


def default_root() -> Path:
    return Path(os.environ.get("VLRM_CACHE", Path.home() / ".cache" / "vlrm")) / "worlds"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_model_file(rel: str) -> bool:
    return rel.split("/")[0] in MODEL_DIRS


def manifest_problem(root: Path, cfg: WorldConfig, files=lambda rel: True, data: Path | None = None) -> str | None:
    """None if the manifest at `root` matches these settings and WORLD_VERSION, and every file it lists
    that `files` selects is in `root` (models) or `data` (scenes, images) with its SHA-256; else what is
    wrong."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest ({e.__class__.__name__})"
    if manifest.get("world_version") != WORLD_VERSION or manifest.get("config") != dataclasses.asdict(cfg):
        return "stale: built with other settings or an older version of build_world.py"
    for rel, digest in manifest["files"].items():
        f = (root if data is None or is_model_file(rel) else data) / rel
        if files(rel) and (not f.is_file() or sha256(f) != digest):
            return f"corrupt: {rel} is missing or does not match its checksum"
    return None


def _render_shipped(ship: Path, data: Path, cfg: WorldConfig) -> str | None:
    """Unpack the shipped scenes and render their images into `data`, unless they are there already; both
    are checked against the build's SHA-256. -> None, or what went wrong (`data` is then left as it was)."""
    def own(rel):  # the files a shipped world keeps in the cache
        return not is_model_file(rel)
    if data.is_dir() and manifest_problem(ship, cfg, own, data) is None:
        return None
    for left in data.parent.glob(f".{data.name}.tmp-*"):  # of renders that were killed
        shutil.rmtree(left)
    tmp = data.with_name(f".{data.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        write_scenes(read_scenes(gzip.decompress((ship / "scenes.json.gz").read_bytes())), cfg.image_size, tmp)
        problem = manifest_problem(ship, cfg, own, tmp)
        if problem is None:
            shutil.rmtree(data, ignore_errors=True)
            os.replace(tmp, data)
        return problem and problem.replace("corrupt", "rendered differently from the build")
    except (OSError, ValueError, EOFError) as e:  # an unreadable or truncated scenes.json.gz
        return f"its scenes cannot be read ({type(e).__name__}: {e})"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_report(report: dict) -> None:
    ceiling, base = report["ceiling_r1_judge"], report["base_r1_judge"]
    rows = [
        ("judge CLIP R@1, rich captions (ceiling)", f"{ceiling:.3f}", ">= 0.95"),
        ("reward CLIP R@1, rich captions", f"{report['ceiling_r1_reward_clip']:.3f}", "similar"),
        ("base captioner: main shape named", f"{report['base_main_shape_accuracy']:.3f}", ">= 0.90"),
        ("base captioner: judge R@1", f"{base:.3f} ({base / max(ceiling, 1e-9):.3f} x ceiling)", "<= 0.05 x ceiling"),
        ("base / rich mean words", f"{report['base_mean_words']:.1f} / {report['rich_mean_words']:.1f}", "<= 0.5"),
        ("base captioner sampled (T=1): mean words", f"{report['base_sampled_mean_words']:.1f}", "> greedy"),
        ("ITM ROC-AUC, true vs false: rich / short",
         f"{report['itm_roc_auc']:.3f} / {report['itm_roc_auc_short']:.3f}", "aim >= 0.95"),
    ]
    targets = {"position": ">= 0.95 for all three", "small_shape": ">= 0.85 for judge and CLIP"}
    binding = {f"{kind}_{word}": f"{word} {how}" for kind, how in (("steal", "taken from the third object"),
                                                                    ("swap", "exchanged, first two"))
               for word in ("colour", "shape", "position")}
    targets.update({stem: ">= 0.95, ITM >= 0.90" for stem in binding})
    for stem, what in [("position", "moved main object"), ("small_shape", "small object's shape"),
                       ("small_colour", "small object's colour"), ("background", "background"), *binding.items()]:
        keys = (f"{stem}_pairwise_judge", f"{stem}_pairwise_reward_clip", f"itm_{stem}_pairwise")
        if all(k in report for k in keys):  # reports written before a probe existed lack it
            rows.append((f"right vs {what}: judge / CLIP / ITM", " / ".join(f"{report[k]:.2f}" for k in keys),
                         targets.get(stem, "> 0.5 (blind = 0.5)")))
    rows.append(("ref LM mean log-prob: rich / salad",
                 f"{report['lm_logprob_rich']:.2f} / {report['lm_logprob_salad']:.2f}", "rich > salad"))
    if "build_seconds" in report:
        rows.append(("build time", f"{report['build_seconds']:.0f} s", "<= 30 min on 2 CPU cores"))
    print(f"\nMiniature world quality report ({report['n_test']} test scenes)")
    for name, value, target in rows:
        print(f"  {name:<64} {value:<24} target {target}")
    print("  base captions:", " | ".join(report["base_samples"]))


class WorldUnavailable(RuntimeError):
    """No usable world for these settings; the message says how to build one."""


def world_location(preset: str, root: str | Path | None = None, seed: int | None = None) -> tuple[WorldConfig, Path]:
    """The settings of `preset` (with `seed`) and the folder a build of them lives in: `root` (default
    $VLRM_CACHE/worlds or ~/.cache/vlrm/worlds) / <name>-seed<seed>."""
    if preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset] if seed is None else dataclasses.replace(PRESETS[preset], seed=seed)
    return cfg, (Path(root) if root is not None else default_root()) / f"{cfg.name}-seed{cfg.seed}"


@contextlib.contextmanager
def world_lock(target: Path):
    """Held while the world at `target` is checked, rendered or built: only the holder writes (torchrun's
    ranks, parallel test runs)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_world(preset: str = "default", root: str | Path | None = None, seed: int | None = None,
               shipped: str | Path | None = "auto") -> World:
    """The world for `preset`: the one the repository ships, if it ships one for these settings and it
    checks (its images rendered into the cache on first use); else the one build_world.py built into `root`
    (default $VLRM_CACHE/worlds or ~/.cache/vlrm/worlds). `shipped` is the folder of shipped worlds: SHIPPED
    unless `root` is given (a given root means the worlds built there). Nothing in the repository is ever
    written. Raises WorldUnavailable, saying how to build the world, if neither is usable."""
    cfg, target = world_location(preset, root, seed)
    shipped = (SHIPPED if root is None else None) if shipped == "auto" else shipped
    ship, ship_problem = Path(shipped) / target.name if shipped is not None else None, None
    with world_lock(target):
        if ship is not None and ship.is_dir():
            data = target.with_name(f"shipped-{target.name}")
            ship_problem = manifest_problem(ship, cfg, is_model_file) or _render_shipped(ship, data, cfg)
            if ship_problem is None:
                return World(ship, data)
        problem = manifest_problem(target, cfg) if target.exists() else "not built"
        if problem is None:
            if ship_problem:
                print(f"[shapes] the shipped world in {ship} cannot be used ({ship_problem}); using the build in "
                      f"{target}. The repository's copy is left as it is.", file=sys.stderr)
            return World(target)
    flags = (f"--preset {preset}" + (f" --root {root}" if root is not None else "")
             + (f" --seed {seed}" if seed is not None else ""))
    took = "about a minute" if preset == "test" else "about half an hour on 2 CPU cores"
    if ship_problem:
        raise WorldUnavailable(f"the shipped world in {ship} cannot be used ({ship_problem}), and {target} holds no "
                               f"usable build ({problem}). Restore world/ (git checkout -- world), or build the "
                               f"world into the cache: python build_world.py {flags} ({took})")
    raise WorldUnavailable(f"no usable '{preset}' world in {target} ({problem}); build it with: "
                           f"python build_world.py {flags} ({took})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Load the miniature VLRM world and print its quality report.")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--root", default=None, help="the worlds built here by build_world.py (default: the "
                                                     "shipped world, else the cache)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        world = load_world(args.preset, args.root, seed=args.seed)
    except WorldUnavailable as e:
        parser.exit(2, f"error: {e}\n")
    print(f"world: {world.root}" + (f" (scenes and images: {world.data})" if world.data != world.root else ""))
    print_report(world.report())


if __name__ == "__main__":
    main()
