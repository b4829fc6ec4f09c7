"""Lower precision against fp32 on this machine: what bf16 (and fp16) autocast changes in extraction,
zero-shot accuracy and SAE training.

    python benchmarks/precision.py [--config sweeps/quickstart.yaml] [--images 2000] [--steps 1000] [--set K=V ...]

On the config's test images (the bundled world by default), the encoder runs at each precision
(`model.precision`, autocast over fp32 weights): the cosine of each image's last-block [CLS] token
and of its CLIP embedding against fp32 (mean and minimum), and zero-shot top-1 with the fp32 text
classifier. Then an SAE (the config's k and expansion) trains on the train store's [CLS] rows at
each `sae.precision` for the same steps and seed (searched SAE values are fixed by --set, by default
sae.k=32, sae.expansion=4, pass.w_aux=0): held-out FVU on the validation rows, and
samples/s. Everything here is on the CPU unless a GPU is visible; docs/gpus.md quotes the CPU run.
"""

from __future__ import annotations

import argparse
import time

import torch

from vs2ray.config import ModelConfig, load_config
from vs2ray.data import get_dataset, prompt_templates_for
from vs2ray.evaluate import accuracy
from vs2ray.models import build_text_classifier, capture_blocks, encode_images, load_clip
from vs2ray.sae import evaluate_sae, train_sae
from vs2ray.stages import load_train_split, sae_params
from vs2ray.steering import logits_from_embeddings

PRECISIONS = ("fp32", "bf16", "fp16")


def encode_at(model: ModelConfig, pixels: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-block [CLS] (n, width), embeddings (n, embed)) of preprocessed images at `model.precision`."""
    bundle = load_clip(model, device=device)
    last = len(bundle.model.visual.transformer.resblocks) - 1
    cls, embeddings = [], []
    with torch.inference_mode(), capture_blocks(bundle, [last]) as captured:
        for batch in pixels.split(256):
            embeddings.append(encode_images(bundle, batch).cpu())
            cls.append(captured[last].float().cpu())
    return torch.cat(cls), torch.cat(embeddings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sweeps/quickstart.yaml")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides or ["sae.k=32", "sae.expansion=4", "pass.w_aux=0"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = get_dataset(config.dataset)
    records = dataset.records(config.dataset.test_split)[: args.images]
    reference = load_clip(config.model, device=device)
    pixels = torch.stack([reference.preprocess(dataset.load_image(config.dataset.test_split, r.ref)) for r in records])
    labels = torch.tensor([r.label for r in records])
    classifier = build_text_classifier(reference, dataset.classes, prompt_templates_for(config.dataset, dataset)).cpu()
    print(f"device: {device}; {len(records)} test images of {config.dataset.name}, {config.model.arch}")
    print(
        f"{'precision':>9} {'[CLS] cos mean':>14} {'[CLS] cos min':>13} {'emb cos min':>11} {'zero-shot':>9} {'s':>6}"
    )
    base_cls = base_emb = None
    for precision in PRECISIONS:
        started = time.perf_counter()
        cls, emb = encode_at(config.model.model_copy(update={"precision": precision}), pixels, device)
        seconds = time.perf_counter() - started
        if base_cls is None:
            base_cls, base_emb = cls, emb
        cls_cos = torch.nn.functional.cosine_similarity(cls, base_cls, dim=1)
        emb_cos = torch.nn.functional.cosine_similarity(emb, base_emb, dim=1)
        top1 = accuracy(logits_from_embeddings(emb, classifier), labels, len(dataset.classes))[0]
        print(
            f"{precision:>9} {cls_cos.mean():>14.6f} {cls_cos.min():>13.6f} {emb_cos.min():>11.6f} "
            f"{100 * top1:>9.2f} {seconds:>6.1f}"
        )

    split = load_train_split(config, lambda _: None)
    column = torch.from_numpy(split.acts[split.column(config.sae.layer, "cls")]).float()
    train, held_out = column[torch.from_numpy(split.train_mask)], column[torch.from_numpy(split.val_mask)]
    params = sae_params(config.model_copy(update={"sae": config.sae.model_copy(update={"steps": args.steps})}))
    print(f"\nSAE k={params.k} expansion={params.expansion}, {args.steps} steps,", end=" ")
    print(f"{len(train)} train / {len(held_out)} held-out rows")
    print(f"{'precision':>9} {'held-out FVU':>12} {'samples/s':>10}")
    for precision in PRECISIONS:
        run = type(params)(**{**params.as_dict(), "steps": args.steps, "epochs": None, "precision": precision})
        result = train_sae(train, run, device=device)
        fvu, rate = evaluate_sae(result.sae, held_out)["fvu"], result.metrics["samples_per_second"]
        print(f"{precision:>9} {fvu:>12.5f} {rate:>10,.0f}")


if __name__ == "__main__":
    main()
