"""The CLIP-tower student (issue #24): it starts at its teacher, dilates exactly, keeps the CLIP's BN statistics,
round-trips through checkpoints (residual and calibrated prompt sets included), and the sized schedule."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mvpseg import LearnedPrompts, StudentConfig, StudentNet, StudentPredictor, fuse_views, load_student, save_student
from mvpseg.dense.resnet import resnet_dense_features
from mvpseg.handcrafted import handcrafted_set
from mvpseg.heads import segment
from mvpseg.student import CLIP_BACKBONE, MASKCLIP_HEAD
from training.distill_schedule import CPU_BATCH, MAX_ITERS, MIN_ITERS, measure_step, size_schedule


def clip_student(clip, stride: int = 8, background: bool = False) -> StudentNet:
    cfg = StudentConfig(CLIP_BACKBONE, MASKCLIP_HEAD, clip.embed_dim, stride, background=background,
                        normalization=clip.normalization)
    return StudentNet(cfg, clip_visual=clip.model.visual)


def test_at_stride_32_the_student_is_maskclip_exactly(tiny):
    """The folded head W_c W_v x + (W_c b_v + b_c) equals MaskCLIP's c_proj(v_proj(x)) of the same tower."""
    net = clip_student(tiny, stride=32).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref = resnet_dense_features(tiny.model.visual, x).float()
        got = net.features(x)
    assert got.shape == ref.shape == (2, tiny.embed_dim, 3, 2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_student_logits_at_init_have_the_teachers_argmax(tiny):
    """Eq. 4 with K views: τ1 Σ_i f̂·t_c^i has the argmax of f·w_c (w_c the mean view, f unnormalised): at
    stride 32 the untrained student labels every pixel as its MVP-SEG teacher without GPR."""
    torch.manual_seed(1)
    prompts = LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=4)
    names = ("cat", "dog", "grass", "sky")
    with torch.no_grad():
        text = prompts.encode(tiny, names)
        x = torch.rand(1, 3, 128, 96)
        dense = F.normalize(resnet_dense_features(tiny.model.visual, tiny.normalize(x)).float(), dim=1)
        teacher = segment(dense, text, prompts.tau1(), prompts.tau2(), 0.0)
        net = clip_student(tiny, stride=32).eval()
        student = net(net.normalize(x), fuse_views(text))
    assert torch.equal(student.argmax(1), teacher.fused_logits.argmax(1))


def test_normalised_student_at_init_is_the_teachers_eq4_exactly(tiny):
    """With unit-norm features times s = τ1·K (what training.distill sets), the student's logits at stride 32
    are Eq. 4's fused scores τ1 Σ_i f̂·t_c^i themselves, not only their argmax."""
    torch.manual_seed(2)
    prompts = LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=4)
    names = ("cat", "dog", "grass")
    cfg = StudentConfig(CLIP_BACKBONE, MASKCLIP_HEAD, tiny.embed_dim, 32, normalization=tiny.normalization,
                        normalize_features=True)
    net = StudentNet(cfg, clip_visual=tiny.model.visual).eval()
    with torch.no_grad():
        text = prompts.encode(tiny, names)
        net.set_logit_scale(float(prompts.tau1()) * 3)
        x = torch.rand(2, 3, 64, 96)
        dense = F.normalize(resnet_dense_features(tiny.model.visual, tiny.normalize(x)).float(), dim=1)
        teacher = segment(dense, text, prompts.tau1(), prompts.tau2(), 0.0)
        student = net(net.normalize(x), fuse_views(text))
    torch.testing.assert_close(student, teacher.fused_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="normalised"):
        clip_student(tiny).set_logit_scale(5.0)


def test_dilation_keeps_the_receptive_field_and_changes_only_the_stride(tiny):
    """Output stride 8 / 16: features on a 4× / 2× finer grid; the stem and layer1–2 are untouched (equal
    low-level features), and the pretrained weights are shared values, not re-initialised."""
    x = torch.randn(1, 3, 128, 128)
    nets = {s: clip_student(tiny, stride=s).eval() for s in (8, 16, 32)}
    with torch.no_grad():
        outs = {s: n.backbone(x) for s, n in nets.items()}
    for s in (8, 16):
        assert outs[s][1].shape[-2:] == (128 // s, 128 // s)
        torch.testing.assert_close(outs[s][0], outs[32][0])
        for (k, a), (_, b) in zip(nets[s].state_dict().items(), nets[32].state_dict().items()):
            assert torch.equal(a, b), k
    pool = nets[8].backbone.layer3[0]
    assert isinstance(pool.avgpool, torch.nn.Identity) and nets[8].backbone.layer4[0].conv2.dilation == (2, 2)


def test_the_student_owns_a_copy_and_keeps_the_clips_batchnorm_statistics(tiny):
    net = clip_student(tiny).train()
    before = {k: v.clone() for k, v in tiny.model.visual.state_dict().items()}
    bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(not m.training for m in bn)  # frozen statistics even in train mode
    stats = [m.running_mean.clone() for m in bn]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    logits = net(net.normalize(torch.rand(2, 3, 64, 64)), torch.randn(3, tiny.embed_dim))
    F.cross_entropy(logits, torch.randint(0, 3, (2, *logits.shape[-2:]))).backward()
    opt.step()
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bn, stats))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.parameters())
    for k, v in tiny.model.visual.state_dict().items():  # the frozen CLIP is not the student's
        assert torch.equal(v, before[k]), k


def test_head_must_match_backbone():
    with pytest.raises(ValueError, match="maskclip"):
        StudentConfig("resnet-tiny", MASKCLIP_HEAD, 32)
    with pytest.raises(ValueError, match="maskclip"):
        StudentConfig(CLIP_BACKBONE, "deeplabv2", 32)
    with pytest.raises(ValueError, match="image tower"):  # neither weights nor a recorded shape
        StudentNet(StudentConfig(CLIP_BACKBONE, MASKCLIP_HEAD, 32))


def test_vit_clip_is_refused_with_a_clear_message():
    from mvpseg.testing import tiny_vit_clip

    vit = tiny_vit_clip()
    with pytest.raises(ValueError, match="ResNet CLIP"):
        StudentNet(StudentConfig(CLIP_BACKBONE, MASKCLIP_HEAD, vit.embed_dim), clip_visual=vit.model.visual)


@pytest.mark.parametrize("gpr_bias", [False, True])
def test_roundtrip_with_residual_prompts(tmp_path, tiny, gpr_bias):
    """A student distilled from residual (and calibrated-GPR) prompts reloads them whole: the same class
    embeddings, hence the same predictions, from the checkpoint alone (plus the CLIP's text tower)."""
    torch.manual_seed(0)
    prompts = LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=4, residual=True, gpr_bias=gpr_bias)
    prompts.set_prior(handcrafted_set("a-photo-of"))
    with torch.no_grad():
        prompts.ctx.add_(0.05 * torch.randn_like(prompts.ctx))  # learned: away from ctx0
    net = clip_student(tiny, background=True).eval()
    path = save_student(tmp_path / "s.safetensors", net, prompts, tiny, class_names=("background", "cat", "dog"),
                        background_index=0)
    loaded = load_student(path, tiny)
    assert loaded.net.config.clip_vision == net.config.clip_vision
    assert loaded.prompts.residual and torch.equal(loaded.prompts.ctx0, prompts.ctx0)
    names = ("background", "cat", "dog")
    with torch.no_grad():
        torch.testing.assert_close(fuse_views(loaded.prompts.encode(tiny, names)), fuse_views(prompts.encode(tiny, names)))
        x = torch.rand(1, 3, 64, 64)
        torch.testing.assert_close(loaded.net.features(x), net.features(x))
    pred = StudentPredictor(loaded.net, tiny, loaded.prompts, short_side=64)
    pred.set_image((torch.rand(64, 80, 3) * 255).byte().numpy())
    assert pred.predict(names).label_map.shape == (64, 80)


def test_size_schedule_follows_data_and_device():
    s = size_schedule(300, "cpu")
    assert (s.global_batch, s.max_iters, s.switch_iter) == (CPU_BATCH, 1125, 112)  # ceil(30·300/8), a tenth
    assert size_schedule(300, "cuda").global_batch == 16
    assert size_schedule(5, "cpu").max_iters == MIN_ITERS and size_schedule(10**7, "cuda").max_iters == MAX_ITERS
    capped = size_schedule(300, "cpu", step_seconds=10.0, cpu_budget_s=1200)
    assert capped.max_iters == 120 and "capped" in capped.reason
    assert size_schedule(300, "cpu", step_seconds=0.1).max_iters == 1125  # the cap only lowers
    with pytest.raises(ValueError):
        size_schedule(0, "cpu")


def test_measure_step_leaves_the_student_alone(tiny):
    net = clip_student(tiny).train()
    state = copy.deepcopy(net.state_dict())
    emb = torch.randn(4, tiny.embed_dim)
    rng = torch.get_rng_state()
    seconds = measure_step(net, emb, None, batch=2, crop=64)
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_resolve_schedule_sizes_new_runs_and_keeps_a_resumed_runs(tmp_path):
    """A new run is sized from the measured step (here 10 s: capped at 20 CPU-minutes = 120 steps); a resumed run
    takes the schedule it started with, whatever this machine measures now; explicit flags always win."""
    from types import SimpleNamespace

    from training.checkpointing import CheckpointManager
    from training.distill_config import DistillConfig
    from training.distill_schedule import resolve_schedule

    ctx = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    cfg = DistillConfig("toyworld", "", str(tmp_path), "maskclip-85", max_iters=None, switch_iter=None,
                        global_batch=None)
    probed = []
    new, why = resolve_schedule(cfg, 300, ctx, None, lambda b: probed.append(b) or 10.0)
    assert (new.max_iters, new.switch_iter, new.global_batch) == (120, 12, CPU_BATCH) and "capped" in why
    assert probed == [CPU_BATCH]
    state = CheckpointManager(tmp_path / "ck").save(40, {"config": {"max_iters": 1125, "switch_iter": 112,
                                                                    "global_batch": 8}})
    resumed, why = resolve_schedule(cfg, 300, ctx, state, lambda b: 10.0)
    assert (resumed.max_iters, resumed.switch_iter, resumed.global_batch) == (1125, 112, 8) and "resumed" in why
    fixed, why = resolve_schedule(DistillConfig("toyworld", "", "", "x", max_iters=50, switch_iter=None,
                                                global_batch=None), 300, ctx, None, lambda b: 10.0)
    assert (fixed.max_iters, fixed.switch_iter) == (50, 5)  # --max-iters given: a tenth guided, no probe cap
    with pytest.raises(SystemExit, match="switch-iter"):
        resolve_schedule(DistillConfig("toyworld", "", "", "x", max_iters=None, switch_iter=5000,
                                       global_batch=None), 300, ctx, None, lambda b: 0.1)


def test_resolve_student_defaults_and_clear_refusals(tiny):
    """Off the benchmarks: the CLIP tower for a ResNet CLIP, a ResNet-101 for a ViT or when another head is
    asked for; a clip backbone for a ViT CLIP or a mismatched head is refused with a message, not a traceback."""
    from mvpseg.testing import tiny_vit_clip
    from training.distill_config import DistillConfig, build_parser, config_from_args
    from training.distill_schedule import CLIP_TOWER_CONTEXT, CLIP_TOWER_LR, CLIP_TOWER_STRIDE, resolve_student

    base = DistillConfig("toyworld", "", "", "x", backbone=None, head=None, lr=None, output_stride=None,
                         head_context=None)
    got = resolve_student(base, tiny)
    assert (got.backbone, got.head, got.lr, got.output_stride, got.head_context) == (
        CLIP_BACKBONE, MASKCLIP_HEAD, CLIP_TOWER_LR, CLIP_TOWER_STRIDE, CLIP_TOWER_CONTEXT)
    vit = resolve_student(base, tiny_vit_clip())
    assert (vit.backbone, vit.head, vit.lr, vit.output_stride, vit.head_context) == ("resnet101", "deeplabv2", 0.01, 8, 0)
    from dataclasses import replace

    assert resolve_student(replace(base, head="deeplabv3plus"), tiny).backbone == "resnet101"
    with pytest.raises(SystemExit, match="ResNet CLIP"):
        resolve_student(replace(base, backbone=CLIP_BACKBONE), tiny_vit_clip())
    parse = build_parser().parse_args
    with pytest.raises(SystemExit, match="go together"):
        config_from_args(parse(["--dataset", "toyworld", "--data-root", "-", "--out", "o", "--prompts", "x",
                                "--backbone", "clip", "--head", "deeplabv2"]))
    voc = config_from_args(parse(["--dataset", "voc", "--data-root", "d", "--out", "o", "--prompts", "x"]))
    assert (voc.backbone, voc.head, voc.max_iters, voc.switch_iter, voc.global_batch, voc.lr) == (
        "resnet101", "deeplabv2", 20000, 2000, 16, 0.01)  # the benchmarks keep MaskCLIP+'s settings
