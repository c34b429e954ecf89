"""The paper setting at its real sizes, with random weights: measure GPU memory and speed with no download.

Writes BLIP-2 OPT-2.7B, BLIP2-ITM ViT-g, OPT-2.7B and CLIP ViT-L/14 built from their real configurations
with random weights, stand-in word-level tokenizers with the real vocabulary sizes, and a folder of random
images. vlrm.py then trains on them through its ordinary loaders, and its metrics.jsonl records
`perf/steps_per_s` and `perf/gpu_peak_gb`. A random policy rarely samples EOS, so its captions run to the
full `--max-new-tokens`: the worst case for memory and time.

    python bench_paper.py --out /tmp/paper                       # ~16 GB of weights
    python vlrm.py --preset paper --policy /tmp/paper/blip2 --itm /tmp/paper/itm --ref-lm /tmp/paper/opt \
        --clip /tmp/paper/clip --images /tmp/paper/images --steps 20 --batch-size 32 --run-dir /tmp/run32
"""
import argparse
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor,
                          Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor, OPTConfig,
                          PreTrainedTokenizerFast)

import build_world
import shapes


def blip2_opt_2_7b_config() -> Blip2Config:
    """The architecture of Salesforce/blip2-opt-2.7b, written out so that it can be built without a download
    (on the meta device to count parameters, or with random weights to benchmark a GPU): an EVA ViT-g
    (the library defaults), a 12-layer Q-Former with 32 queries, OPT-2.7B. The hub's config also has an
    image token (50265) and ends captions at a newline (eos 50118); neither changes a size or a speed."""
    opt = OPTConfig(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                    max_position_embeddings=2048, word_embed_proj_dim=2560, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2)
    return Blip2Config(vision_config=Blip2VisionConfig().to_dict(), qformer_config=Blip2QFormerConfig().to_dict(),
                       text_config=opt.to_dict(), num_query_tokens=32)


def word_tokenizer(size: int, specials: dict, template: str, **roles) -> PreTrainedTokenizerFast:
    """A tokenizer of `size` ids: the specials at their real ids, words 'w<id>' elsewhere. Random token ids
    decode to text that the other models' tokenizers can read, at about one token per word."""
    vocab = {f"w{i}": i for i in range(size)}
    for name, i in specials.items():
        vocab.pop(f"w{i}")
        vocab[name] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=roles["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
        (name, i) for name, i in specials.items() if name in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **roles)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the models and images")
    parser.add_argument("--images", type=int, default=512, help="random 256x256 images to write")
    args = parser.parse_args()
    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init is fast on a GPU
    pixels = BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=list(shapes.MEAN),
                                image_std=list(shapes.STD))  # OpenAI CLIP's statistics, as BLIP-2's

    # the captioner: Salesforce/blip2-opt-2.7b's architecture; OPT's tokenizer ids: <s>=0 <pad>=1 </s>=2 <unk>=3
    opt_tok = word_tokenizer(50272, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, "</s> $A",
                             bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    with torch.device(device):
        policy = Blip2ForConditionalGeneration(blip2_opt_2_7b_config()).to(torch.bfloat16)
    policy.save_pretrained(out / "blip2")
    Blip2Processor(pixels, opt_tok, num_query_tokens=32).save_pretrained(out / "blip2")
    policy.language_model.save_pretrained(out / "opt")  # the reference LM: OPT-2.7B
    opt_tok.save_pretrained(out / "opt")
    del policy

    # the ITM reward: Salesforce/blip2-itm-vit-g's architecture, BERT's ids: [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102
    bert_tok = word_tokenizer(30523, {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102}, "[CLS] $A [SEP]",
                              pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    config = Blip2Config(vision_config=Blip2VisionConfig().to_dict(),
                         qformer_config=Blip2QFormerConfig(vocab_size=30523, use_qformer_text_input=True).to_dict(),
                         num_query_tokens=32, image_text_hidden_size=256)
    with torch.device(device):
        itm = Blip2ForImageTextRetrieval(config).to(torch.bfloat16)
    itm.save_pretrained(out / "itm")
    Blip2Processor(pixels, bert_tok).save_pretrained(out / "itm")
    del itm

    # the CLIP reward: open_clip ViT-L-14 in the local-dir format (built on the CPU: 0.4 B parameters)
    clip = open_clip.create_model("ViT-L-14", pretrained=None)
    build_world.save_clip(clip, open_clip.get_model_config("ViT-L-14"), out / "clip")

    rng = np.random.default_rng(0)
    (out / "images").mkdir(exist_ok=True)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(out / "images" / f"{i:04d}.jpg")
    print(f"wrote the paper-size models and {args.images} images to {out}")


if __name__ == "__main__":
    main()
