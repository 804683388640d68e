"""The Gradio demo of mvpseg (``python app.py``): model selection, rendering, plots and the page layout.

Only the app imports this package; the core library (``mvpseg``) never does.

* ``models``  – which CLIP to run (pretrained → bundled toy model → random weights, with a plain message),
  learned prompt checkpoints (command line, shipped under ``assets/``), the optional MVP-SEG+ student.
* ``sources`` – user inputs: images (validation, downscaling) and learned prompts (upload, Hub repo).
* ``service`` – one request: cached image / text features, per-prompt-set predictions, stage timings.
* ``render``  – overlays with legends and per-prompt view-mask grids (numpy + PIL).
* ``plots``   – GPR score table and the t-SNE plot of prompt text embeddings (scikit-learn + matplotlib).
* ``layout``  – the ``gr.Blocks`` page, its endpoints and the launch settings.
"""
from __future__ import annotations

from .models import DemoConfig, DemoModels, StudentSlot, load_models
from .service import SegmentService

__all__ = ["DemoConfig", "DemoModels", "StudentSlot", "load_models", "SegmentService", "build_demo", "launch_kwargs"]


def __getattr__(name: str):
    # gradio is imported lazily so that the model / service code can be used (and tested) without it.
    if name in ("build_demo", "launch_kwargs"):
        from . import layout

        return getattr(layout, name)
    raise AttributeError(name)
