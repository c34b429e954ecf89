"""Tests of eval.py: recall against a brute-force argsort, the caption parser and attribute metrics on
hand-made captions, BLEU-4/CIDEr-D against coco-caption's numbers, bad input, and an end-to-end run.

    HF_HUB_OFFLINE=1 python -m pytest -q test_eval.py
The tiny test world is built once (1-4 minutes) under $VLRM_TEST_WORLD_ROOT, or a pytest temp dir.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import shapes
import vlrm
from shapes import Obj, Scene

HERE = Path(__file__).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_eval(*argv):
    return subprocess.run([sys.executable, str(HERE / "eval.py"), *argv], capture_output=True, text=True,
                          env=ENV, cwd=HERE, timeout=300)


# ----------------------------------------------------------------------------------------------------
# Recall
def brute_force_ranks(queries, gallery, ties_against):
    """Position of each query's match in a descending argsort of cosine similarity (fp64). Tied items
    sort after the match (ties count for the query) or before it (ties count against)."""
    q = queries.double() / queries.double().norm(dim=1, keepdim=True)
    g = gallery.double() / gallery.double().norm(dim=1, keepdim=True)
    scores = (q @ g.T).numpy()
    ranks = []
    for i, row in enumerate(scores):
        is_match = np.arange(len(row)) == i
        order = np.lexsort((is_match if ties_against else ~is_match, -row))  # last key sorts first
        ranks.append(int(np.flatnonzero(order == i)[0]))
    return torch.tensor(ranks)


def test_recall_matches_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    n, d = 301, 24
    images = torch.randn(n, d, generator=gen)
    images[100] = images[7]            # identical images: a text-to-image tie, counted for the caption
    images[200] = 2 * images[50]       # a scaled copy has the same cosine: also a tie
    captions = [f"caption {i}" for i in range(n)]
    texts = torch.randn(n, d, generator=gen)
    for i in (3, 30, 60, 90):          # one caption written for four images: identical text embeddings
        captions[i], texts[i] = captions[3], texts[3]
    t2i, i2t = vlrm.kernels.retrieval_ranks(texts, images), ev.image_to_text_ranks(texts, images, captions)
    assert torch.equal(t2i, brute_force_ranks(texts, images, ties_against=False))
    assert torch.equal(i2t, brute_force_ranks(images, texts, ties_against=True))
    assert i2t[[3, 30, 60, 90]].min() >= 3  # each of four images sharing a caption ranks at best 4th


def test_identical_captions_cannot_win_image_to_text():
    images = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    texts = torch.ones(50, 8)  # "a circle" for every image
    r = ev.retrieval(texts, images, ["a circle"] * 50)
    assert r["i2t/R@1"] == 0.0 and r["i2t/median_rank"] >= 50
    r = ev.retrieval(images.clone(), images, [str(i) for i in range(50)])  # perfect captions
    assert r["t2i/R@1"] == 1.0 and r["i2t/R@1"] == 1.0 and r["t2i/mean_rank"] == 1.0


def test_copies_are_found_on_the_judges_tokens(world):
    # CLIP's tokenizer lowercases and drops extra spaces: these four are one text to the judge, so the
    # image-to-text guard must treat them as copies, not as four different captions
    judge = ev.ClipJudge(str(world.path("judge_clip")), np.array(world.images("test")[:4]), "cpu")
    captions = ["a circle", "A circle", "a  circle", "A  Circle"]
    emb, keys = vlrm.clip_text_embeddings(judge.model, judge.tokenizer, captions)
    assert len(set(keys)) == 1 and (emb == emb[0]).all()
    assert judge.recall(captions)["i2t/R@1"] == 0.0


# ----------------------------------------------------------------------------------------------------
# Parser and attribute metrics
SCENE = Scene((Obj("circle", "red", "large", 0), Obj("square", "blue", "small", 4), Obj("cross", "green", "small", 8)),
              "grey")


def test_parser_reads_the_world_grammar():
    objects, loose, background = ev.parse(shapes.rich_caption(SCENE))
    assert objects == [{"size": "large", "colour": "red", "shape": "circle", "position": 0},
                       {"size": "small", "colour": "blue", "shape": "square", "position": 4},
                       {"size": "small", "colour": "green", "shape": "cross", "position": 8}]
    assert loose == [] and background == "grey"
    # ungrammatical policy output: a stray modifier, a plural, a position with no shape before it
    objects, loose, background = ev.parse("red a An image of blue circles circles at bottom right, on the left")
    assert objects == [{"colour": "blue", "shape": "circle"}, {"shape": "circle", "position": 8}]
    assert loose == [("colour", "red"), ("position", 3)] and background is None


def test_rich_caption_has_precision_and_recall_one():
    m = ev.attribute_metrics([shapes.rich_caption(SCENE)], [SCENE])
    for kind in ev.KINDS + ("all",):
        assert m[f"attr/{kind}/precision"] == 1.0 and m[f"attr/{kind}/recall"] == 1.0
        assert m[f"attr/{kind}/hallucination"] == 0.0


def test_wrong_attributes_are_hallucinations():
    c = ev.attribute_counts("a large yellow circle at bottom left on a white background", SCENE)
    assert (c["shape/named"], c["shape/correct"]) == (1, 1)
    assert (c["colour/named"], c["colour/correct"]) == (1, 0)      # no yellow object
    assert (c["size/named"], c["size/correct"]) == (1, 1)
    assert (c["position/named"], c["position/correct"]) == (1, 0)  # the circle is at top left
    assert (c["background/named"], c["background/correct"]) == (1, 0)
    # binding: blue exists in the scene, but not on the circle
    c = ev.attribute_counts("a blue circle", SCENE)
    assert c["colour/correct"] == 0 and c["colour/recalled"] == 0
    # an absent shape is a hallucination; its colour is judged on its own (a red object exists)
    c = ev.attribute_counts("a red triangle", SCENE)
    assert (c["shape/correct"], c["colour/correct"]) == (0, 1)
    m = ev.attribute_metrics(["a red circle"], [SCENE])
    assert m["attr/all/precision"] == 1.0
    assert m["attr/shape/recall"] == pytest.approx(1 / 3) and m["attr/background/recall"] == 0.0
    assert m["attr/all/recall"] == pytest.approx(2 / 13)  # circle + red of 3 * 4 + 1 ground-truth attributes


# Two pink triangles, one of them the main object, and a blue square
DOUBLE = Scene((Obj("triangle", "pink", "large", 4), Obj("triangle", "pink", "small", 0),
                Obj("square", "blue", "small", 8)), "black")


def hallucinated(caption, scene):
    """(mentions, hallucinated mentions) of one caption."""
    m = ev.object_metrics([caption], [scene])
    return m["objects/mentions"], round(m["objects/chair_i"] * m["objects/mentions"]) if m["objects/mentions"] else 0


def test_object_mentions_are_matched_one_to_one():
    assert hallucinated(shapes.rich_caption(SCENE), SCENE) == (3, 0)
    assert hallucinated(shapes.rich_caption(DOUBLE), DOUBLE) == (3, 0)
    # the single main object named twice: the second mention has no object left
    assert hallucinated("a red circle on a grey background with a red circle", SCENE) == (2, 1)
    # a real double: the scene holds two pink triangles
    assert hallucinated("a pink triangle on a black background with a pink triangle", DOUBLE) == (2, 0)
    assert hallucinated("a pink triangle with a pink triangle and a pink triangle", DOUBLE) == (3, 1)
    # four mentions, three objects
    assert hallucinated("a red circle with a blue square and a green cross and a square", SCENE)[1] >= 1
    # a bare shape matches any free object of that shape; none there, it is hallucinated
    assert hallucinated("a circle", Scene((Obj("circle", "red", "large", 4),), "grey")) == (1, 0)
    assert hallucinated("a circle", Scene((Obj("square", "red", "large", 4),), "grey")) == (1, 1)
    # matching must not be greedy: "a triangle" first takes the main triangle, which is the only object
    # "a large pink triangle in the middle" fits; a maximum matching moves the first to the small one
    assert hallucinated("a triangle with a large pink triangle in the middle", DOUBLE) == (2, 0)
    # nothing parseable: no mentions, no division by zero
    m = ev.object_metrics(["the the the", ""], [SCENE, SCENE])
    assert m == {"objects/chair_i": None, "objects/chair_s": 0.0, "objects/mentions": 0.0, "objects/recall": 0.0}
    m = ev.object_metrics(["a red circle", "a red circle with a red circle", "a red triangle"], [SCENE] * 3)
    assert m["objects/chair_i"] == pytest.approx(2 / 4) and m["objects/chair_s"] == pytest.approx(2 / 3)


def test_object_recall_counts_scene_objects_named_once_each():
    """AMBER's cover: scene objects matched by a mention / scene objects; a double or a false mention adds nothing."""
    def recall(caption, scene):
        return ev.object_metrics([caption], [scene])["objects/recall"]
    assert recall(shapes.rich_caption(SCENE), SCENE) == 1.0
    assert recall(shapes.describe(SCENE, objects=2), SCENE) == pytest.approx(2 / 3)
    assert recall("a red circle on a grey background with a red circle", SCENE) == pytest.approx(1 / 3)
    assert recall("a pink triangle with a pink triangle", DOUBLE) == pytest.approx(2 / 3)  # a real double counts
    assert recall("a yellow diamond", SCENE) == 0.0
    m = ev.object_metrics([shapes.rich_caption(SCENE), "a green cross"], [SCENE, DOUBLE])
    assert m["objects/recall"] == pytest.approx(3 / 6)  # pooled over all scene objects


def test_report_marks_absent_and_doubled_objects():
    missing, doubled = ev.caption_marks("a large yellow circle at bottom left on a white background", SCENE)
    assert missing == ["large yellow circle at bottom left", "white background"] and doubled == []
    missing, doubled = ev.caption_marks("a red circle on a grey background with a blue square and a blue square",
                                        SCENE)
    assert missing == [] and doubled == ["blue square"]
    missing, _ = ev.caption_marks("a red circle in the middle and red", SCENE)  # position bound, "red" loose
    assert missing == ["red circle in the middle"]
    missing, _ = ev.caption_marks("purple a red circle", SCENE)  # a loose colour no object has
    assert missing == ["purple"]


def test_looping_needs_three_occurrences():
    s = ev.caption_stats(["a red circle a red circle a red circle", "a red circle with a red circle",
                          "a red circle"])
    assert s["loop_3gram"] == pytest.approx(1 / 3)  # the second repeats its 3-grams twice only
    assert s["repeat_3gram"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------------
# Policies and decoding
def test_policy_arguments(tmp_path):
    args = ev.parse_args(["--policy", "blip2=Salesforce/blip2-opt-2.7b", "--policy", "Salesforce/blip2-opt-2.7b",
                          "--trainable-state", "vlrm.pt", "--captions", "out/caps.json"])
    assert [(p.name, p.spec, p.state, p.captions_file) for p in args.policies] == [
        ("blip2", "Salesforce/blip2-opt-2.7b", None, None),
        ("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", "vlrm.pt", None),
        ("caps", None, None, "out/caps.json")]
    assert ev.parse_args([]).policies == []
    run = tmp_path / "run"
    (run / "checkpoint" / "policy").mkdir(parents=True)
    (run / "checkpoint" / "trainer.pt").write_bytes(b"")
    for spec in (run, run / "checkpoint"):  # a run directory or its checkpoint
        p = ev.resolve(ev.Policy("r", spec=str(spec)))
        assert (p.spec, p.run_dir) == (str(run / "checkpoint" / "policy"), run)
    assert ev.resolve(ev.Policy("h", spec="Salesforce/blip2-opt-2.7b")).run_dir is None



def test_decoding_flags_reach_generate(world):
    policy, processor = vlrm.load_policy(world.path("captioner"))
    images = np.array(world.images("test")[:6])
    greedy = ev.caption(policy, processor, images, ev.parse_args([]), "cpu")
    to_pixels = vlrm.processor_normalizer(processor, "cpu")
    assert greedy == vlrm.caption_images(policy, processor.tokenizer, to_pixels, images, max_new_tokens=40)  # validation's
    args = ev.parse_args(["--num-beams", "3", "--no-repeat-ngram-size", "2", "--min-new-tokens", "10",
                          "--max-new-tokens", "12"])
    for c in ev.caption(policy, processor, images, args, "cpu"):
        assert len(processor.tokenizer(c, add_special_tokens=False).input_ids) >= 8  # greedy stops at ~4 tokens
        assert len(set(ev.ngrams(vlrm.words(c), 2))) == len(ev.ngrams(vlrm.words(c), 2))


# ----------------------------------------------------------------------------------------------------
# Text metrics
HYPS = ["a small red circle at top left on a grey background", "a blue square in the middle",
        "a cat sitting on a mat", "a large green triangle and a small pink cross on a white background",
        "two dogs play in the park", "a red circle a red circle a red circle"]  # repeats: both clip
REFS = [["a small red circle at top left on a grey background", "a red circle on a grey background"],
        ["a large blue square in the middle on a black background"],
        ["the cat sat on the mat", "a cat is sitting on a mat"],
        ["a large green triangle at top and a small pink cross at bottom on a white background"],
        ["dogs playing in a park", "two dogs run through the grass in a park"],
        ["a red circle on the left", "a red circle"]]


def test_bleu_and_cider_match_coco_caption():
    # pycocoevalcap 1.2 (Bleu(4), Cider()) on these exact captions, already lower-case and unpunctuated
    assert ev.bleu4(HYPS, REFS) == pytest.approx(0.566452995749895, abs=1e-9)
    assert ev.cider_d(HYPS, REFS) == pytest.approx(3.6919638109112682, abs=1e-9)
    assert ev.bleu4(["a circle"], [["a circle"]]) == 0.0  # no 4-gram: BLEU-4 is 0
    assert ev.bleu4(HYPS[:1], REFS[:1]) == pytest.approx(1.0)


def test_caption_stats():
    s = ev.caption_stats(["A red circle", "an image of a circle a circle a circle", "a circle in 1999"])
    assert s["words"] == pytest.approx((3 + 9 + 4) / 3)
    assert s["colour_rate"] == pytest.approx(1 / 3) and s["repeat_3gram"] == pytest.approx(1 / 3)
    assert s["bad_phrase"] == pytest.approx(2 / 3)
    assert s["distinct_1"] == pytest.approx(8 / 16)


# ----------------------------------------------------------------------------------------------------
# Bad input
def test_captions_file_must_match_the_images(tmp_path):
    data = ev.Dataset(["0", "1", "2"], np.zeros((3, 4, 4, 3), np.uint8))
    lines = tmp_path / "caps.txt"
    lines.write_text("a circle\na square\n")
    with pytest.raises(ev.UsageError, match=r"2 captions for 3 images: from position 2 on, image '2' has no caption"):
        ev.read_captions(str(lines), data, limited=False)
    table = tmp_path / "caps.json"
    table.write_text(json.dumps({"0": "a circle", "2": "a cross", "7": "a square"}))
    with pytest.raises(ev.UsageError, match="no caption for image '1'"):
        ev.read_captions(str(table), data, limited=False)
    table.write_text(json.dumps({"0": "a", "1": "b", "2": "c", "7": "d"}))
    with pytest.raises(ev.UsageError, match="names image '7', which is not in the test set"):
        ev.read_captions(str(table), data, limited=False)
    table.write_text(json.dumps([{"image_id": i, "caption": f"c{i} "} for i in (2, 1, 0)]))  # COCO results
    assert ev.read_captions(str(table), data, limited=False) == ["c0", "c1", "c2"]
    lines.write_text("a\nb\nc\nd\n")
    with pytest.raises(ev.UsageError, match="4 captions for 3 images: from position 3 on, caption 'd' has no image"):
        ev.read_captions(str(lines), data, limited=False)
    assert ev.read_captions(str(lines), data, limited=True) == ["a", "b", "c"]  # --limit: the first ones
    # an unreadable image was skipped: an in-order list still counts it, so later captions stay aligned
    skipped = ev.Dataset(["x.png", "z.png"], np.zeros((2, 4, 4, 3), np.uint8), all_ids=["x.png", "y.png", "z.png"])
    lines.write_text("for x\nfor y\nfor z\n")
    assert ev.read_captions(str(lines), skipped, limited=False) == ["for x", "for z"]
    # two images with one file name: their relative paths key them, the shared name keys neither
    nested = ev.Dataset(["b.png", "sub/b.png"], np.zeros((2, 4, 4, 3), np.uint8), files=["b.png", "b.png"])
    table.write_text(json.dumps({"sub/b.png": "second", "b.png": "first"}))
    assert ev.read_captions(str(table), nested, limited=False) == ["first", "second"]


def make_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (64, 40), colour).save(folder / name)
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_unreadable_images_are_counted(tmp_path):
    folder = make_folder(tmp_path)
    paths = sorted(folder.iterdir())
    with pytest.raises(ev.UsageError, match=r"(?s)1 of 3 images cannot be read:\n.*broken.png.*--skip-bad-images"):
        ev.load_files([p.name for p in paths], paths, None, 32, skip_bad=False)
    data = ev.load_files([p.name for p in paths], paths + [folder / "missing.png"], None, 32, skip_bad=True)
    assert data.ids == ["a.png", "b.png"] and data.images.shape == (2, 32, 32, 3) and len(data.bad) == 2
    assert data.images[0, 0, 0].tolist() == [255, 0, 0]


def test_bad_images_stop_the_cli_with_exit_code_2(tmp_path, world):
    folder = make_folder(tmp_path)
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"b.png": "a blue square", "a.png": "a red square"}))  # keyed by relative path
    common = ["--dataset", "folder", "--images", str(folder), "--image-size", "48", "--captions", f"mine={caps}",
              "--clip", world.path("judge_clip"), "--out", str(tmp_path / "out")]
    r = run_eval(*common)
    assert r.returncode == 2 and "broken.png" in r.stderr and "--skip-bad-images" in r.stderr
    assert "Traceback" not in r.stderr
    ev.main(common + ["--skip-bad-images"])  # in-process: a subprocess costs ~10 s of imports
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["dataset"]["images"] == 2 and len(results["dataset"]["bad_images"]) == 1
    assert results["policies"]["mine"]["metrics"]["colour_rate"] == 1.0


def test_usage_errors_exit_2(tmp_path, capsys):
    """main() turns every usage error into a message and exit code 2 (an escaping exception fails here)."""
    a_file, no_filename, a_list, empty_refs = (tmp_path / n for n in ("file", "coco.json", "list.json", "refs.json"))
    a_file.write_text("")
    no_filename.write_text(json.dumps({"images": [{"split": "test", "cocoid": 1}]}))
    a_list.write_text(json.dumps(["a circle"]))
    folder = make_folder(tmp_path)
    empty_refs.write_text(json.dumps({"a.png": [], "b.png": "a blue square", "broken.png": "noise"}))
    for argv, message in ((["--dataset", "coco", "--coco-json", str(tmp_path / "nope.json"), "--image-root", "."],
                           "nope.json"),
                          (["--trainable-state", "x.pt"], "must follow the --policy"),
                          (["--policy", "a=x", "--policy", "a=y"], "both called 'a'"),
                          (["--dataset", "folder", "--images", str(tmp_path / "none")], "--images DIR"),
                          (["--min-new-tokens", "-1"], "--min-new-tokens must be 0"),
                          (["--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size must be 0"),
                          (["--min-new-tokens", "50", "--max-new-tokens", "5"], "exceeds --max-new-tokens 5"),
                          (["--out", str(a_file)], "cannot be made a folder"),
                          (["--dataset", "coco", "--coco-json", str(no_filename), "--image-root", "."], "KeyError"),
                          (["--dataset", "folder", "--images", str(folder), "--references", str(a_list)],
                           "must be a JSON object"),
                          (["--dataset", "folder", "--images", str(folder), "--references", str(empty_refs)],
                           "not a caption or a non-empty list")):
        with pytest.raises(SystemExit) as exit_info:
            ev.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# End to end: the defaults (base captioner + latest run) on the test world
def test_end_to_end(tmp_path, world_root, world):
    run = tmp_path / "runs" / "tiny-run"
    shutil.copytree(world.path("captioner"), run / "checkpoint" / "policy")  # the base weights, as a "run"
    torch.save({"step": 40}, run / "checkpoint" / "trainer.pt")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/sequence": 0.1 * s, "reward/clip": 0.01 * s, "charts/caption_len": 2 + s / 10})
        + "\n" for s in range(10, 50, 10)) + json.dumps({"step": 40, "val/judge_r1": 12.5}) + "\n")
    out = tmp_path / "out"
    r = run_eval("--world", "test", "--world-root", str(world_root), "--limit", "50", "--runs", str(tmp_path / "runs"),
                 "--out", str(out), "--grid", "6")
    assert r.returncode == 0, r.stderr
    assert "R@1 text->image" in r.stdout and "colour prec/rec/halluc" in r.stdout and "[time]" in r.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["policies"]) == ["base", "tiny-run"] and results["dataset"]["images"] == 50
    base, tuned = (results["policies"][n]["metrics"] for n in ("base", "tiny-run"))
    assert base == tuned  # the same weights, found through the run directory
    assert 0 <= base["t2i/R@1"] <= base["t2i/R@5"] <= base["t2i/R@10"] <= 1
    assert 0 <= base["attr/all/precision"] <= 1 and base["bleu4"] >= 0 and base["cider_d"] >= 0
    assert {"objects/chair_i", "objects/chair_s", "objects/recall", "loop_3gram"} <= set(base)  # results.json's names
    assert "object halluc. CHAIR_i" in r.stdout and "looping 3-gram rate" in r.stdout
    captions = json.loads((out / "captions_base.json").read_text())
    assert list(captions) == [str(i) for i in range(50)] and all(isinstance(c, str) for c in captions.values())
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and page.count("<svg") == 4  # 4 curves logged
    assert "tiny-run" in page and "<script" not in page and "src='http" not in page
    # captions written by eval.py read back through --captions and score the same
    ev.main(["--world", "test", "--world-root", str(world_root), "--limit", "50", "--out", str(out / "again"),
             "--captions", f"copy={out / 'captions_base.json'}"])
    again = json.loads((out / "again" / "results.json").read_text())["policies"]["copy"]["metrics"]
    assert again == base


def test_no_run_says_so_and_evaluates_the_base_captioner(tmp_path, world_root, world):
    r = run_eval("--world", "test", "--world-root", str(world_root), "--limit", "20", "--runs", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out"), "--grid", "2")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("no trained run")]
    assert len(said) == 1 and "python vlrm.py --steps 5000" in said[0]
    assert list(json.loads((tmp_path / "out" / "results.json").read_text())["policies"]) == ["base"]
