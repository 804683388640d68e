"""The Learn tab: a visitor labels a few images (class-id masks, or strokes painted in the class colours),
learns MVP-SEG prompts from them with the library's recipe under a time budget, watches the loss and the
validation mIoU, and gets a prompt set that the Segment tab offers at once for this browser session (and two
files to download: the checkpoint and its JSON, to upload later or push to the Hub).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd

from mvpseg import visualize
from mvpseg.learning import FewShotSettings

from . import learn
from .messages import plain
from .models import DemoModels
from .outputs import OutputFiles
from .service import SESSION, SegmentService
from .sources import prompts_from_upload
from .widgets import USER_ERRORS, redact_paths

log = logging.getLogger("mvpseg.demo")
N_CTX = 16  # context tokens of prompts learned here (the library's few-shot default; 32 in train_prompts)


def _hex(colors) -> list[str]:
    return ["#{:02x}{:02x}{:02x}".format(*map(int, c)) for c in colors]


def legend(names: tuple[str, ...]) -> str:
    """Which colour paints which class (the same palette as the segmentation overlays)."""
    if not names:
        return "_Type the class names to get one brush colour per class._"
    colors = _hex(visualize.palette(len(names)))
    return "Brush colours: " + " · ".join(f'<span style="color:{c}">■</span> {plain(n)} (id {i})'
                                          for i, (n, c) in enumerate(zip(names, colors)))


def curve_frame(history: list[dict]) -> pd.DataFrame:
    """Loss and validation mIoU per iteration, long format for gr.LinePlot (mIoU scaled to [0, 1])."""
    rows = [(h["iter"], h["loss"], "training loss") for h in history if h.get("loss") is not None]
    rows += [(h["iter"], h["val_miou"] / 100, "validation mIoU / 100") for h in history
             if h.get("val_miou") is not None]
    return pd.DataFrame(rows, columns=["iteration", "value", "curve"])


def _closing(updates):
    """Iterates ``updates`` and closes it however the loop ends: a cancel closes this page's generator at a
    yield, and the job's own generator must then stop its worker and free its slot at once, not at GC."""
    try:
        yield from updates
    finally:
        updates.close()


def build_learn_tab(models: DemoModels, service: SegmentService, session_state: gr.State,
                    prompt_sets: gr.CheckboxGroup, files: Callable[[], OutputFiles]) -> None:
    """Builds the tab inside the current ``gr.Blocks``; ``files()`` returns the page's OutputFiles."""
    clip = models.clip
    jobs = learn.Jobs(max_running=1, max_waiting=2)

    def names_of(text: str) -> tuple[str, ...]:
        return learn.class_names(text, clip, N_CTX, models.max_classes)

    def on_names(text: str):
        try:
            names = names_of(text)
        except USER_ERRORS as e:
            return gr.update(), f"⚠️ {plain(redact_paths(str(e)))}"
        return (gr.update(brush=gr.Brush(colors=_hex(visualize.palette(len(names))), color_mode="fixed")),
                legend(names))

    def add_painting(text: str, value: dict | None, painted: list):
        try:
            names = names_of(text)
            example = learn.example_from_editor(value, visualize.palette(len(names)))
        except USER_ERRORS as e:
            raise gr.Error(redact_paths(str(e))) from None
        if len(painted) >= learn.MAX_IMAGES:
            raise gr.Error(f"At most {learn.MAX_IMAGES} labelled images per job.")
        painted = painted + [example]
        share = learn.labelled_share(painted)
        return painted, f"{len(painted)} painted image(s), {share:.1%} of their pixels labelled."

    def learn_job(text: str, images, masks, painted: list, views: float, iterations: float, budget: float,
                  selected: list[str], request: gr.Request, progress: gr.Progress = gr.Progress()):
        session = getattr(request, "session_hash", None) or "anonymous"
        try:
            names = names_of(text)
            examples = (learn.examples_from_masks(images, masks, names) if images or masks else []) + list(painted)
            learn.check_count(len(examples))
            settings = FewShotSettings(n_seg=int(views), n_ctx=N_CTX, iterations=int(iterations),
                                       time_budget_s=float(budget))
            updates = learn.run_job(jobs, session, clip, examples, names, settings,
                                    short_side=service.predictor.short_side, dense=service.predictor.dense)
            for u in _closing(updates):
                if u.waiting:
                    yield "⏳ Waiting for another visitor's learning job to finish…", gr.skip(), gr.skip(), \
                        gr.skip(), gr.skip()
                    continue
                p = u.progress
                if u.result is None:
                    if p is not None:
                        frac = min(1.0, p.seconds / settings.time_budget_s)
                        progress(frac, desc=f"{p.phase} {p.step}/{p.total}")
                        status = (f"**{p.phase}** {p.step}/{p.total} · {p.seconds:.0f} s of {budget:.0f} s"
                                  + (f" · validation mIoU {p.val_miou:.1f}" if p.val_miou is not None else ""))
                    else:
                        status = "starting…"
                    yield status, curve_frame(u.history), gr.skip(), gr.skip(), gr.skip()
                    continue
                r = u.result
                with tempfile.TemporaryDirectory(prefix="mvpseg_learned_") as tmp:  # the cache keeps the files
                    st, js = learn.result_files(r, clip, names, Path(tmp), files().put,
                                                dense=service.predictor.dense)
                # checked and described as an upload is, then labelled as what it is
                source = replace(prompts_from_upload([st, js], clip), origin="prompts learned in this session")
                ended = {"done": "finished", "time": "stopped at the time budget",
                         "cancelled": "cancelled"}[r.stopped]
                score = (f"validation mIoU {r.val_miou:.1f} on {r.n_val} held-out image(s) (iteration "
                         f"{r.best_iteration}; the handcrafted '{settings.prior}' prompts: {r.prior_val_miou:.1f})"
                         if r.val_miou is not None else f"no held-out image (fewer than "
                         f"{settings.min_holdout_images} labelled images): the last iterate is kept")
                status = (f"✅ Learning {ended} after {r.seconds:.0f} s: {r.n_train} training image(s), {score}. "
                          f"The prompts are ticked in the Segment tab as '{service.label(SESSION)}'.")
                yield (status, curve_frame(u.history), [st, js], source,
                       gr.update(value=[SESSION] + [s for s in (selected or []) if s != SESSION]))
        except learn.JobRefused as e:
            raise gr.Error(str(e)) from None
        except USER_ERRORS + (ValueError,) as e:
            raise gr.Error(redact_paths(str(e))) from None
        except gr.Error:
            raise
        except Exception as e:
            log.exception("learning job failed")
            raise gr.Error(f"Learning failed on the server ({type(e).__name__}); it has been logged.") from e

    gr.Markdown("### Teach it: learn prompts from a few labelled images\n"
                "Give the class names, then either upload images with their class-id masks or paint a few "
                "strokes per class on an image (unpainted pixels are ignored). Only the text side learns, on "
                "image features computed once per image, with the same recipe as `training.train_prompts`.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            names_box = gr.Textbox(label=f"Class names (comma-separated, in id order; up to {models.max_classes})",
                                   placeholder="background, red cat, brick, water", elem_id="learn-names")
            with gr.Tab("Upload masks"):
                images_in = gr.File(label=f"Images (up to {learn.MAX_IMAGES})", file_count="multiple",
                                    file_types=["image"], elem_id="learn-images")
                masks_in = gr.File(label="Masks: PNG of class ids (0 = the first name; 255 = not labelled), "
                                         "paired by file name or order", file_count="multiple",
                                   file_types=[".png"], elem_id="learn-masks")
            with gr.Tab("Paint"):
                colours = gr.Markdown(legend(()), elem_id="learn-legend")
                canvas = gr.ImageEditor(type="numpy", label="Paint each class in its colour",
                                        brush=gr.Brush(colors=["#000000"], color_mode="fixed"),
                                        elem_id="learn-canvas")
                with gr.Row():
                    add = gr.Button("Add painted image", elem_id="learn-add")
                    clear = gr.Button("Clear painted images")
                painted_md = gr.Markdown("No painted image yet.", elem_id="learn-painted")
            with gr.Accordion("Settings", open=False):
                views = gr.Slider(1, 4, value=3, step=1, label="Segmentation views (k)")
                iterations = gr.Slider(10, learn.MAX_ITERATIONS, value=150, step=10, label="Iterations")
                budget = gr.Slider(20, learn.MAX_BUDGET_S, value=110, step=10, label="Time budget (s), hard")
            with gr.Row():
                start = gr.Button("Learn", variant="primary", elem_id="learn-start")
                cancel = gr.Button("Cancel", elem_id="learn-cancel")
        with gr.Column(scale=5):
            status = gr.Markdown(elem_id="learn-status")
            curve = gr.LinePlot(x="iteration", y="value", color="curve", label="Learning curves",
                                elem_id="learn-curve")
            result_files = gr.File(label="Learned prompts: .safetensors + .json (upload them later, or push them "
                                         "with `mvpseg push`)", file_count="multiple", interactive=False,
                                   elem_id="learn-files")
    painted = gr.State([])
    names_box.change(on_names, inputs=[names_box], outputs=[canvas, colours], queue=False,
                     api_visibility="private")
    add.click(add_painting, inputs=[names_box, canvas, painted], outputs=[painted, painted_md],
              api_visibility="private")
    clear.click(lambda: ([], "No painted image yet."), outputs=[painted, painted_md], api_visibility="private")
    job = start.click(learn_job, inputs=[names_box, images_in, masks_in, painted, views, iterations, budget,
                                         prompt_sets],
                      outputs=[status, curve, result_files, session_state, prompt_sets], api_name="learn",
                      concurrency_limit=jobs.max_running + jobs.max_waiting, concurrency_id="learn")
    cancel.click(None, cancels=[job], api_visibility="private")
