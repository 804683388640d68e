"""Exact truncated CLIP text encoding of (learned) token embeddings.

CLIP's text transformer uses a causal mask and reads its output at the EOT position, so positions after the
longest EOT of a batch can never influence any output. Running the transformer on only the first
``max(eot) + 1`` positions therefore gives the same features while skipping most of the 77-token padding.
With ``chunk_size`` the prompts are sorted by length and each chunk is cut to its own longest prompt, which
pays off for handcrafted template sets of very different lengths.
"""
from __future__ import annotations

import torch
import torch.nn as nn


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


def encode_token_embeddings(model: nn.Module, x: torch.Tensor, eot: torch.Tensor, chunk_size: int | None = None,
                            truncate: bool = True) -> torch.Tensor:
    """Encodes prompt embeddings with an open_clip CLIP text tower.

    Args:
        model: an open_clip ``CLIP`` (built-in text tower with token_embedding / transformer / ln_final).
        x: N×L×W token embeddings of full context length L (SOT, context/words, EOT, padding).
        eot: N EOT positions (``tokens.argmax(-1)``).
        chunk_size: encode at most this many prompts at a time, grouped by length (None: one block).
        truncate: False runs the full L positions (for equivalence tests and the CoOp-style baseline).
    Returns:
        N×D text features (not normalised), in x's dtype.
    """
    if chunk_size is None or x.shape[0] <= chunk_size:
        return _encode_block(model, x, eot, truncate)
    order = torch.argsort(eot)
    pieces = []
    for start in range(0, x.shape[0], chunk_size):
        idx = order[start:start + chunk_size]
        pieces.append(_encode_block(model, x[idx], eot[idx], truncate))
    return torch.cat(pieces, 0)[torch.argsort(order)]  # back to the callers' order
