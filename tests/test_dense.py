import torch
import torch.nn.functional as F

import open_clip
from mvpseg.dense import dense_features


def test_resnet_dense_matches_direct_formula(tiny):
    """F = c_proj(v_proj(X)) per location, with biases, no positional embedding, unit norm over channels."""
    visual = tiny.model.visual
    x = tiny.normalize(torch.rand(2, 3, 96, 160))
    feats = tiny.dense_features(x)
    assert feats.shape == (2, 64, 3, 5)  # stride 32, any aspect ratio
    with torch.no_grad():
        X = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
        tokens = X.permute(0, 2, 3, 1)  # B×h×w×C
        ref = visual.attnpool.c_proj(visual.attnpool.v_proj(tokens))
        ref = F.normalize(ref, dim=-1).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, 3, 5))


def test_vit_dense_path_shapes_and_value_path():
    """maskclip-vit (the ViT default): the last block with identity attention, as MaskCLIP's code runs it —
    value path → out_proj, plus the residual and the FFN — then ln_post and proj on the patch tokens."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32, vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=48, patch_size=16, image_size=64, head_width=16),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, width=32, heads=2, layers=1)).eval()
    visual = model.visual
    img = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        feats = dense_features(visual, img)
        x = visual.conv1(img).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], 1)
        pos = visual.positional_embedding
        grid = F.interpolate(pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(4, 6), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).reshape(24, -1)
        x = visual.ln_pre(x + torch.cat([pos[:1], grid]))
        x = visual.transformer.resblocks[0](x)
        last = visual.transformer.resblocks[1]
        w_v = last.attn.in_proj_weight[96:]
        z = x + last.attn.out_proj(last.ln_1(x) @ w_v.t() + last.attn.in_proj_bias[96:])
        z = z + last.mlp(last.ln_2(z))
        ref = F.normalize(visual.ln_post(z[:, 1:]) @ visual.proj, dim=-1).transpose(1, 2).reshape(1, 32, 4, 6)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    assert feats.shape == (1, 32, 4, 6)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(1, 4, 6))


def test_resnet_default_is_unchanged_by_the_mode_argument(tiny):
    x = tiny.normalize(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        assert torch.equal(dense_features(tiny.model.visual, x), dense_features(tiny.model.visual, x, "maskclip"))
