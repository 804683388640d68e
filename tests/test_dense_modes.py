"""ViT dense modes against ports of the official forwards (MaskCLIP, SCLIP, ClearCLIP, NACLIP), and the mode API.

The ports below copy the official code line by line (repo + file cited) and run it on a *sequence-first* twin of
a random-weight open_clip ViT (the same weights; its blocks' nn.MultiheadAttention set to batch_first=False), so
the official LND conventions (``x.permute(1, 0, 2)``, ``q.view(-1, bsz * num_heads, head_dim)``) apply verbatim.
Where the official code calls into its own modules, the open_clip module with the same role is used (named in
the comments). Weights are perturbed so layer norms, biases and the class token are not at their init values.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import open_clip
from mvpseg.clip_backbone import register_model_config
from mvpseg.dense import DENSE_MODES, check_dense_mode, default_dense_mode, dense_features

TOL = 1e-5


def _tiny_vit(quick_gelu: bool = False, seed: int = 0) -> nn.Module:
    name = f"mvpseg-test-vit{'-qg' if quick_gelu else ''}"
    register_model_config(name, {
        "embed_dim": 32, "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None).eval()
        with torch.no_grad():
            for p in model.visual.parameters():
                p.add_(0.1 * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))
    return model.visual


def _seq_first(visual: nn.Module) -> nn.Module:
    """The same tower with OpenAI-CLIP conventions: transformer and attention modules sequence-first."""
    twin = copy.deepcopy(visual)
    twin.transformer.batch_first = False
    for blk in twin.transformer.resblocks:
        blk.attn.batch_first = False
    return twin


@pytest.fixture(scope="module")
def vit():
    return _tiny_vit()


@pytest.fixture(scope="module")
def vit_qg():
    return _tiny_vit(quick_gelu=True, seed=1)


# ---- official code, ported -------------------------------------------------------------------------------------

def dino_interpolate_pos_encoding(visual, x, w, h, recompute_scale_factor=None):
    # wangf3014/SCLIP clip/model.py, mc-lan/ClearCLIP open_clip/transformer.py (no recompute_scale_factor arg),
    # sinahmr/NACLIP clip/model.py (recompute_scale_factor=False): VisionTransformer.interpolate_pos_encoding
    patch_size = visual.conv1.kernel_size[0]
    npatch = x.shape[1] - 1
    N = visual.positional_embedding.shape[0] - 1
    if npatch == N and w == h:
        return visual.positional_embedding
    class_pos_embed = visual.positional_embedding[[0]]
    patch_pos_embed = visual.positional_embedding[1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic', recompute_scale_factor=recompute_scale_factor,
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_embed_and_blocks(visual, x, **interp):
    # SCLIP / NACLIP clip/model.py VisionTransformer.forward, up to the last block (ClearCLIP's is the same)
    B, nc, w, h = x.shape
    x = visual.conv1(x)  # shape = [*, width, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1)  # shape = [*, width, grid ** 2]
    x = x.permute(0, 2, 1)  # shape = [*, grid ** 2, width]
    x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                                    device=x.device), x], dim=1)
    if x.shape[1] != visual.positional_embedding.shape[0]:
        x = x + dino_interpolate_pos_encoding(visual, x, w, h, **interp).to(x.dtype)
    else:
        x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    return x


def official_custom_attn(attn_layer, x, strategy, addition=None):
    # SCLIP clip/model.py custom_attn (csa), ClearCLIP open_clip/transformer.py custom_attn ('ClearCLIP'),
    # NACLIP clip/model.py custom_attn ('naclip'); the shared lines are written once
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if strategy == 'csa':  # SCLIP
        q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
    elif strategy == 'ClearCLIP':
        qq_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        attn_weights = F.softmax(qq_attn, dim=-1)
    elif strategy == 'naclip':
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        omega = addition
        attn_weights += omega
        attn_weights = F.softmax(attn_weights, dim=-1)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    attn_output = attn_layer.out_proj(attn_output)
    return attn_output


def naclip_gaussian_window(dim1, dim2, std=1.):
    # sinahmr/NACLIP clip/model.py VisionTransformer.gaussian_window
    constant = 1 / (std * math.sqrt(2))
    ks = list()
    for dim in [dim1, dim2]:
        start = -(dim - 1) / 2.0
        k = torch.linspace(start=start * constant, end=(start + (dim - 1)) * constant, steps=dim, dtype=torch.float)
        ks.append(k)
    dist_square_to_mu = (torch.stack(torch.meshgrid(*ks, indexing='ij')) ** 2).sum(0)
    return torch.exp(-dist_square_to_mu)


def naclip_get_attention_addition(dim1, dim2, window, adjust_for_cls=True):
    # sinahmr/NACLIP clip/model.py VisionTransformer.get_attention_addition
    m = torch.einsum('ij,kl->ijkl', torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()  # m[ijkl] = 1 iff (i, j) == (k, l)
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding='same').squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    if adjust_for_cls:
        v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
        out = torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])
    return out


def official_tokens_to_features(visual, x, grid):
    # forward(return_all=True): self.ln_post(x) @ self.proj; the segmentors' forward_feature then normalises and
    # drops the class token; reshaped to B×D×h×w as in forward_feature (logits.permute(0, 2, 1).reshape)
    feats = visual.ln_post(x) @ visual.proj
    feats = feats / feats.norm(dim=-1, keepdim=True)
    feats = feats[:, 1:]
    return feats.permute(0, 2, 1).reshape(feats.shape[0], -1, *grid)


def official_sclip(visual, img):
    # wangf3014/SCLIP clip/model.py VisionTransformer.forward(return_all=True, csa=True)
    x = official_embed_and_blocks(visual, img)
    for blk in visual.transformer.resblocks[-1:]:
        x = x + official_custom_attn(blk.attn, blk.ln_1(x), 'csa')
        x = x + blk.mlp(blk.ln_2(x))
    x = x.permute(1, 0, 2)  # LND -> NLD
    return official_tokens_to_features(visual, x, _grid(visual, img))


def official_clearclip(visual, img):
    # mc-lan/ClearCLIP open_clip/transformer.py VisionTransformer.forward(model_type='ClearCLIP',
    # ignore_residual=True, last_n_layers=1); then ln_post, _global_pool ('tok': x[:, 1:]), tokens @ proj
    x = official_embed_and_blocks(visual, img)
    output = 0
    for blk in visual.transformer.resblocks[-1:]:
        output += official_custom_attn(blk.attn, blk.ln_1(x), 'ClearCLIP')
        x = blk(x)
    x = output.permute(1, 0, 2)  # LND -> NLD
    return official_tokens_to_features(visual, x, _grid(visual, img))


def official_naclip(visual, img, gaussian_std=5.):
    # sinahmr/NACLIP clip/model.py VisionTransformer.forward with arch='reduced', attn_strategy='naclip'
    B, nc, w, h = img.shape
    patch_size = visual.conv1.kernel_size[0]
    n_patches = (w // patch_size, h // patch_size)
    x = official_embed_and_blocks(visual, img, recompute_scale_factor=False)
    blk = visual.transformer.resblocks[-1]
    window_size = [side * 2 - 1 for side in n_patches]
    window = naclip_gaussian_window(*window_size, std=gaussian_std)
    addition = naclip_get_attention_addition(*n_patches, window).unsqueeze(0).to(x.dtype).to(x.device)
    x = official_custom_attn(blk.attn, blk.ln_1(x), 'naclip', addition)
    x = x.permute(1, 0, 2)  # LND -> NLD
    return official_tokens_to_features(visual, x, _grid(visual, img))


def official_maskclip_vit(visual, img):
    # chongzhou96/MaskCLIP mmseg/models/backbones/vit.py VisionTransformer.forward (pre_norm, final_norm,
    # return_qkv on the last layer) + TransformerEncoderLayer.forward(return_qkv=True); module roles after
    # tools/maskclip_utils/convert_clip_weights.py: ln0 = ln_pre, norm1/norm2 = ln_1/ln_2, ffn = mlp,
    # final norm1 = ln_post, head proj (1×1 conv, weight proj.t()) = @ proj. Runs batch-first like mmseg.
    x = visual.conv1(img)
    hw_shape = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    B = x.shape[0]
    cls_tokens = visual.class_embedding[None, None, :].expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    pos_embed = visual.positional_embedding[None]
    if x.shape[1] != pos_embed.shape[1]:  # _pos_embeding → resize_pos_embed
        pos_h = pos_w = int(math.isqrt(pos_embed.shape[1] - 1))
        cls_token_weight = pos_embed[:, 0]
        pos_embed_weight = pos_embed[:, (-1 * pos_h * pos_w):]
        pos_embed_weight = pos_embed_weight.reshape(1, pos_h, pos_w, pos_embed.shape[2]).permute(0, 3, 1, 2)
        pos_embed_weight = F.interpolate(pos_embed_weight, size=tuple(hw_shape), align_corners=False, mode='bicubic')
        cls_token_weight = cls_token_weight.unsqueeze(1)
        pos_embed_weight = torch.flatten(pos_embed_weight, 2).transpose(1, 2)
        pos_embed = torch.cat((cls_token_weight, pos_embed_weight), dim=1)
    x = x + pos_embed
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x)
    blk = blocks[-1]
    # TransformerEncoderLayer.forward(x, return_qkv=True)
    y = blk.ln_1(x)
    y = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    N, L, C = y.shape
    y = y.view(N, L, 3, C // 3).permute(2, 0, 1, 3).reshape(3 * N, L, C // 3)
    y = F.linear(y, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
    q, k, v = y.tensor_split(3, dim=0)
    v += x
    v = v + blk.mlp(blk.ln_2(v))  # self.ffn(self.norm2(v), identity=v)
    v = visual.ln_post(v)  # final_norm: v = self.norm1(v)
    v = v[:, 1:]
    B, _, C = v.shape
    v = v.reshape(B, hw_shape[0], hw_shape[1], C).permute(0, 3, 1, 2)
    feat = F.conv2d(v, visual.proj.t()[:, :, None, None])  # MaskClipHead: feat = self.proj(v)
    return feat / feat.norm(dim=1, keepdim=True)  # cls_seg


def _grid(visual, img):
    p = visual.conv1.kernel_size[0]
    return img.shape[-2] // p, img.shape[-1] // p


OFFICIAL = {"maskclip-vit": official_maskclip_vit, "sclip": official_sclip, "clearclip": official_clearclip,
            "naclip": official_naclip}


# ---- tests -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(OFFICIAL))
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (72, 56)], ids=["native", "wide", "tall"])
def test_vit_modes_match_official_code(vit, mode, size):
    torch.manual_seed(1)
    img = torch.randn(2, 3, *size)
    twin = _seq_first(vit)
    with torch.no_grad():
        ours = dense_features(vit, img, mode)
        ours_seq_first = dense_features(twin, img, mode)
        ref = OFFICIAL[mode](vit if mode == "maskclip-vit" else twin, img)
    grid = (size[0] // 8, size[1] // 8)
    assert ours.shape == (2, 32, *grid) and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= TOL
    assert (ours_seq_first - ref).abs().max() <= TOL
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(2, *grid))


@pytest.mark.parametrize("mode", list(OFFICIAL))
def test_vit_modes_match_official_code_with_quick_gelu(vit_qg, mode):
    assert isinstance(vit_qg.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    img = torch.randn(1, 3, 56, 72)
    with torch.no_grad():
        ours = dense_features(vit_qg, img, mode)
        ref = OFFICIAL[mode](vit_qg if mode == "maskclip-vit" else _seq_first(vit_qg), img)
    assert (ours - ref).abs().max() <= TOL


def test_modes_differ_from_each_other(vit):
    """The comparisons above are only meaningful if the four last blocks give different features."""
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = {m: dense_features(vit, img, m) for m in OFFICIAL}
    for a in OFFICIAL:
        for b in OFFICIAL:
            if a < b:
                assert (feats[a] - feats[b]).abs().max() > 1e-2, (a, b)


def test_positional_interpolation_differs_between_maskclip_and_dino_style(vit):
    from mvpseg.dense.vit import _vit_pos_embed

    resized, dino = _vit_pos_embed(vit, 6, 10), _vit_pos_embed(vit, 6, 10, dino=True)
    assert resized.shape == dino.shape == (61, 64)
    assert (resized - dino).abs().max() > 1e-3  # (g + 0.1)/n samples other source positions
    assert _vit_pos_embed(vit, 8, 8, dino=True) is vit.positional_embedding  # native grid: untouched


def test_mode_api(tiny, vit):
    rn = tiny.model.visual
    assert DENSE_MODES == ("maskclip", "maskclip-vit", "sclip", "clearclip", "naclip")
    assert default_dense_mode(rn) == "maskclip" and default_dense_mode(vit) == "maskclip-vit"
    assert check_dense_mode(rn, "maskclip") == "maskclip"
    for mode in DENSE_MODES[1:]:
        assert check_dense_mode(vit, mode) == mode
        with pytest.raises(ValueError, match=r"not available for a ModifiedResNet tower; valid modes: 'maskclip'$"):
            check_dense_mode(rn, mode)
    with pytest.raises(ValueError, match=r"use 'maskclip-vit'.*valid modes: 'maskclip-vit', 'sclip', 'clearclip', "
                                         r"'naclip'"):
        check_dense_mode(vit, "maskclip")
    with pytest.raises(ValueError, match=r"unknown dense mode 'SCLIP'; valid modes for a VisionTransformer"):
        dense_features(vit, torch.zeros(1, 3, 64, 64), "SCLIP")
    with pytest.raises(NotImplementedError, match="ModifiedResNet .* or VisionTransformer"):
        default_dense_mode(nn.Linear(2, 2))
    x = tiny.normalize(torch.rand(1, 3, 64, 96))
    with torch.no_grad():
        assert torch.equal(dense_features(rn, x), dense_features(rn, x, "maskclip"))
        img = torch.randn(1, 3, 64, 64)
        assert torch.equal(dense_features(vit, img), dense_features(vit, img, "maskclip-vit"))


def test_layer_scale_is_applied_to_its_branch(vit):
    """open_clip's LayerScale (ls_1/ls_2) scales the attention/FFN branch it belongs to in every mode."""
    from open_clip.transformer import LayerScale

    scaled = copy.deepcopy(vit)
    blk = scaled.transformer.resblocks[-1]
    blk.ls_1, blk.ls_2 = LayerScale(64, 1.0), LayerScale(64, 1.0)
    g1, g2 = torch.rand(64) + 0.5, torch.rand(64) + 0.5  # per channel: ln_post is not invariant to them
    with torch.no_grad():
        blk.ls_1.gamma.copy_(g1)
        blk.ls_2.gamma.copy_(g2)
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = scaled.ln_pre(torch.cat([scaled.class_embedding.expand(1, 1, -1),
                                     scaled.conv1(img).flatten(2).transpose(1, 2)], 1) + scaled.positional_embedding)
        for b in scaled.transformer.resblocks[:-1]:
            x = b(x)
        # maskclip-vit (identity attention): z = x + ls_1(v);  z = z + ls_2(mlp(ln_2(z)))
        v = blk.attn.out_proj(F.linear(blk.ln_1(x), blk.attn.in_proj_weight[128:], blk.attn.in_proj_bias[128:]))
        z = x + g1 * v
        z = z + g2 * blk.mlp(blk.ln_2(z))
        ref = F.normalize(scaled.ln_post(z[:, 1:]) @ scaled.proj, dim=-1).transpose(1, 2).reshape(1, 32, 8, 8)
        torch.testing.assert_close(dense_features(scaled, img, "maskclip-vit"), ref, rtol=1e-4, atol=1e-5)
        for mode in ("clearclip", "naclip", "sclip"):
            assert (dense_features(scaled, img, mode) - dense_features(vit, img, mode)).abs().max() > 1e-3
