"""Shared-prefix text encoding of unified-context prompts: same features, a fraction of the tokens.

With CoOp's unified context every class of prompt p reads ``[SOT] ctx_p,1 … ctx_p,n name . [EOT]``:
the first T = n_ctx + 1 positions are identical for all C classes, and CLIP's text transformer is
causal, so their hidden states are identical too.  This encoder runs those T positions once per
prompt (P×T tokens) and only the class-specific tail (P×C×S tokens, S = longest "name . EOT", about
3–5) through the layers, the tail attending to the cached prefix keys/values.  For the VOC seen
vocabulary (15 classes × 4 prompts, n_ctx 32) that is 4·33 + 60·4 ≈ 370 token positions instead of
60·37 = 2220 (truncated) or 60·77 (CoOp).  Mathematically identical to
``LearnedPrompts.encode`` (tests check it to float precision, features and gradients).

Works for open_clip's built-in text tower (``ResidualAttentionBlock`` with ``nn.MultiheadAttention``
and a causal mask); ``supports_shared_prefix`` says when, and callers fall back to the core encoder
otherwise.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mvpseg.clip_backbone import FrozenCLIP
from mvpseg.prompts import LearnedPrompts, TextViews


def supports_shared_prefix(clip: FrozenCLIP) -> bool:
    m = clip.model
    blocks = getattr(getattr(m, "transformer", None), "resblocks", None)
    if blocks is None or getattr(m, "attn_mask", None) is None:
        return False
    if not getattr(m.transformer, "batch_first", True):
        return False
    return all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) and not hasattr(b, "ln_1_kv")
               and b.attn.batch_first and b.attn.in_proj_weight is not None for b in blocks)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, W) → (..., H, N, W/H)."""
    *lead, n, w = x.shape
    return x.reshape(*lead, n, heads, w // heads).transpose(-2, -3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., H, N, d) → (..., N, H·d)."""
    *lead, h, n, d = x.shape
    return x.transpose(-2, -3).reshape(*lead, n, h * d)


def _layer(blk: nn.Module, xp: torch.Tensor, xs: torch.Tensor, last: bool):
    """One residual block. xp: P×T×W prefix states; xs: P×C×S×W tail states."""
    attn: nn.MultiheadAttention = blk.attn
    heads = attn.num_heads
    qp, kp, vp = F.linear(blk.ln_1(xp), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qs, ks, vs = F.linear(blk.ln_1(xs), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    kp, vp = _split_heads(kp, heads), _split_heads(vp, heads)  # P×H×T×d
    qs, ks, vs = (_split_heads(t, heads) for t in (qs, ks, vs))  # P×C×H×S×d
    scale = qs.shape[-1] ** -0.5
    t, s = kp.shape[-2], qs.shape[-2]
    s_pre = torch.einsum("pchsd,phtd->pchst", qs, kp) * scale
    s_own = torch.einsum("pchsd,pchud->pchsu", qs, ks) * scale
    causal = torch.ones(s, s, dtype=torch.bool, device=xs.device).triu(1)
    s_own = s_own.masked_fill(causal, float("-inf"))
    w = torch.cat([s_pre, s_own], dim=-1).softmax(dim=-1)
    os_ = (torch.einsum("pchst,phtd->pchsd", w[..., :t], vp)
           + torch.einsum("pchsu,pchud->pchsd", w[..., t:], vs))
    xs = xs + blk.ls_1(attn.out_proj(_merge_heads(os_)))
    xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
    if not last:  # the prefix's own output of the last layer is never read
        op = F.scaled_dot_product_attention(_split_heads(qp, heads), kp, vp, is_causal=True)
        xp = xp + blk.ls_1(attn.out_proj(_merge_heads(op)))
        xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
    return xp, xs


class SharedPrefixEncoder:
    """``encode(prompts, class_names) -> TextViews`` like ``LearnedPrompts.encode``, faster."""

    def __init__(self, clip: FrozenCLIP, activation_checkpointing: bool = False) -> None:
        if not supports_shared_prefix(clip):
            raise ValueError("shared-prefix encoding needs open_clip's built-in causal text tower")
        self.clip = clip
        self.activation_checkpointing = activation_checkpointing
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tokens(self, n_ctx: int, names: tuple[str, ...]):
        """(SOT embedding 1×W, tails C×S×W, EOT index within the tail C), cached per vocabulary."""
        key = (names, n_ctx, str(self.clip.device))
        if key not in self._cache:
            placeholder = " ".join(["X"] * n_ctx)
            tokens = self.clip.tokenize([f"{placeholder} {n}." for n in names])
            eot = tokens.argmax(-1)
            if int(eot.min()) <= n_ctx or int(tokens[:, -1].max()) != 0:
                raise ValueError(f"a class name does not fit CLIP's {self.clip.context_length}-token "
                                 f"context after {n_ctx} context tokens")
            with torch.no_grad():
                emb = self.clip.token_embeddings(tokens)
            t = n_ctx + 1
            s = int(eot.max()) + 1 - t
            self._cache = {key: (emb[0, :1], emb[:, t:t + s], eot - t)}
        return self._cache[key]

    def encode(self, prompts: LearnedPrompts, class_names: Sequence[str]) -> TextViews:
        names = tuple(class_names)
        return prompts.compose(self.clip, names, self.encode_plain(prompts, names))  # residual form, if any

    def encode_plain(self, prompts: LearnedPrompts, class_names: Sequence[str], rows: slice = slice(None)
                     ) -> torch.Tensor:
        """The plain embeddings of the prompts' current context, P×C×D unit norm (``encode_context``); ``rows``:
        of those prompts only (slice(0, 1): the global prompt alone, 1×C×D)."""
        names = tuple(class_names)
        model = self.clip.model
        sot, tail, eot = self._tokens(prompts.n_ctx, names)
        ctx = prompts.ctx[rows].to(tail.dtype)
        p, c = ctx.shape[0], len(names)
        t, s = ctx.shape[1] + 1, tail.shape[1]
        pos = model.positional_embedding.to(tail.dtype)
        xp = torch.cat([sot.unsqueeze(0).expand(p, -1, -1), ctx], dim=1) + pos[:t]
        xs = tail.unsqueeze(0).expand(p, -1, -1, -1) + pos[t:t + s]
        blocks = model.transformer.resblocks
        for i, blk in enumerate(blocks):
            last = i == len(blocks) - 1
            if self.activation_checkpointing and torch.is_grad_enabled():
                xp, xs = checkpoint(_layer, blk, xp, xs, last, use_reentrant=False)
            else:
                xp, xs = _layer(blk, xp, xs, last)
        x = model.ln_final(xs[:, torch.arange(c, device=xs.device), eot])  # P×C×W at each EOT
        proj = model.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)
