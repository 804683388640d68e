"""Training-free dense features from an open_clip VisionTransformer: four ways to run its last block.

All four modes run the tower unchanged up to the last residual block, replace that block by a variant, then
apply ``ln_post`` and ``proj`` to every patch token (the class token is dropped), giving B×D×(H/p)×(W/p)
features that are *not* normalised (``mvpseg.dense.dense_features`` normalises). Each variant is a port of
the official code, which is written for OpenAI-CLIP modules (sequence-first tensors, ``attn.in_proj_weight``);
here tensors are batch-first (open_clip builds its ViTs with ``batch_first=True``; a ``batch_first=False``
transformer is handled too). ``tests/test_dense_modes.py`` runs line-by-line ports of the official forwards on
the same random-weight ViT and compares.

Notation for the last block, x = its input tokens (B×(1+N)×W), y = ln_1(x), q/k/v = the heads of
in_proj(y), s = head_dim^-½, A·v = out_proj(attention-weighted values):

=============  ==========================================================  ===========================
mode           last block                                                  official code
=============  ==========================================================  ===========================
maskclip-vit   z = x + out_proj(v);  z = z + mlp(ln_2(z))                  chongzhou96/MaskCLIP
               (identity attention: residual *and* FFN kept)               mmseg/models/backbones/vit.py
sclip          A = softmax(s·q qᵀ) + softmax(s·k kᵀ);                      wangf3014/SCLIP
               z = x + A·v;  z = z + mlp(ln_2(z))                          clip/model.py
clearclip      z = softmax(s·q qᵀ)·v       (no residual, no FFN)           mc-lan/ClearCLIP
                                                                           open_clip/transformer.py
naclip         z = softmax(s·k kᵀ + Ω)·v   (no residual, no FFN),          sinahmr/NACLIP
               Ω = Gaussian of the patch-grid distance, σ = 5 patches,     clip/model.py
               zero for every pair involving the class token
=============  ==========================================================  ===========================

MaskCLIP keeps the residual and the FFN: its ``TransformerEncoderLayer.forward(return_qkv=True)`` computes
``v = out_proj(v_proj(norm1(x))); v += x; v = ffn(norm2(v), identity=v)`` and the head projects
``norm1(v)`` (the final norm). (mvpseg's first ViT path dropped both; that variant is ClearCLIP's "MaskCLIP"
baseline with ``ignore_residual=True``, not MaskCLIP's code.) MaskCLIP's mmseg port of OpenAI's ViT-B/16 uses
exact GELU and LayerNorm eps 1e-6 where CLIP has QuickGELU and 1e-5; here the tower's own modules are used.

Positional embedding at other grid sizes: MaskCLIP resizes it to the target grid (mmseg ``resize``, bicubic,
``align_corners=False``); SCLIP, ClearCLIP and NACLIP use DINO's ``interpolate_pos_encoding`` (bicubic with
``scale_factor = (g + 0.1) / n``, which samples slightly different source positions). Each mode follows its own
paper's code, so whole-image features match the official ones at any size; at the native grid (224 px windows
for ViT-B/16) neither interpolates. Deliberate differences, none of which changes the CLIP ViTs of
open_clip's configs: (1) a block's LayerScale (``ls_1``/``ls_2``, only ViT-M-16-alt has one) is applied to the
branch it belongs to, also where the official code (written for models without it) would not see it;
(2) where a grid has as many patches as the pretraining grid but another shape (e.g. 7×28 vs 14×14) the
embedding is interpolated; the official ``forward`` adds it un-resized in that case.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

#: NACLIP's default Gaussian standard deviation, in patches (naclip.py ``gaussian_std=5.``).
NACLIP_GAUSSIAN_STD = 5.0


def is_vision_transformer(visual: nn.Module) -> bool:
    return hasattr(visual, "transformer") and hasattr(visual, "conv1")


def vit_patch_size(visual: nn.Module) -> int:
    """The patch size p (the stride of the patch-embedding convolution)."""
    sh, sw = visual.conv1.stride
    if sh != sw:
        raise NotImplementedError(f"Non-square patches {sh}×{sw} are not supported.")
    return int(sh)


def _vit_pos_embed(visual: nn.Module, gh: int, gw: int, dino: bool = False) -> torch.Tensor:
    """Positional embedding (1+gh·gw)×W resized (bicubic) from the pretraining grid to gh×gw, class token kept.

    ``dino=False``: resize to exactly gh×gw (MaskCLIP / mmseg). ``dino=True``: SCLIP's, ClearCLIP's and
    NACLIP's ``interpolate_pos_encoding`` — the scale factor (g + 0.1)/n is used as given for the sampling grid.
    """
    pos = visual.positional_embedding
    cls_pos, grid_pos = pos[:1], pos[1:]
    n = int(math.isqrt(grid_pos.shape[0]))
    if (n, n) == (gh, gw):
        return pos
    grid = grid_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    if dino:
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                             align_corners=False, recompute_scale_factor=False)
        assert grid.shape[-2:] == (gh, gw), (grid.shape, gh, gw)
    else:
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)], 0)


def _tokens_before_last_block(visual: nn.Module, images: torch.Tensor,
                              dino_pos: bool) -> tuple[torch.Tensor, int, int]:
    """B×3×H×W → (tokens entering the last block B×(1+gh·gw)×W, gh, gw)."""
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("Dense features are not implemented for ViTs with an attentional pooler (CoCa).")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
    x = torch.cat([cls, x], 1) + _vit_pos_embed(visual, gh, gw, dino_pos).to(x.dtype)
    x = visual.ln_pre(x)  # patch dropout is a training-time op (identity in eval), skipped like the papers do
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    return x, gh, gw


def _last_block(visual: nn.Module) -> nn.Module:
    blk = visual.transformer.resblocks[-1]
    if not isinstance(blk.attn, nn.MultiheadAttention):
        raise NotImplementedError(f"Dense ViT modes need nn.MultiheadAttention in the last block, "
                                  f"not {type(blk.attn).__name__}.")
    return blk


def _ls(blk: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The block's LayerScale (open_clip ``ls_1``/``ls_2``; Identity unless ``ls_init_value`` was set)."""
    layer = getattr(blk, name, None)
    return x if layer is None else layer(x)


def _heads(attn: nn.MultiheadAttention, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y B×L×W → q, k, v, each (B·heads)×L×head_dim (same head order as the official ``view(-1, B·h, hd)``)."""
    b, length, width = y.shape
    h = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, length, h, width // h).transpose(1, 2).reshape(b * h, length, width // h)

    return split(q), split(k), split(v)


def _attend(attn: nn.MultiheadAttention, weights: torch.Tensor, v: torch.Tensor, b: int) -> torch.Tensor:
    """(B·h)×L×L weights, (B·h)×L×hd values → out_proj(weights·v) B×L×W."""
    out = torch.bmm(weights, v)
    bh, length, hd = out.shape
    out = out.reshape(b, bh // b, length, hd).transpose(1, 2).reshape(b, length, hd * (bh // b))
    return attn.out_proj(out)


def _head(visual: nn.Module, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Last-block output B×(1+N)×W → ln_post + proj on the patch tokens → B×D×gh×gw."""
    x = visual.ln_post(x[:, 1:])
    if visual.proj is not None:
        x = x @ visual.proj
    return x.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)


def _ffn(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + _ls(blk, "ls_2", blk.mlp(blk.ln_2(x)))


def maskclip_vit_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP (ViT): the last block with identity attention — value path + residual + FFN. B×D×h×w.

    Official: chongzhou96/MaskCLIP ``mmseg/models/backbones/vit.py`` (TransformerEncoderLayer.forward with
    return_qkv, then ``v = self.norm1(v)``) and ``decode_heads/maskclip_head.py`` (``feat = self.proj(v)``).
    """
    x, gh, gw = _tokens_before_last_block(visual, images, dino_pos=False)
    blk = _last_block(visual)
    attn = blk.attn
    width = x.shape[-1]
    w_v = attn.in_proj_weight[2 * width:]
    b_v = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
    v = attn.out_proj(F.linear(blk.ln_1(x), w_v, b_v))
    return _head(visual, _ffn(blk, x + _ls(blk, "ls_1", v)), gh, gw)


def sclip_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """SCLIP: correlative self-attention softmax(s·qqᵀ) + softmax(s·kkᵀ) in the last block, whose residual and
    FFN are kept. B×D×h×w. Official: wangf3014/SCLIP ``clip/model.py`` (VisionTransformer.forward, custom_attn
    with csa=True)."""
    x, gh, gw = _tokens_before_last_block(visual, images, dino_pos=True)
    blk = _last_block(visual)
    q, k, v = _heads(blk.attn, blk.ln_1(x))
    scale = q.shape[-1] ** -0.5
    weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) \
        + F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
    x = x + _ls(blk, "ls_1", _attend(blk.attn, weights, v, x.shape[0]))
    return _head(visual, _ffn(blk, x), gh, gw)


def clearclip_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """ClearCLIP: query-query attention softmax(s·qqᵀ) in the last block, no residual, no FFN. B×D×h×w.
    Official: mc-lan/ClearCLIP ``open_clip/transformer.py`` (VisionTransformer.forward with
    ``ignore_residual=True``, ``last_n_layers=1``; custom_attn ``model_type='ClearCLIP'``)."""
    x, gh, gw = _tokens_before_last_block(visual, images, dino_pos=True)
    blk = _last_block(visual)
    q, _, v = _heads(blk.attn, blk.ln_1(x))
    weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * q.shape[-1] ** -0.5, dim=-1)
    return _head(visual, _ls(blk, "ls_1", _attend(blk.attn, weights, v, x.shape[0])), gh, gw)


@functools.lru_cache(maxsize=4)
def _neighbourhood_bias(gh: int, gw: int, std: float) -> torch.Tensor:
    """NACLIP's Ω, (1+gh·gw)×(1+gh·gw): exp(-‖Δ‖²/(2σ²)) between patches at grid offset Δ, 0 for the class token.

    The official ``get_attention_addition`` convolves one-hot maps with a (2gh-1)×(2gw-1) Gaussian window,
    which yields exactly these values for every pair of the grid; here they are computed directly.
    """
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten().float(), xs.flatten().float()
    dist2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
    out = torch.zeros(gh * gw + 1, gh * gw + 1)
    out[1:, 1:] = torch.exp(-dist2 / (2 * std ** 2))
    return out


def naclip_features(visual: nn.Module, images: torch.Tensor,
                    gaussian_std: float = NACLIP_GAUSSIAN_STD) -> torch.Tensor:
    """NACLIP: key-key attention with a Gaussian neighbourhood bias, softmax(s·kkᵀ + Ω), in the "reduced" last
    block (no residual, no FFN). B×D×h×w. Official: sinahmr/NACLIP ``clip/model.py`` (``arch='reduced'``,
    ``attn_strategy='naclip'``, ``gaussian_std=5``); nothing else in the tower is changed there."""
    x, gh, gw = _tokens_before_last_block(visual, images, dino_pos=True)
    blk = _last_block(visual)
    _, k, v = _heads(blk.attn, blk.ln_1(x))
    omega = _neighbourhood_bias(gh, gw, float(gaussian_std)).to(device=k.device, dtype=k.dtype)
    weights = F.softmax(torch.bmm(k, k.transpose(1, 2)) * k.shape[-1] ** -0.5 + omega, dim=-1)
    return _head(visual, _ls(blk, "ls_1", _attend(blk.attn, weights, v, x.shape[0])), gh, gw)
