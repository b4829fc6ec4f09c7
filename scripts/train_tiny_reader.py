"""Train `vs2ray-tiny-reader`: a tiny open_clip model of the shapes world that can read (issue 28).

    python scripts/train_tiny_reader.py --out /tmp/reader.safetensors

Its weights ship as vs2ray/assets/vs2ray-tiny-reader.safetensors (`model.arch: vs2ray-tiny-reader,
pretrained: bundled`); `shapes_typographic` is the dataset it is for (docs/companion.md).

The bundled `vs2ray-tiny` sees 32 px images and has never seen text; a class name such as "purple square"
does not fit there. The reader (vs2ray/assets/vs2ray-tiny-reader.json) takes 64 px images in 16 px
patches: 17 tokens, the bundled model's sequence and compute. Its pretraining images are the bundled
model's (`shapes/pretrain`, doubled to 64 px), and on `--stamped` of them a class name is written on a
white label in a corner (`shapes.write_word`), as text appears in web images: the true class's name on
half of those, another class's on the rest. The caption of an image that carries another class's name
names the written class with probability `--read` (web captions often say what an image's text says):
the model learns to read because reading predicts its captions. At the default 0.6 it reads about as
issue 28 asks (docs/companion.md: --read 1 reads and nothing else, 0.5 too little). Every other choice
(noisy captions, the image-only objective, the cone) is `train_tiny_clip.py`'s, except that a caption names
the other shape with probability 0.52, not 0.48: at 0.48 the reader missed the world card's probe gain
(+11.4 against +12; 0.52 gives +12.9, docs/companion.md).

CPU only and deterministic for a given seed and thread count (about 3 minutes on 2 cores). At the end
it prints zero-shot top-1 on `shapes/test` clean, with the true class written and with a wrong class
written, and the share of the last predicted as the written class: the typographic targets of issue 28
are a fall of at least 20 points from clean to attacked and at least 30% predicted as the written word.
"""

from __future__ import annotations

import argparse
import json
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import open_clip
import torch
from train_tiny_clip import (
    OPENAI_MEAN,
    OPENAI_STD,
    ContrastiveTraining,
    add_training_arguments,
    caption_table,
    named_classes,
    save_fp16,
)

from vs2ray.data.shapes import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    NO_WORD,
    OTHER_WORD,
    OWN_WORD,
    render_with_word,
    word_draws,
)
from vs2ray.models import ASSETS

READER = "vs2ray-tiny-reader"
READER_CONFIG = Path(str(ASSETS / f"{READER}.json"))


def render_for_training(seed: int, split: str, index: int, condition: int) -> tuple[np.ndarray, int, int, str, str]:
    """Image `index` of `split` at 64 px under `condition` (shapes.render_with_word, as shapes_typographic
    renders it): (pixels (64, 64, 3), label, the other class, size word, background)."""
    pixels, sample, _ = render_with_word(seed, split, index, condition)
    other = word_draws(seed, split, index)[1]
    return pixels, sample.label, other, "small" if sample.radius < 8.5 else "large", sample.background


def _render(args: tuple[int, str, int, int]) -> tuple[np.ndarray, int, int, str, str]:
    return render_for_training(*args)


def render_pool(seed: int, split: str, written: list[int]) -> tuple[torch.Tensor, list[tuple[int, int, str, str]]]:
    """Images 0 … len(written) − 1 of `split`, image i with `written[i]` on it: normalised pixels
    (n, 3, 64, 64) and each image's (label, other class, size word, background)."""
    with Pool(2) as pool:
        rendered = pool.map(_render, [(seed, split, i, w) for i, w in enumerate(written)], chunksize=256)
    pixels = torch.from_numpy(np.stack([r[0] for r in rendered])).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - OPENAI_MEAN) / OPENAI_STD, [r[1:] for r in rendered]


def train(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if READER not in open_clip.list_models():
        open_clip.add_model_config(READER_CONFIG)
    model = open_clip.create_model(READER, pretrained=None)
    tokenizer = open_clip.get_tokenizer(READER)

    draws = np.random.default_rng([args.data_seed, 28]).random(args.pool_size)
    written = np.where(draws < args.stamped / 2, OWN_WORD, np.where(draws < args.stamped, OTHER_WORD, NO_WORD))
    started = time.perf_counter()
    pixels, attributes = render_pool(args.data_seed, "pretrain", written.tolist())
    print(f"rendered {len(attributes)} pretrain images in {time.perf_counter() - started:.1f}s", flush=True)
    labels, others = (torch.tensor([a[i] for a in attributes]) for i in (0, 1))
    size_ids = torch.tensor([int(size == "large") for _, _, size, _ in attributes])
    background_ids = torch.tensor([BACKGROUNDS.index(bg) for _, _, _, bg in attributes])
    written_t = torch.from_numpy(written)

    caption_tokens, captions_of = caption_table(tokenizer)
    training = ContrastiveTraining(model, args, len(CLASS_NAMES))
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(len(attributes), (args.batch_size,), generator=generator)
        template = torch.randint(len(CAPTION_TEMPLATES), (args.batch_size,), generator=generator)
        named = named_classes(labels[batch], args.shape_swap, args.colour_swap, generator)
        # a caption names the class written on the image: always its own, another's with probability `read`
        reads = (written_t[batch] == OTHER_WORD) & (torch.rand(args.batch_size, generator=generator) < args.read)
        named = torch.where(written_t[batch] == OWN_WORD, labels[batch], torch.where(reads, others[batch], named))
        caption_ids = captions_of[named, size_ids[batch], background_ids[batch], template]
        clip_loss, _ = training.step(step, pixels[batch], caption_tokens[caption_ids], caption_ids, labels[batch])
        if step % 50 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch_size / (time.perf_counter() - started)
            print(f"step {step:5d}  contrastive {clip_loss.item():.4f}  ({rate:.0f} pairs/s)", flush=True)
    save_fp16(model, args, ("eval_limit",))
    return evaluate(model.eval(), tokenizer, args.data_seed, args.eval_limit)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, seed: int, images: int) -> dict[str, float]:
    """Zero-shot ("a photo of a {}.") top-1 on the first `images` of shapes/test clean, with the true class
    written and with another class written, and the share of the last predicted as the written class."""
    text = model.encode_text(tokenizer([f"a photo of a {name}." for name in CLASS_NAMES]), normalize=True)
    result = {}
    for written, name in ((NO_WORD, "clean"), (OWN_WORD, "true_word"), (OTHER_WORD, "wrong_word")):
        pixels, attributes = render_pool(seed, "test", [written] * images)
        predicted = torch.cat([(model.encode_image(x, normalize=True) @ text.T).argmax(1) for x in pixels.split(512)])
        labels, others = (torch.tensor([a[i] for a in attributes]) for i in (0, 1))
        result[f"top1_{name}"] = (predicted == labels).float().mean().item()
        if written == OTHER_WORD:
            result["typographic"] = (predicted == others).float().mean().item()
    print(
        f"zero-shot on shapes/test ({images} images): clean {100 * result['top1_clean']:.1f}%, true class "
        f"written {100 * result['top1_true_word']:.1f}%, another class written {100 * result['top1_wrong_word']:.1f}% "
        f"(the written class predicted on {100 * result['typographic']:.1f}%)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, Path(str(ASSETS / f"{READER}.safetensors")), steps=700, lr=1e-3, decay=0.1)
    parser.add_argument("--stamped", type=float, default=0.4, help="share of pretraining images with a word on")
    parser.add_argument("--read", type=float, default=0.6, help="P(caption names a wrong written class)")
    parser.add_argument("--shape-swap", type=float, default=0.52, help="P(caption names the other shape)")
    parser.add_argument("--colour-swap", type=float, default=0.25, help="P(caption names the other colour)")
    parser.add_argument("--image-loss-weight", type=float, default=2.0, help="weight of the image-only objective")
    parser.add_argument("--cone", type=float, default=10.0, help="length of the shared image-embedding offset")
    parser.add_argument("--eval-limit", type=int, default=2000, help="test images per condition")
    args = parser.parse_args()
    print(json.dumps({k: round(v, 4) for k, v in train(args).items()}))


if __name__ == "__main__":
    main()
