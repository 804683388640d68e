"""Exact truncated CLIP text encoding of (learned) token embeddings.

CLIP's text transformer uses a causal mask and reads its output at the EOT position, so positions after the
longest EOT of a batch can never influence any output. Running the transformer on only the first
``max(eot) + 1`` positions therefore gives the same features while skipping most of the 77-token padding.
With ``chunk_size`` the prompts are sorted by length and each chunk is cut to its own longest prompt, which
pays off for handcrafted template sets of very different lengths.

Without gradients (inference: the predictor, the demo) a leaner path runs instead, in inference mode and
exact up to float rounding: prompts sorted by length in chunks of about ``token_budget`` tokens (sized for
the cores, ``default_token_budget``); within a chunk every per-token operation runs on the real tokens
packed together (no padding at all), only attention sees the prompts padded to the chunk's longest one;
and the last block computes its attention output and MLP only at the EOT positions, the only ones read.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _encode_block(model: nn.Module, x: torch.Tensor, eot: torch.Tensor, truncate: bool) -> torch.Tensor:
    """N×L×W embeddings (positional embedding not yet added) → N×D features."""
    causal = model.attn_mask is not None
    length = int(eot.max().item()) + 1 if (truncate and causal) else x.shape[1]
    x = x[:, :length]
    x = x + model.positional_embedding[:length].to(x.dtype)
    mask = model.attn_mask[:length, :length] if causal else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def default_token_budget(device: torch.device) -> int:
    """Tokens per chunk of the inference path: 2048 per CPU thread, 64 k on a GPU. Measured on 2 busy threads
    (85 templates × 10 classes): 4096 tokens per chunk ran at 1.2 × the FLOP floor, 1024 at 1.3 ×, 256 at
    2.6 × (fixed costs per operation dominate small chunks, the more so when other jobs share the cores)."""
    if device.type == "cpu":
        return 2048 * max(1, min(8, torch.get_num_threads()))
    return 1 << 16


def _fast_path_ok(model: nn.Module) -> bool:
    """Whether the text tower is open_clip's default causal transformer that ``_encode_fast`` re-implements."""
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if model.attn_mask is None or blocks is None or len(blocks) == 0:
        return False
    for blk in blocks:
        a = getattr(blk, "attn", None)
        if (type(blk).__name__ != "ResidualAttentionBlock" or hasattr(blk, "ln_1_kv")
                or not isinstance(a, nn.MultiheadAttention) or a.in_proj_weight is None or a.bias_k is not None
                or a.add_zero_attn
                or not all(hasattr(getattr(blk, "mlp", None), m) for m in ("c_fc", "gelu", "c_proj"))):
            return False
    return True


def _residual_linear(h: torch.Tensor, x: torch.Tensor, linear: nn.Linear, scale: nn.Module) -> None:
    """h += scale(linear(x)), in place; without a layer scale the product accumulates straight into h (one
    pass fewer over the activations, which counts when other jobs share the cores)."""
    if isinstance(scale, nn.Identity) and h.dtype == x.dtype == linear.weight.dtype:
        h.addmm_(x, linear.weight.t())
        if linear.bias is not None:
            h += linear.bias
    else:
        h += scale(linear(x))


def _encode_fast(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """One chunk, inference only: N×L×W (L = max(eot) + 1) → N×D, with open_clip's block maths.

    Every per-token operation (layer norms, projections, MLP, residuals) runs on the T = Σ(eot + 1) real
    tokens packed into one T×W matrix, with no padding at all; only attention sees the N×L layout, where
    the causal mask keeps padding out of every real position."""
    n, length, width = x.shape
    rows = torch.arange(n, device=x.device)
    real = torch.arange(length, device=x.device)[None] <= eot[:, None]  # N×L
    h = (x + model.positional_embedding[:length].to(x.dtype))[real]  # T×W, sentence after sentence
    eot_rows = torch.cumsum(eot + 1, 0) - 1  # where each sentence's EOT token sits in the packed rows
    blocks = model.transformer.resblocks
    qkv = None  # N×L×3W, padding kept at zero: masked keys need finite values (0 × NaN would be NaN)
    for i, blk in enumerate(blocks):
        a = blk.attn
        heads = a.num_heads
        packed = F.linear(blk.ln_1(h), a.in_proj_weight, a.in_proj_bias)  # T×3W
        if qkv is None:
            qkv = packed.new_zeros((n, length, 3 * width))
        qkv[real] = packed
        q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each N×heads×L×dh
        if i < len(blocks) - 1:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)[real].reshape(-1, width)
        else:  # the last block: only the EOT rows are read, and EOT attends to positions ≤ EOT
            q = q[rows, :, eot].unsqueeze(2)  # N×heads×1×dh
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None]).reshape(n, width)
            h = h[eot_rows]
        _residual_linear(h, o, a.out_proj, blk.ls_1)
        mlp = blk.mlp
        _residual_linear(h, mlp.gelu(mlp.c_fc(blk.ln_2(h))), mlp.c_proj, blk.ls_2)
    h = model.ln_final(h)
    proj = model.text_projection
    if proj is None:
        return h
    return proj(h) if isinstance(proj, nn.Linear) else h @ proj


def _length_chunks(eot: torch.Tensor, token_budget: int) -> list[torch.Tensor]:
    """Indices sorted by length, in chunks of ≤ token_budget real tokens (≥ 1 prompt each)."""
    order = torch.argsort(eot.cpu(), stable=True)
    lengths = (eot.cpu()[order] + 1).tolist()
    chunks, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > token_budget:
            chunks.append(order[start:i])
            start, total = i, 0
        total += n
    chunks.append(order[start:])
    return chunks


def encode_token_embeddings(model: nn.Module, x: torch.Tensor, eot: torch.Tensor, chunk_size: int | None = None,
                            truncate: bool = True, token_budget: int | None = None) -> torch.Tensor:
    """Encodes prompt embeddings with an open_clip CLIP text tower.

    Args:
        model: an open_clip ``CLIP`` (built-in text tower with token_embedding / transformer / ln_final).
        x: N×L×W token embeddings of full context length L (SOT, context/words, EOT, padding).
        eot: N EOT positions (``tokens.argmax(-1)``).
        chunk_size: with gradients, encode at most this many prompts at a time, grouped by length (None: one
            block); the inference path chunks by ``token_budget`` instead.
        truncate: False runs the full L positions (for equivalence tests and the CoOp-style baseline).
        token_budget: inference path only (no gradients): padded tokens per chunk (default
            ``default_token_budget``).
    Returns:
        N×D text features (not normalised), in x's dtype.
    """
    if truncate and not torch.is_grad_enabled() and x.shape[0] > 0 and _fast_path_ok(model):
        chunks = _length_chunks(eot, token_budget or default_token_budget(x.device))
        with torch.inference_mode():
            out = None
            for idx in chunks:
                idx = idx.to(x.device)
                feats = _encode_fast(model, x[idx, :int(eot[idx].max()) + 1], eot[idx])
                if out is None:
                    out = feats.new_empty((x.shape[0], feats.shape[1]))
                out[idx] = feats
        return out.clone()  # a normal tensor: callers may use it outside inference mode
    if chunk_size is None or x.shape[0] <= chunk_size:
        return _encode_block(model, x, eot, truncate)
    order = torch.argsort(eot)
    pieces = []
    for start in range(0, x.shape[0], chunk_size):
        idx = order[start:start + chunk_size]
        pieces.append(_encode_block(model, x[idx], eot[idx], truncate))
    return torch.cat(pieces, 0)[torch.argsort(order)]  # back to the callers' order
