"""Prompt sets: the common interface, and the learnable multi-view prompts of MVP-SEG (CoOp unified context).

A prompt set turns a list of class names into K views of unit-norm text embeddings (K×C×D), plus an optional
global-classification view (C×D) used by GPR. Learned and handcrafted sets share this interface, so the
model, the predictor and the demo treat them alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip_backbone import FrozenCLIP
from .gpr_adapter import GPRAdapter
from .gpr_floor import GPRFloor


@dataclass(frozen=True)
class TextViews:
    """Text embeddings of one vocabulary under one prompt set.

    seg: K×C×D unit-norm segmentation views; glob: C×D global-prompt embeddings (None without GPR).
    """

    seg: torch.Tensor
    glob: torch.Tensor | None
    view_names: tuple[str, ...]
    class_names: tuple[str, ...]

    def detach(self) -> "TextViews":
        return TextViews(self.seg.detach(), None if self.glob is None else self.glob.detach(),
                         self.view_names, self.class_names)


def prior_embedding(text: TextViews) -> torch.Tensor:
    """C×D unit embeddings of a handcrafted set: its normalised mean view (a single-view set: the view itself).
    What residual prompts add their learned change to, and the target of the warm start and the anchor."""
    return F.normalize(text.seg.detach().float().mean(0), dim=-1)


class PromptSet(nn.Module):
    """Base class: ``encode(clip, class_names) -> TextViews`` and the fusion temperatures."""

    name: str = "prompts"
    view_names: tuple[str, ...] = ()
    # encode() treats every class name independently of the others, so text caches may store and reuse the
    # embeddings per class (mvpseg/text_cache.py); a subclass mixing classes must set this to False.
    per_class_text: bool = True

    @property
    def has_global(self) -> bool:
        return False

    def tau1(self) -> torch.Tensor | float:
        """Eq. 4 temperature applied to the *sum* of the K view masks."""
        raise NotImplementedError

    def tau2(self) -> torch.Tensor | float | None:
        """Eq. 6 temperature (None when the set has no global prompt)."""
        return None

    def gpr_bias(self) -> torch.Tensor | float:
        """A logit offset subtracted inside Eq. 6's sigmoid (0 unless a set learned one: calibrated GPR)."""
        return 0.0

    def gpr_adapter(self) -> nn.Module | None:
        """The map through which GPR reads the dense features (mvpseg.gpr_adapter; None: the features themselves,
        the paper's Eq. 6)."""
        return None

    def gpr_shifts(self) -> int:
        """k: GPR averages Eq. 6 over k × k sub-cell shifts of the image (mvpseg.gpr_shifts); 1: the image
        alone, as the paper. An inference setting a checkpoint carries (``set_gpr_shifts``)."""
        return int(getattr(self, "_gpr_shifts", 1))

    def set_gpr_shifts(self, k: int) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"GPR shifts must be an integer >= 1, got {k!r}")
        if k > 1 and not self.has_global:
            raise ValueError("GPR shifts need a prompt set with a global prompt")
        self._gpr_shifts = int(k)

    def gpr_floor(self) -> GPRFloor | None:
        """The floor under a fitted GPR (mvpseg.gpr_floor): the fitted logits may fall at most its margin below
        the prompts' own Eq. 6 reading; None: no floor. An inference setting a checkpoint carries."""
        return getattr(self, "_gpr_floor", None)

    def set_gpr_floor(self, floor: GPRFloor | None) -> None:
        if floor is not None and not self.has_global:
            raise ValueError("a GPR floor needs a prompt set with a global prompt")
        self._gpr_floor = floor

    def encode(self, clip: FrozenCLIP, class_names: Sequence[str]) -> TextViews:
        raise NotImplementedError

    def text_identity(self) -> tuple[tuple, dict[str, torch.Tensor]]:
        """What ``encode`` depends on besides the class names and the CLIP, as (plain values, tensors); text
        caches key on its digest. The default is conservative: the class, the view names and every parameter
        and buffer."""
        return (type(self).__qualname__, tuple(self.view_names)), dict(self.state_dict(keep_vars=True))


class LearnedPrompts(PromptSet):
    """k segmentation prompts + optional global prompt p_0, each ``n_ctx`` learnable vectors (paper Eq. 3).

    ``ctx`` has shape P×n_ctx×W with P = k + use_global; when present, the global prompt is ``ctx[0]`` (the
    paper's p_0). Every prompt is ``[SOT] ctx_1 … ctx_n name . [EOT]``: the class name follows the context,
    as CoOp's unified context with the class token at the end.
    """

    def __init__(self, text_width: int, n_seg: int = 3, n_ctx: int = 32, use_global: bool = True,
                 tau1_init: float | None = None, tau2_init: float = 0.07, init_std: float = 0.02,
                 name: str = "learned", gpr_bias: bool = False, residual: bool = False) -> None:
        super().__init__()
        if n_seg < 1 or n_ctx < 1:
            raise ValueError(f"need n_seg >= 1 and n_ctx >= 1, got {n_seg}, {n_ctx}")
        self.name, self.n_seg, self.n_ctx, self.use_global = name, n_seg, n_ctx, use_global
        self.text_width = text_width
        # the segmentation views are drawn first, so that they start alike with and without a global prompt
        seg = torch.randn(n_seg, n_ctx, text_width)
        ctx = torch.cat([torch.randn(1, n_ctx, text_width), seg]) if use_global else seg
        self.ctx = nn.Parameter(ctx * init_std)
        # 100 is CLIP's logit scale; dividing by k makes the initial fusion a temperature-100 softmax of the
        # *mean* view mask, so the learner starts where a single CLIP classifier would.
        tau1_init = float(tau1_init if tau1_init is not None else 100.0 / n_seg)
        if not (tau1_init > 0 and tau2_init > 0):
            raise ValueError(f"temperatures must be positive, got tau1={tau1_init}, tau2={tau2_init}")
        # Both temperatures are learned in log space, as CLIP learns its logit scale: a raw scalar of ~33-100
        # barely moves under SGD at prompt-learning rates (measured: 100 -> 99.8 in 400 iterations at lr 2e-3),
        # and the context vectors then do the temperature's job instead, by pulling every class embedding
        # together (mean cosine 0.99), which erases the class names (docs/history/toyworld-attempts.md, "Six more attempts", item 2).
        self.log_tau1 = nn.Parameter(torch.tensor(tau1_init).log())
        self.log_tau2 = nn.Parameter(torch.tensor(float(tau2_init)).log(), requires_grad=use_global)
        if gpr_bias:
            self.enable_gpr_bias()
        self.view_names = tuple(f"prompt {i + 1}" for i in range(n_seg))
        self._token_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # residual form (issue #27, docs/recipe.md): ctx0 is the context the learned change is measured from and
        # ``prior`` the handcrafted set it is added to; both None for the plain form (CoOp's, the paper's)
        self.register_buffer("ctx0", self.ctx.detach().clone() if residual else None)
        self.prior: PromptSet | None = None
        self._base_cache: dict[tuple, torch.Tensor] = {}

    @property
    def residual(self) -> bool:
        """Whether the set is in residual form: t^i_c = norm(h_c + e^i_c − e0^i_c) (``set_prior``)."""
        return self.ctx0 is not None

    def set_prior(self, prior: "PromptSet", rebase: bool = True) -> None:
        """Residual form: every view's class embedding becomes norm(h_c + e^i_c − e0^i_c), with h_c the
        handcrafted set ``prior``'s normalised mean view, e^i_c the embedding of the current context and e0^i_c
        that of ``ctx0``, the context at this call (``rebase``; a loaded or resumed set keeps its own). At the
        call the classifier *is* the handcrafted one, exactly, whatever the context; learning only adds the
        change of the context's embeddings. Why: a 32-token context fitted to the templates reproduces them
        only to cosine ≈ 0.997, and dense logits have margins so thin that this residue alone moves unseen
        objects between classes (issue #27); here it cancels. Costs one extra no-grad text pass per
        vocabulary (cached) and the prior's templates."""
        if self.ctx0 is None or rebase:
            self.ctx0 = self.ctx.detach().clone()
        self.prior = prior
        self._base_cache.clear()

    @property
    def has_global(self) -> bool:
        return self.use_global

    @property
    def seg_ctx(self) -> torch.Tensor:
        """k×n_ctx×W segmentation prompt vectors (the OCLoss operands)."""
        return self.ctx[1:] if self.use_global else self.ctx

    def tau1(self) -> torch.Tensor:
        return self.log_tau1.exp()

    def tau2(self) -> torch.Tensor | None:
        return self.log_tau2.exp() if self.use_global else None

    def enable_gpr_bias(self, value: float = 0.0) -> None:
        """Calibrated GPR: g_c = σ(s_c / τ2 − β) with a learned scalar β (logit units, like SigLIP's bias; init
        ``value``). Without it, every g_c > 0.5 whenever the global prompt's cosines are positive — and CLIP's
        are — so GPR cannot suppress an absent class (docs/history/gpr-study.md). Only with a global prompt."""
        if not self.use_global:
            raise ValueError("a GPR bias needs a global prompt (use_global=True)")
        if "bias" not in self._parameters:
            self.bias = nn.Parameter(torch.tensor(float(value), device=self.ctx.device))

    def gpr_bias(self) -> torch.Tensor | float:
        return self._parameters["bias"] if "bias" in self._parameters else 0.0

    def enable_gpr_adapter(self, dim: int, width: int, seed: int = 0) -> GPRAdapter:
        """Adds the GPR adapter φ (``mvpseg.gpr_adapter.GPRAdapter``: dense features of width ``dim``, hidden
        ``width``), the identity at its start; its parameters learn with the global prompt. Only with a global
        prompt. Its state keys are ``gpr_adapter.*`` (training's ``splice_global`` takes them with the global
        prompt)."""
        if not self.use_global:
            raise ValueError("a GPR adapter needs a global prompt (use_global=True)")
        self.gpr_adapter_net = GPRAdapter(dim, width, seed).to(self.ctx.device)
        return self.gpr_adapter_net

    def gpr_adapter(self) -> nn.Module | None:
        return self._modules.get("gpr_adapter_net")

    def text_identity(self) -> tuple[tuple, dict[str, torch.Tensor]]:
        """The context vectors and the layout (and, in residual form, ctx0 and the prior's templates): the
        temperatures do not change the text embeddings."""
        plain = (type(self).__qualname__, self.n_seg, self.n_ctx, self.use_global, self.view_names)
        if not self.residual:
            return plain, {"ctx": self.ctx}
        prior = None if self.prior is None else self.prior.text_identity()[0]
        return (*plain, prior), {"ctx": self.ctx, "ctx0": self.ctx0}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What prompt checkpoints store: ``ctx`` (P×n_ctx×W) and the temperatures ``tau1``, ``tau2``
        themselves (0-d), float32 on the CPU; the file format does not depend on the parametrisation."""
        out = {"ctx": self.ctx.detach().float().cpu().contiguous(),
               "tau1": self.log_tau1.detach().float().cpu().exp().reshape(()),
               "tau2": self.log_tau2.detach().float().cpu().exp().reshape(())}
        if "bias" in self._parameters:  # only calibrated sets write it: other files stay readable as before
            out["gpr_bias"] = self.bias.detach().float().cpu().reshape(())
        if self.residual:  # likewise residual sets (the prior's name goes in the JSON: mvpseg.checkpoint)
            out["ctx0"] = self.ctx0.detach().float().cpu().contiguous()
        if self.gpr_adapter() is not None:  # and sets with a GPR adapter: gpr_adapter.{w1, b1, w2, b2}
            out.update(self.gpr_adapter().checkpoint_tensors())
        return out

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``checkpoint_tensors``, strict: exactly ``ctx`` (this set's shape) and 0-d ``tau1``,
        ``tau2``, all finite, temperatures positive (and the ``gpr_adapter.*`` tensors of a set with a GPR
        adapter: ``GPRAdapter.from_checkpoint``); raises ValueError naming the first problem."""
        expected = {"ctx": tuple(self.ctx.shape), "tau1": (), "tau2": ()}
        if "gpr_bias" in tensors and self.use_global:  # a calibrated GPR set
            expected["gpr_bias"] = ()
        if "ctx0" in tensors:  # a residual set
            expected["ctx0"] = tuple(self.ctx.shape)
        adapter = {k: v for k, v in tensors.items() if k.startswith("gpr_adapter.")}
        if adapter and not self.use_global:
            raise ValueError("holds a GPR adapter but no global prompt")
        tensors = {k: v for k, v in tensors.items() if k not in adapter}
        if set(tensors) != set(expected):
            raise ValueError(f"holds tensors {sorted(tensors)}, expected {sorted(expected)}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"tensor '{key}' has shape {tuple(tensors[key].shape)}, metadata says {shape}")
            if not torch.isfinite(tensors[key]).all():
                raise ValueError(f"tensor '{key}' contains NaN or infinite values")
        for key in ("tau1", "tau2"):
            if not tensors[key] > 0:
                raise ValueError(f"temperature {key} must be a positive finite number, got {float(tensors[key])}")
        state = {"ctx": tensors["ctx"], "log_tau1": tensors["tau1"].float().log(),
                 "log_tau2": tensors["tau2"].float().log()}
        if "gpr_bias" in tensors:
            self.enable_gpr_bias()
            state["bias"] = tensors["gpr_bias"].float()
        if "ctx0" in tensors:
            self.ctx0 = torch.zeros_like(self.ctx.detach())
            state["ctx0"] = tensors["ctx0"]
        if adapter:
            net = GPRAdapter.from_checkpoint(adapter)
            self.enable_gpr_adapter(net.dim, net.width)
            state.update({f"gpr_adapter_net.{k}": v for k, v in net.state_dict().items()})
        self.load_state_dict(state, strict=True)
        self._base_cache.clear()

    def name_token_budget(self, clip: FrozenCLIP) -> int:
        """Tokens a class name may take after the n_ctx learned tokens (SOT, '.', EOT take three)."""
        return clip.context_length - self.n_ctx - 3

    def _frozen_tokens(self, clip: FrozenCLIP, class_names: tuple[str, ...]):
        """(prefix C×1×W, suffix C×(L-1-n_ctx)×W, eot C) for the vocabulary, cached per (names, device)."""
        key = (class_names, str(clip.device), clip.fingerprint)
        if key not in self._token_cache:
            budget = self.name_token_budget(clip)
            for name in class_names:
                n = len(clip.tokenizer.encode(name)) if hasattr(clip.tokenizer, "encode") else 0
                if n > budget:
                    raise ValueError(f"class name '{name}' is {n} tokens; with {self.n_ctx} context tokens at most "
                                     f"{budget} fit in CLIP's {clip.context_length}-token context")
            placeholder = " ".join(["X"] * self.n_ctx)
            tokens = clip.tokenize([f"{placeholder} {name}." for name in class_names])
            with torch.no_grad():
                emb = clip.token_embeddings(tokens)
            if len(self._token_cache) > 16:  # vocabularies change rarely; keep the cache small
                self._token_cache.clear()
            self._token_cache[key] = (emb[:, :1], emb[:, 1 + self.n_ctx:], tokens.argmax(-1))
        return self._token_cache[key]

    def encode_context(self, clip: FrozenCLIP, class_names: Sequence[str], ctx: torch.Tensor) -> torch.Tensor:
        """The plain prompt embeddings of context ``ctx`` (P×n_ctx×W): P×C×D, unit norm; gradients flow into
        ``ctx``."""
        names = tuple(class_names)
        if ctx.shape[-1] != clip.text_width:
            raise ValueError(f"prompt width {ctx.shape[-1]} does not match the CLIP text width {clip.text_width}")
        prefix, suffix, eot = self._frozen_tokens(clip, names)
        p, c = ctx.shape[0], len(names)
        ctx = ctx.to(prefix.dtype)
        x = torch.cat([prefix.unsqueeze(0).expand(p, -1, -1, -1),
                       ctx.unsqueeze(1).expand(-1, c, -1, -1),
                       suffix.unsqueeze(0).expand(p, -1, -1, -1)], dim=2)  # P×C×L×W
        feats = clip.encode_embeddings(x.flatten(0, 1), eot.repeat(p))  # one pass for all (k+1)·C prompts
        return F.normalize(feats.float(), dim=-1).view(p, c, -1)

    def _residual_base(self, clip: FrozenCLIP, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(h C×D, e0 P×C×D) of the residual form for a vocabulary; e0 cached per vocabulary and ctx0 (the
        handcrafted prior keeps its own embeddings)."""
        if self.prior is None:
            raise RuntimeError("residual prompts need their handcrafted prior: call set_prior (load_prompts does)")
        key = (names, str(clip.device), clip.fingerprint, self.ctx0.data_ptr(), self.ctx0._version)
        if key not in self._base_cache:
            if len(self._base_cache) > 16:
                self._base_cache.clear()
            with torch.no_grad():
                self._base_cache[key] = self.encode_context(clip, names, self.ctx0)
        return prior_embedding(self.prior.encode(clip, names)), self._base_cache[key]

    def compose(self, clip: FrozenCLIP, class_names: Sequence[str], feats: torch.Tensor) -> TextViews:
        """Plain prompt embeddings P×C×D → TextViews; in residual form norm(h + e − e0) (``set_prior``). The
        training's shared-prefix encoder computes ``feats`` its own way and ends here too."""
        names = tuple(class_names)
        if self.residual:
            h, e0 = self._residual_base(clip, names)
            feats = F.normalize(h.to(feats.device).unsqueeze(0) + feats - e0.to(feats.device), dim=-1)
        seg, glob = (feats[1:], feats[0]) if self.use_global else (feats, None)
        return TextViews(seg, glob, self.view_names, names)

    def encode_global(self, clip: FrozenCLIP, class_names: Sequence[str], plain: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The global prompt's C×D class embeddings alone — one text pass for ``ctx[0]`` instead of all P
        prompts (training's global-only steps); equal to ``encode(...).glob``. ``plain``: its plain embeddings
        1×C×D when computed elsewhere (the shared-prefix encoder)."""
        if not self.use_global:
            raise ValueError("this prompt set has no global prompt")
        names = tuple(class_names)
        if plain is None:
            plain = self.encode_context(clip, names, self.ctx[:1])
        if self.residual:
            h, e0 = self._residual_base(clip, names)
            plain = F.normalize(h.to(plain.device).unsqueeze(0) + plain - e0[:1].to(plain.device), dim=-1)
        return plain[0]

    def encode(self, clip: FrozenCLIP, class_names: Sequence[str]) -> TextViews:
        """Class names (C) → TextViews with seg k×C×D and glob C×D; gradients flow into ``ctx``."""
        return self.compose(clip, class_names, self.encode_context(clip, class_names, self.ctx))
