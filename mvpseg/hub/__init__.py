"""Hugging Face Hub round trip for mvpseg checkpoints: ``push`` publishes learned prompts or an MVP-SEG+ student
with a model card; ``download`` / ``load_prompts_from_hub`` read them back (the demo's ``hf-hub:`` box, the
``--prompts`` / ``--student`` options of ``python -m mvpseg segment`` and ``build_predictor`` use them).

A pushed repo holds exactly the layout the reading side expects by default::

    prompts.safetensors + prompts.json      (learned prompts)   or   student.safetensors + student.json
    README.md                               model card (``mvpseg/hub/card.py``)
    eval.json                               the ``training.evaluate`` results the card's metrics come from

so ``hf-hub:ORG/REPO`` names the prompts and ``hf-hub:ORG/REPO/student.safetensors`` (or ``kind="student"``) the
student. ``huggingface_hub`` (installed with open_clip) is imported only when a function needs it.
"""
from .card import CardError, CardInfo, base_model_of, render_card
from .download import (CARD_FILE, DEFAULT_FILES, EVAL_FILE, HUB_PREFIX, PROMPTS_FILE, STUDENT_FILE, STUDENT_FORMAT,
                       TIMEOUT_S, HubError, download, download_pair, hub_offline, hub_reachable, is_hub_ref,
                       load_prompts_from_hub, parse_hub_ref, resolve_checkpoint, sidecar_name)
from .push import PushResult, checkpoint_kind, push, stage

__all__ = ["CardError", "CardInfo", "base_model_of", "render_card", "CARD_FILE", "DEFAULT_FILES", "EVAL_FILE",
           "HUB_PREFIX", "PROMPTS_FILE", "STUDENT_FILE", "STUDENT_FORMAT", "TIMEOUT_S", "HubError", "download",
           "download_pair", "hub_offline", "hub_reachable", "is_hub_ref", "load_prompts_from_hub", "parse_hub_ref",
           "resolve_checkpoint", "sidecar_name", "PushResult", "checkpoint_kind", "push", "stage"]
