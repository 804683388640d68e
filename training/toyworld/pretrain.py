"""Contrastive pretraining of the tiny toy CLIP on toy-world image–caption pairs.

The result stands in for OpenAI's RN50 where no pretrained weights can be downloaded: an open_clip
``CLIP`` with a ModifiedResNet vision tower (so MaskCLIP's dense path applies unchanged) and a small
text transformer over open_clip's real BPE tokenizer (context 48: SOT + 32 learned context tokens +
a class name + EOT fit). Run once, not in CI::

    python -m training.pretrain_toyclip --device cpu      # ≈ 32 min on 2 idle CPU cores (docs/toyworld.md)
    python -m training.pretrain_toyclip --device cuda --workers 15   # ≈ 100 s on an H200

``--vision vit`` trains the ViT variant instead (``toyclip-vit``: an open_clip ``VisionTransformer``
tower, patch 8 at 64 px → an 8×8 token grid, for the ViT dense modes of ``mvpseg.dense``; same text
tower and tokenizer; output in ``assets/toyclip-vit``)::

    python -m training.pretrain_toyclip --vision vit --threads 1 --workers 0 --steps … --batch-size …

Outputs in ``--out`` (default ``assets/toyclip``, or ``assets/toyclip-vit`` for ``--vision vit``; the
file names use the model name ``toyclip`` / ``toyclip-vit``):

* ``toyclip.json`` – a plain open_clip model config (loadable by ``open_clip.add_model_config`` and
  ``open_clip.create_model("toyclip", pretrained="…/toyclip.safetensors")``);
* ``toyclip.safetensors`` – fp16 weights (BatchNorm counters stay int64), training facts in the header;
* ``training_record.json`` – arguments, wall time, device, loss curve, held-out zero-shot accuracy.

Images are normalised with ImageNet mean/std, the default of ``mvpseg.clip_backbone`` (MaskCLIP's).
Captions of images with the same set of visible classes are treated as mutual positives (soft
targets), because a small world repeats class sets inside a batch far more often than the web does.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mvpseg.clip_backbone import NORMALIZATIONS

from .captions import CAPTION_STYLES, CaptionedToyWorld
from .world import CLASS_NAMES, OBJECT_NAMES, PRETRAIN_CONFIG, UNSEEN

MODEL_NAME = "toyclip"
VIT_MODEL_NAME = "toyclip-vit"
# defaults that differ between the two vision towers (None on the command line → these)
VISION_DEFAULTS = {"resnet": {"out": "assets/toyclip", "vision_width": 24},
                   "vit": {"out": "assets/toyclip-vit", "vision_width": 96}}
VIT_ONLY_ARGS = ("patch_size", "vision_layers", "vision_head_width")


def model_name(args: argparse.Namespace) -> str:
    """open_clip registers a config under its file stem: each member of a family needs its own (--name)."""
    return getattr(args, "name", None) or (VIT_MODEL_NAME if args.vision == "vit" else MODEL_NAME)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The open_clip config dict (only keys open_clip's ``CLIP`` accepts)."""
    if args.vision == "vit":  # plain open_clip VisionTransformer (class token, nn.GELU, learnable pos. embedding)
        vision = {"image_size": args.image_size * args.zoom, "patch_size": args.patch_size,
                  "width": args.vision_width, "layers": args.vision_layers, "head_width": args.vision_head_width,
                  "mlp_ratio": 4.0}
    else:
        vision = {"image_size": args.image_size * args.zoom, "layers": [1, 1, 1, 1], "width": args.vision_width}
    return {
        "embed_dim": args.embed_dim,
        "vision_cfg": vision,
        "text_cfg": {"context_length": args.context_length, "vocab_size": 49408, "width": args.text_width,
                     "heads": args.text_width // 16, "layers": args.text_layers},
    }


def create_model(config_path: Path, pretrained: str | None = None, device: str = "cpu",
                 name: str = MODEL_NAME) -> torch.nn.Module:
    """Builds the model through open_clip's own registry, exactly as ``mvpseg.clip_backbone`` does."""
    open_clip.add_model_config(config_path)
    return open_clip.create_model(name, pretrained=pretrained, device=device)


def collate(batch: Sequence[tuple[np.ndarray, str, list[int]]]) -> tuple[torch.Tensor, list[str], list[tuple[int, ...]]]:
    """→ images B×H×W×3 uint8, captions, class sets (for positives)."""
    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    return images, [b[1] for b in batch], [tuple(b[2]) for b in batch]


class _Items(torch.utils.data.Dataset):
    def __init__(self, ds: CaptionedToyWorld) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, list[int]]:
        return self.ds.item(i)


def normalise(images: torch.Tensor, normalization: str = "imagenet") -> torch.Tensor:
    """B×H×W×3 uint8 → B×3×H×W float, normalised with ``mvpseg``'s ImageNet (default) or CLIP statistics."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean_, std_ = NORMALIZATIONS[normalization]
    mean = torch.tensor(mean_, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std_, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     sets: list[tuple[int, ...]]) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: pairs whose images show the same class set are positives.

    img, txt: B×D unit-norm features; scale: scalar logit scale.
    """
    logits = scale * img @ txt.t()
    ids = {s: k for k, s in enumerate(dict.fromkeys(sets))}
    key = torch.tensor([ids[s] for s in sets], device=img.device)
    target = (key[:, None] == key[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer: Any, device: str, n: int = 512,
                       seed: int = 12345, zoom: int = 1, normalization: str = "imagenet") -> dict[str, float]:
    """Top-1 accuracy of classifying held-out single-object crops among the 16 object classes with
    the prompt "a photo of a {}." (split "test", never used in training)."""
    # crops at the model's input size (its attention pool / ViT has a fixed positional embedding)
    size = getattr(model.visual, "image_size", PRETRAIN_CONFIG.image_size * zoom)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)  # the ViT keeps (H, W)
    cfg = replace(PRETRAIN_CONFIG, objects=(1, 1), stuff=(0, 1), image_size=size // zoom, zoom=zoom)
    ds = CaptionedToyWorld(n * 2, seed=seed, config=cfg, split="test")
    images, labels = [], []
    for i in range(len(ds)):
        img, _, classes = ds.item(i)
        objs = [c for c in classes if 1 <= c <= len(OBJECT_NAMES)]
        if len(objs) == 1:
            images.append(img)
            labels.append(objs[0])
        if len(images) == n:
            break
    model.eval()
    text = model.encode_text(tokenizer([f"a photo of a {c}." for c in OBJECT_NAMES]).to(device))
    feats = model.encode_image(normalise(torch.from_numpy(np.stack(images)).to(device), normalization))
    pred = (F.normalize(feats.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()).argmax(1) + 1
    y = torch.tensor(labels, device=device)
    unseen = torch.isin(y, torch.tensor(UNSEEN, device=device))
    return {"all": (pred == y).float().mean().item(), "seen": (pred == y)[~unseen].float().mean().item(),
            "unseen": (pred == y)[unseen].float().mean().item(), "n": len(labels), "chance": 1 / len(OBJECT_NAMES)}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """fp16 safetensors of the full state dict (floating tensors halved, integer buffers kept)."""
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata=metadata)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", choices=("resnet", "vit"), default="resnet",
                   help="vision tower: ModifiedResNet (toyclip) or ViT (toyclip-vit)")
    p.add_argument("--out", default=None, help="output folder (default assets/toyclip or assets/toyclip-vit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64, help="pretraining crop size in scene px (the model's "
                   "input is this × --zoom, a multiple of 32); objects keep their pixel scale, so larger crops "
                   "show more context")
    p.add_argument("--zoom", type=int, default=1, help="magnify every crop zoom× by pixel replication (the "
                   "model's input becomes image-size·zoom): objects span zoom× more feature cells")
    p.add_argument("--vision-width", type=int, default=None, help="default 24 (resnet) or 96 (vit)")
    p.add_argument("--patch-size", type=int, default=8, help="vit: patch size in model input px")
    p.add_argument("--vision-layers", type=int, default=4, help="vit: transformer blocks")
    p.add_argument("--vision-head-width", type=int, default=24, help="vit: channels per attention head "
                   "(heads = width / head width)")
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--context-length", type=int, default=48)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=1, help="data-generation worker processes")
    p.add_argument("--name", default=None, help="model (and config file) name; default toyclip / toyclip-vit")
    p.add_argument("--normalization", default="imagenet", choices=sorted(NORMALIZATIONS),
                   help="input statistics the model learns with (recorded in its weights for mvpseg)")
    p.add_argument("--captions", default="templates", choices=CAPTION_STYLES,
                   help="pretraining caption style (training/toyworld/captions.py)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--zero-shot-images", type=int, default=512, help="held-out crops for the final accuracy")
    args = p.parse_args(argv)
    for k, v in VISION_DEFAULTS[args.vision].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.vision == "vit":
        if args.zoom < 1 or args.patch_size < 1 or (args.image_size * args.zoom) % args.patch_size:
            p.error(f"--image-size × --zoom must be a multiple of --patch-size, "
                    f"got {args.image_size} × {args.zoom} and {args.patch_size}")
        if args.vision_head_width < 1 or args.vision_width % args.vision_head_width:
            p.error(f"--vision-width must be a multiple of --vision-head-width, "
                    f"got {args.vision_width} and {args.vision_head_width}")
    elif args.zoom < 1 or args.image_size < 32 or (args.image_size * args.zoom) % 32:
        p.error(f"--image-size × --zoom must be a positive multiple of 32 (the ResNet's stride), "
                f"got {args.image_size} × {args.zoom}")
    return args


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments for the training record; a resnet run records exactly what it did before --vision."""
    rec = vars(args).copy()
    for k, default in (("name", None), ("normalization", "imagenet"), ("captions", "templates")):
        if rec.get(k) == default:  # records of runs before these options stay as they were
            rec.pop(k)
    if args.vision == "resnet":
        for k in ("vision",) + VIT_ONLY_ARGS:
            rec.pop(k)
    return rec


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = model_name(args)
    cfg_path = out / f"{name}.json"
    cfg_path.write_text(json.dumps(model_config(args), indent=2) + "\n")
    model = create_model(cfg_path, device=args.device, name=name)
    tokenizer = open_clip.get_tokenizer(name)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    # --image-size sets the crop size with the model's (same objects, parts and pixel scale per crop);
    # --zoom magnifies those crops (the model's input is image_size·zoom)
    data = CaptionedToyWorld(args.steps * args.batch_size, seed=args.seed,
                             config=replace(PRETRAIN_CONFIG, image_size=args.image_size, zoom=args.zoom),
                             style=args.captions)
    loader = torch.utils.data.DataLoader(_Items(data), batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, collate_fn=collate, drop_last=True,
                                         persistent_workers=args.workers > 0)
    losses: list[float] = []
    t0 = time.time()
    model.train()
    for step, (images, captions, sets) in enumerate(loader):
        img = F.normalize(model.encode_image(normalise(images.to(args.device), args.normalization)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions).to(args.device)), dim=-1)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), sets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {np.mean(losses[-args.log_every:]):.4f} "
                  f"scale {model.logit_scale.exp().item():.1f} {time.time() - t0:7.1f}s", flush=True)
    train_s = time.time() - t0
    zs = zero_shot_accuracy(model, tokenizer, args.device, n=args.zero_shot_images, zoom=args.zoom,
                            normalization=args.normalization)
    record = {
        "model": name, "parameters": n_params, "args": recorded_args(args), "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "open_clip": open_clip.__version__,
        "final_loss": float(np.mean(losses[-50:])), "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4)
                                                                  for i in range(0, len(losses), 50)],
        "zero_shot_accuracy": zs, "normalization": args.normalization, "class_names": CLASS_NAMES, "unseen": UNSEEN,
    }
    save_weights(model, out / f"{name}.safetensors",
                 {"seed": str(args.seed), "steps": str(args.steps), "zoom": str(args.zoom), "normalization": args.normalization,
                  "format": "open_clip CLIP state dict, fp16", "config": json.dumps(model_config(args))})
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("loss_curve", "class_names")}, indent=2))
    return record


if __name__ == "__main__":
    main()
