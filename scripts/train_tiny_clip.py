"""Train `vs2ray-tiny`, the bundled open_clip model, on `shapes` image–caption pairs.

    python scripts/train_tiny_clip.py                 # re-creates vs2ray/assets/vs2ray-tiny.safetensors
    python scripts/train_tiny_clip.py --out /tmp/tiny.safetensors --steps 200

CPU only and deterministic for a given seed and thread count (a few minutes on 2 cores).
The model trains on the `pretrain` split, which the experiments never use, so the
`train` split stays in-domain unlabelled data the encoder has not seen, as CIFAR-100
is for OpenAI's CLIP. At the end the saved fp16 weights are loaded back through
`vs2ray.models.load_clip` and their zero-shot top-1 on the `test` split is printed.

The world is built to have the structure of CLIP on CIFAR-100 (docs/world.md: the world card):
- **Noisy captions.** A caption names the block's other shape with probability
  `--shape-swap` and the other colour with `--colour-swap`, as web captions name fine
  distinctions unreliably: the text supervision knows less than the pixels show.
- **An image-only objective.** A linear classifier on the final-block [CLS] token, trained
  with the true pretrain labels (`--image-loss-weight`) and thrown away afterwards, makes the
  image tower learn more than the text head uses (a linear probe beats zero-shot).
- **The cone.** Every image embedding carries a fixed offset of length `--cone` along a seeded
  random direction before normalisation (see `hold_cone`: one ln_post feature held constant,
  its proj row the offset), so image embeddings share a common component as CLIP's do
  (Liang et al. 2022, "Mind the gap": CLIP's embeddings occupy a narrow cone).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vs2ray.config import load_config
from vs2ray.data.shapes import BACKGROUNDS, CAPTION_TEMPLATES, CLASS_NAMES, DEFAULT_SPLIT_SIZES, render_shape
from vs2ray.models import BUNDLED_WEIGHTS, register_bundled_model
from vs2ray.stages import zero_shot_evaluate

OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def _render(args: tuple[int, int]) -> tuple[np.ndarray, int, str, str]:
    seed, index = args
    sample = render_shape(seed, "pretrain", index)
    size_word = "small" if sample.radius < 8.5 else "large"
    return sample.pixels, sample.label, size_word, sample.background


def render_pretrain_pool(
    seed: int, count: int, mean: torch.Tensor = OPENAI_MEAN, std: torch.Tensor = OPENAI_STD
) -> tuple[torch.Tensor, list[tuple[int, str, str]]]:
    """Render `count` pretrain images: pixels (count, 3, 32, 32) normalised by mean/std (1, 3, 1, 1),
    and each image's (label, size word, background)."""
    with Pool(2) as pool:
        rendered = pool.map(_render, [(seed, i) for i in range(count)], chunksize=512)
    pixels = torch.from_numpy(np.stack([r[0] for r in rendered])).permute(0, 3, 1, 2).float() / 255.0
    # same normalisation as the model's eval transform (resize/crop are no-ops at 32×32)
    pixels = (pixels - mean) / std
    return pixels, [(r[1], r[2], r[3]) for r in rendered]


def add_training_arguments(parser: argparse.ArgumentParser, out: Path, steps: int, lr: float, decay: float) -> None:
    """The arguments both bundled-world trainers take (this script and train_retrieval_encoder.py)."""
    parser.add_argument("--out", default=str(out), help="where to write the fp16 safetensors")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=decay)
    parser.add_argument("--pool-size", type=int, default=DEFAULT_SPLIT_SIZES["pretrain"])
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    parser.add_argument("--data-seed", type=int, default=0, help="shapes generation seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evaluate-only", action="store_true", help="only evaluate --out")


def save_fp16(model: torch.nn.Module, args: argparse.Namespace, not_recorded: tuple[str, ...]) -> Path:
    """Write the model's state as fp16 safetensors at args.out, with the training arguments as metadata."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped = ("out", "evaluate_only", *not_recorded)
    save_file(state, str(out), metadata={k: str(v) for k, v in vars(args).items() if k not in skipped})
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)
    return out


def lr_at(step: int, steps: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def caption_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption a (class, size, background, template) can produce, tokenised once.

    Returns tokens (n_captions, context) and an index (classes, 2 sizes, backgrounds, templates)
    of caption rows.
    """
    sizes = ("small", "large")
    keys = list(itertools.product(range(len(CLASS_NAMES)), sizes, BACKGROUNDS, CAPTION_TEMPLATES))
    texts = [t.format(name=CLASS_NAMES[c], size=s, background=b) for c, s, b, t in keys]
    unique = sorted(set(texts))
    row = {text: i for i, text in enumerate(unique)}
    table = torch.tensor([row[text] for text in texts]).reshape(
        len(CLASS_NAMES), len(sizes), len(BACKGROUNDS), len(CAPTION_TEMPLATES)
    )
    return tokenizer(unique), table


def named_classes(labels: torch.Tensor, shape_swap: float, colour_swap: float, generator) -> torch.Tensor:
    """The class a noisy caption names: the block's other shape (label ^ 1) with probability
    `shape_swap`, the other colour (label ^ 2) with probability `colour_swap`, independently.

    Relies on shapes' class order: block b, colour i, shape j -> 4b + 2i + j.
    """
    flip_shape = (torch.rand(labels.shape, generator=generator) < shape_swap).long()
    flip_colour = (torch.rand(labels.shape, generator=generator) < colour_swap).long()
    return labels ^ flip_shape ^ (2 * flip_colour)


CONE_DIM = 0  # the residual feature whose ln_post output is held constant to carry the cone's offset


def cone_offset(seed: int, dim: int, length: float) -> torch.Tensor:
    """A fixed (dim,) vector of norm `length` along a seeded random direction."""
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 7919))
    return length * direction / direction.norm()


@torch.no_grad()
def hold_cone(model, offset: torch.Tensor) -> None:
    """Make every image embedding carry `offset` (embed_dim,) before normalisation, in open_clip's own weights.

    ln_post's output at CONE_DIM is the constant 1 (weight 0, bias 1) and proj's row there is
    the offset, so ln_post(x) @ proj = offset + (the rest); the rest of proj is kept orthogonal
    to the offset, so training cannot cancel it. Called after every optimiser step.
    """
    visual = model.visual
    direction = offset / offset.norm()
    visual.ln_post.weight[CONE_DIM] = 0.0
    visual.ln_post.bias[CONE_DIM] = 1.0
    rest = torch.arange(visual.proj.shape[0]) != CONE_DIM
    visual.proj[rest] -= (visual.proj[rest] @ direction)[:, None] * direction
    visual.proj[CONE_DIM] = offset


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_ids: torch.Tensor, scale: torch.Tensor):
    """Symmetric CLIP loss where every pair with an identical caption counts as a positive."""
    logits = scale * image_emb @ text_emb.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class ContrastiveTraining:
    """What both tiny CLIP trainers (this script and train_tiny_reader.py) optimise: the contrastive loss
    plus `--image-loss-weight` × the image-only objective (a linear probe on the final block's [CLS],
    thrown away), AdamW with weight decay on the weight matrices only, the cone held and the logit scale
    clamped after every step."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, num_classes: int) -> None:
        self.model, self.args = model, args
        self.offset = cone_offset(args.seed, model.visual.proj.shape[1], args.cone)
        self.width = model.visual.proj.shape[0]
        hold_cone(model, self.offset)
        self.probe = torch.nn.Linear(self.width, num_classes)  # the image-only objective's head, not shipped
        self.final_cls: dict[str, torch.Tensor] = {}
        visual = model.visual
        visual.transformer.resblocks[-1].register_forward_hook(
            lambda _m, _i, out: self.final_cls.__setitem__("x", out[:, 0] if visual.transformer.batch_first else out[0])
        )
        named = list(model.named_parameters()) + [(f"probe.{n}", p) for n, p in self.probe.named_parameters()]
        decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        model.train()

    def step(
        self, step: int, images: torch.Tensor, captions: torch.Tensor, caption_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on images (batch, 3, H, W) with their captions' tokens (batch, context), caption
        ids (batch,) and true labels (batch,): (contrastive loss, image-only loss)."""
        args, model = self.args, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        image_emb = model.encode_image(images, normalize=True)
        text_emb = model.encode_text(captions, normalize=True)
        clip_loss = contrastive_loss(image_emb, text_emb, caption_ids, model.logit_scale.exp())
        image_loss = F.cross_entropy(self.probe(F.layer_norm(self.final_cls["x"], (self.width,))), labels)
        loss = clip_loss + args.image_loss_weight * image_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        hold_cone(model, self.offset)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return clip_loss, image_loss


def train(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    register_bundled_model()
    model = open_clip.create_model("vs2ray-tiny", pretrained=None)
    tokenizer = open_clip.get_tokenizer("vs2ray-tiny")

    started = time.perf_counter()
    pixels, attributes = render_pretrain_pool(args.data_seed, args.pool_size)
    print(f"rendered {len(attributes)} pretrain images in {time.perf_counter() - started:.1f}s", flush=True)

    caption_tokens, captions_of = caption_table(tokenizer)
    labels = torch.tensor([label for label, _, _ in attributes])
    size_ids = torch.tensor([int(size == "large") for _, size, _ in attributes])
    background_ids = torch.tensor([BACKGROUNDS.index(bg) for _, _, bg in attributes])
    training = ContrastiveTraining(model, args, len(CLASS_NAMES))
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(len(attributes), (args.batch_size,), generator=generator)
        template = torch.randint(len(CAPTION_TEMPLATES), (args.batch_size,), generator=generator)
        named = named_classes(labels[batch], args.shape_swap, args.colour_swap, generator)
        caption_ids = captions_of[named, size_ids[batch], background_ids[batch], template]
        images = pixels[batch]
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        clip_loss, image_loss = training.step(step, images, caption_tokens[caption_ids], caption_ids, labels[batch])
        if step % 50 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch_size / (time.perf_counter() - started)
            print(
                f"step {step:5d}  contrastive {clip_loss.item():.4f}  image {image_loss.item():.4f}  "
                f"({rate:.0f} pairs/s)",
                flush=True,
            )

    print(f"trained in {time.perf_counter() - started:.0f}s")
    out = save_fp16(model, args, ("eval_limit",))
    return evaluate(out, args.eval_limit)


def evaluate(weights: Path, limit: int | None = None) -> dict[str, float]:
    """Zero-shot accuracy of `weights` on shapes/test (the first `limit` images) through the library's own path."""
    config = load_config(None, [f"model.pretrained={weights}"])
    result = zero_shot_evaluate(config, "test", limit)
    print(
        f"zero-shot on shapes/test ({result['images']} images): top-1 {100 * result['top1']:.2f}%  "
        f"top-5 {100 * result['top5']:.2f}%"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, BUNDLED_WEIGHTS, steps=700, lr=1e-3, decay=0.1)
    parser.add_argument("--shape-swap", type=float, default=0.48, help="P(caption names the other shape)")
    parser.add_argument("--colour-swap", type=float, default=0.25, help="P(caption names the other colour)")
    parser.add_argument("--image-loss-weight", type=float, default=2.0, help="weight of the image-only objective")
    parser.add_argument("--cone", type=float, default=10.0, help="length of the shared image-embedding offset")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    args = parser.parse_args()
    result = evaluate(Path(args.out), args.eval_limit) if args.evaluate_only else train(args)
    print(json.dumps({"top1": round(result["top1"], 4), "top5": round(result["top5"], 4)}))


if __name__ == "__main__":
    main()
