"""The page (``gr.Blocks``), its public endpoints and the launch settings.

Endpoints (also usable with ``gradio_client``): ``/segment`` (the Segment button), ``/check_upload`` and
``/check_hub`` (validate learned prompts as soon as they are given), ``/info`` (what is loaded).
Every user mistake surfaces as a ``gr.Error`` with a sentence saying what to do; the server keeps serving.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr

from starlette.middleware import Middleware

import mvpseg
import mvpseg.batch

from . import plots, render
from .plots import GPR_CHART_LABEL
from .limits import MAX_BODY_BYTES, BodyLimit
from .models import DemoModels
from .outputs import OutputFiles, encode_png
from .learn_tab import build_learn_tab
from .service import HUB, SESSION, UPLOADED, SegmentService
from . import messages
from .sources import NO_IMAGE, DemoInputError, PromptSource, prompts_from_hub, prompts_from_upload
from .widgets import UnreadableImage, ValidatedImage, user_errors

log = logging.getLogger("mvpseg.demo")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
MAX_FILE_SIZE = "25mb"
QUEUE_MAX_SIZE = 16
HUB_CACHE_SIZE = 8
CSS = """
#notices { border-left: 4px solid #e8a33d; padding: 2px 12px; background: #fff8ec; }
#summary p { margin: 4px 0; }
/* composed pictures: natural size (never enlarged), shrunk only to fit the width */
#compare img, #views img { width: auto !important; height: auto !important; max-width: 100%; }
"""


def load_examples(mode: str) -> list[list[str]]:
    """[image path, vocabulary] pairs from ``assets/examples/examples.json``, those for ``mode`` first."""
    index = EXAMPLES_DIR / "examples.json"
    if not index.is_file():
        return []
    items = json.loads(index.read_text())
    items.sort(key=lambda e: e.get("model") != ("toy" if mode in ("toy", "random") else "pretrained"))
    return [[str(EXAMPLES_DIR / e["file"]), e["vocabulary"]] for e in items if (EXAMPLES_DIR / e["file"]).is_file()]


# ------------------------------------------------------------------------------------------ outputs
# Uploaded files and rendered outputs live in Gradio's cache folder: delete what is older than an hour, every
# 15 minutes (and on shutdown), so a long-running Space does not fill its disk (≈ 1 MB per request).
DELETE_CACHE = (900, 3600)


def build_demo(models: DemoModels, gpu_decorator: Callable[[Callable], Callable] | None = None,
               examples: Sequence[Sequence[str]] | None = None) -> gr.Blocks:
    """The page over ``models`` (``demo.load_models``). ``gpu_decorator`` (ZeroGPU's ``spaces.GPU``) wraps
    the function that touches the model."""
    service = SegmentService(models)
    clip = models.clip
    hub_cache: dict[str, PromptSource] = {}

    def hub_source(ref: str | None) -> PromptSource | None:
        if not ref or not ref.strip():
            return None
        key = ref.strip()
        if key not in hub_cache:
            source = prompts_from_hub(key, clip)  # only successes are kept, at most HUB_CACHE_SIZE of them
            while len(hub_cache) >= HUB_CACHE_SIZE:
                hub_cache.pop(next(iter(hub_cache)))
            hub_cache[key] = source
        return hub_cache[key]

    def upload_source(files: Sequence[str] | None) -> PromptSource | None:
        return prompts_from_upload(files, clip) if files else None

    @user_errors
    def segment(image: str | None, vocabulary: str, prompt_sets: list[str], prompt_files: list[str] | None,
                hub_repo: str | None, dense_mode: str | None = None, sliding: bool | None = None,
                session: PromptSource | None = None, progress: gr.Progress = gr.Progress()) -> tuple:
        t0 = time.perf_counter()
        if isinstance(image, UnreadableImage):
            raise gr.Error(str(image))
        names = service.ordered(prompt_sets)
        uploaded = upload_source(prompt_files) if UPLOADED in names else None
        hub = hub_source(hub_repo) if HUB in names else None
        run = service.segment(image, vocabulary, names, uploaded, hub, session if SESSION in names else None,
                              progress=lambda f, d: progress(f, desc=d), dense_mode=dense_mode, sliding=sliding)
        stages: dict[str, tuple[float, str]] = {}

        t = time.perf_counter()
        panels = [(render.segmentation_panel(run.image.rgb, r.prediction.label_map, run.classes, run.colors),
                   r.label) for r in run.results]
        if run.student_map is not None:
            panels.append((render.segmentation_panel(run.image.rgb, run.student_map, run.classes, run.colors),
                           "MVP-SEG+ student (distilled)"))
        main = panels[0][0]
        # One composed picture rather than a gallery: the page shows every panel whole, at one scale.
        compare = render.side_by_side(panels, per_row=2 if len(panels) == 4 else 3)
        stages["render overlays"] = (time.perf_counter() - t, f"{len(panels)} panels")

        t = time.perf_counter()
        grids = []
        for r in run.results:
            if r.multi_view:
                grid, shown = render.view_grid(run.image.rgb, r.prediction, run.colors)
                more = "" if len(shown) == len(run.classes) else f" (largest {len(shown)} of {len(run.classes)})"
                grids.append((grid, f"{r.label}: rows = classes{more}, columns = prompts"))
        views = render.stacked(grids) if grids else None
        stages["per-prompt view masks"] = (time.perf_counter() - t, f"{len(grids)} grids")

        g = run.gpr_result
        gpr = gr.BarPlot(value=plots.gpr_frame(run.classes, None if g is None else g.prediction.gpr_scores),
                         color_map=dict(mvpseg.visualize.legend_entries(run.classes, run.colors)),
                         sort=list(run.classes),  # vocabulary order, as in the legend
                         title=f"GPR class scores · {g.label}" if g else
                         "No GPR: none of the selected prompt sets has a global prompt")

        t = time.perf_counter()
        key = (tuple((r.name, service.slot_key(r.name)) for r in run.results), run.classes)
        groups = plots.embedding_groups([(r.name, r.text) for r in run.results])
        # cached as PNG bytes: an unchanged plot is neither drawn nor encoded again
        tsne_png, hit = service.cached(key, lambda: encode_png(plots.figure_to_rgb(
            plots.tsne_figure(groups, run.classes, run.colors))))
        stages["t-SNE of prompt embeddings"] = (time.perf_counter() - t, "cached" if hit else f"{len(groups)} prompts")

        student = f"**MVP-SEG+ student:** {models.student.status}"
        if views is None:
            student += ("\n\n_Per-prompt view masks: tick a multi-view prompt set (learned or part-based) to see "
                        "what each prompt attends to._")
        t = time.perf_counter()
        # paths, not arrays: Gradio would rewrite a shared content-addressed file per request (demo/outputs.py)
        main_f, compare_f = files.png(main, "segmentation.png"), files.png(compare, "prompt_sets.png")
        views_f, tsne_f = files.png(views, "view_masks.png"), files.put(tsne_png, "tsne.png")
        labels_f = files.png(mvpseg.batch.label_map_array(run.primary.prediction), "labels.png")
        record_f = files.json(run.record("labels.png"), "segmentation.json")
        stages["encode pictures"] = (time.perf_counter() - t, "PNG, label map, JSON")
        total = time.perf_counter() - t0
        return (main_f, messages.summary(run, total), compare_f, student, views_f, gpr, tsne_f,
                messages.timings(run, stages, total), labels_f, record_f)

    def check_inputs(image: str | None, vocabulary: str, prompt_sets: list[str], prompt_files: list[str] | None,
                     hub_repo: str | None, dense_mode: str | None = None, sliding: bool | None = None,
                     session: PromptSource | None = None) -> list[dict]:
        """The page's quick checks before a request is queued (Gradio validator): a missing image, an unusable
        vocabulary or no prompt set is shown once, at its input, and the output panels stay as they were
        (a failed request would paint an "Error" badge on all of them). The API's /segment has no validator:
        the handler raises the same messages."""
        try:
            mvpseg.parse_vocabulary(vocabulary or "", max_classes=models.max_classes)
            vocab_error = ""
        except mvpseg.VocabularyError as e:
            vocab_error = str(e)
        try:
            service.ordered(prompt_sets)
            sets_error = ""
        except DemoInputError as e:
            sets_error = str(e)
        image_error = str(image) if isinstance(image, UnreadableImage) else NO_IMAGE if image is None else ""
        return [gr.validate(not image_error, image_error), gr.validate(not vocab_error, vocab_error),
                gr.validate(not sets_error, sets_error), *(gr.validate(True, "") for _ in range(5))]

    @user_errors
    def check_upload(prompt_files: list[str] | None, prompt_sets: list[str]) -> tuple[str, list[str]]:
        selected = [s for s in (prompt_sets or []) if s != UPLOADED]
        if not prompt_files:
            return "", selected
        src = prompts_from_upload(prompt_files, clip)
        return (f"✅ **{src.origin}** fits {models.clip_description}: {src.description}. "
                "It is ticked above as 'Learned · your uploaded checkpoint'.", selected + [UPLOADED])

    @user_errors
    def check_hub(hub_repo: str, prompt_sets: list[str]) -> tuple[str, list[str]]:
        selected = [s for s in (prompt_sets or []) if s != HUB]
        src = hub_source(hub_repo)
        if src is None:
            return "", selected
        return (f"✅ **{src.origin}** fits {models.clip_description}: {src.description}. "
                "It is ticked above as 'Learned · Hugging Face Hub repo'.", selected + [HUB])

    run_segment = gpu_decorator(segment) if gpu_decorator else segment
    with gr.Blocks(title="MVP-SEG · open-vocabulary segmentation", analytics_enabled=False,
                 delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# MVP-SEG · open-vocabulary segmentation with multi-view prompts\n"
                    "Upload an image (or click an example), list the classes to look for, pick prompt sets and "
                    "click **Segment**. Frozen CLIP + learned multi-view prompts + global prompt refining (GPR), "
                    "after *MVP-SEG: Multi-View Prompt Learning for Open-Vocabulary Semantic Segmentation*.")
        learned = "; ".join(f"{n} ({d})" for n, d in models.learned_sets.items()) or "none shipped"
        gr.Markdown(f"**Model:** {models.clip_description} on `{models.device}` · **learned prompts:** {learned} · "
                    f"**MVP-SEG+ student:** {'configured' if models.student.configured else 'not configured'}",
                    elem_id="model-status")
        if models.notices:  # the first paragraph of each notice is shown, the how-to below it on demand
            heads = [n.split("\n\n", 1) for n in models.notices]
            gr.Markdown("\n\n".join(h[0] for h in heads), elem_id="notices")
            details = "\n\n".join(h[1] for h in heads if len(h) > 1)
            if details:
                with gr.Accordion("Why, and how to provide the weights", open=False, elem_id="notice-details"):
                    gr.Markdown(details)
        session_state = gr.State(None)  # prompts learned in the Learn tab, for this browser session only
        with gr.Tabs():
            with gr.Tab("Segment", id="segment-tab", elem_id="segment-tab"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=320):
                        image = ValidatedImage(label="Image", type="filepath", image_mode=None,
                                               sources=["upload", "clipboard"],
                                               height=340, elem_id="image")
                        vocabulary = gr.Textbox(label=f"Vocabulary (comma-separated, up to {models.max_classes} "
                                                      "classes)",
                                                placeholder=("background, red cat, blue bird, grass, water"
                                                             if models.mode == "toy" else "cat, dog, grass, sky"),
                                                lines=2, max_length=4000,
                                                elem_id="vocabulary")
                        prompt_sets = gr.CheckboxGroup(choices=service.choices(), value=service.default_selection(),
                                                       label="Prompt sets (the topmost ticked one is the main result)",
                                                       elem_id="prompt-sets")
                        # Only the modes this tower supports; a ResNet has just maskclip: the selector is hidden
                        # (it stays an input of /segment, with its default, so that API calls keep one signature).
                        modes = list(models.dense_choices)
                        default_mode = service.dense_settings(None, None).mode if modes else None
                        window = "{}/{}".format(*models.window) if models.window else ""
                        with gr.Row():
                            dense_mode = gr.Dropdown(choices=modes, value=default_mode, label="Dense features",
                                                     info="how CLIP's last block yields per-patch features",
                                                     interactive=len(modes) > 1, visible=len(modes) > 1,
                                                     elem_id="dense-mode")
                            sliding = gr.Checkbox(value=models.sliding_default, label=f"Sliding window {window}",
                                                  info="average overlapping windows at CLIP's own resolution (slower)",
                                                  interactive=bool(modes), elem_id="sliding")
                        with gr.Accordion("Your own learned prompts", open=False):
                            prompt_files = gr.File(label="Checkpoint: NAME.safetensors + NAME.json",
                                                   file_count="multiple",
                                                   file_types=[".safetensors", ".json"], elem_id="prompt-files")
                            hub_repo = gr.Textbox(label="…or a Hub repo (press Enter)", placeholder="hf-hub:ORG/REPO",
                                                  max_lines=1, max_length=300, elem_id="hub-repo")
                            prompt_status = gr.Markdown(elem_id="prompt-status")
                        button = gr.Button("Segment", variant="primary", elem_id="segment")
                        example_rows = load_examples(models.mode) if examples is None else [list(e) for e in examples]
                        if example_rows:
                            gr.Examples(example_rows, inputs=[image, vocabulary],
                                    label="Examples (click, then Segment)")
                    with gr.Column(scale=6, min_width=420):
                        overlay = gr.Image(label="Segmentation (fused masks refined by GPR)", format="png",
                                           interactive=False, elem_id="overlay")
                        summary = gr.Markdown(elem_id="summary")
                gr.Markdown("### Handcrafted vs learned prompts — same image, same vocabulary, same colours")
                # height="auto": the whole grid shows (no inner scrolling); each item is a square, contained.
                compare = gr.Image(label="Prompt sets side by side", format="png", interactive=False, show_label=False,
                                   elem_id="compare")
                student_status = gr.Markdown(f"**MVP-SEG+ student:** {models.student.status}", elem_id="student-status")
                gr.Markdown("### What each prompt attends to, per class (heat: blue = low, red = high)")
                views = gr.Image(label="Per-prompt view masks", format="png", interactive=False, show_label=False,
                                 elem_id="views")
                with gr.Row(equal_height=False):
                    gpr = gr.BarPlot(x="class", y="GPR score", color="class", y_lim=[0, 1], sort=None,
                                     label=GPR_CHART_LABEL,
                                     elem_id="gpr")
                    tsne = gr.Image(label="Prompt text embeddings (t-SNE): colour = class, marker = prompt",
                                    format="png",
                                    show_label=False, interactive=False, elem_id="tsne")  # the title is in the figure
                with gr.Row():  # the data behind the main result, for a visitor who wants to reuse it
                    labels_file = gr.DownloadButton("Label map (PNG of class ids)", value=None,
                                                    elem_id="download-labels", size="sm")
                    record_file = gr.DownloadButton("Classes, pixel shares, GPR scores (JSON)", value=None,
                                                    elem_id="download-json", size="sm")
                with gr.Accordion("Time per stage", open=True):
                    timings = gr.Dataframe(headers=["stage", "seconds", "note"], interactive=False, elem_id="timings")

                # new inputs go at the END (with defaults): gradio_client calls written for the first five keep working
            with gr.Tab("Learn", id="learn-tab", elem_id="learn-tab"):
                build_learn_tab(models, service, session_state, prompt_sets, lambda: files)


        segment_inputs = [image, vocabulary, prompt_sets, prompt_files, hub_repo, dense_mode, sliding, session_state]
        segment_outputs = [overlay, summary, compare, student_status, views, gpr, tsne, timings, labels_file,
                           record_file]
        # The page's click runs the quick checks first (a validator: the message shows at its input and the
        # panels keep what they showed, instead of an "Error" badge on each). API callers get /segment, the same
        # handler without a validator, so a bad value still comes back as the handler's message (AppError):
        # Gradio answers a validator's failure, or any preprocessing error in its pass, at /queue/join.
        api_trigger = gr.Button(visible=False, elem_id="segment-api")
        api_trigger.click(run_segment, inputs=segment_inputs, outputs=segment_outputs, api_name="segment",
                          concurrency_limit=1, concurrency_id="model")
        button.click(run_segment, inputs=segment_inputs, outputs=segment_outputs, api_name="segment_page",
                     api_visibility="private", concurrency_limit=1, concurrency_id="model", validator=check_inputs)
        prompt_files.upload(check_upload, inputs=[prompt_files, prompt_sets], outputs=[prompt_status, prompt_sets],
                            api_name="check_upload")
        prompt_files.clear(check_upload, inputs=[prompt_files, prompt_sets], outputs=[prompt_status, prompt_sets],
                           api_visibility="private")
        hub_repo.submit(check_hub, inputs=[hub_repo, prompt_sets], outputs=[prompt_status, prompt_sets],
                        api_name="check_hub", concurrency_limit=2, concurrency_id="hub")

        def info() -> dict:
            """What is loaded: CLIP, prompt sets, student, limits, cache statistics."""
            return service.info()

        gr.api(info, api_name="info")
        files = OutputFiles(overlay.GRADIO_CACHE)  # the folder Gradio serves from without copying
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    demo.service = service  # for tests and benchmarks: the same object the endpoints use
    return demo


def launch_kwargs(host: str = "127.0.0.1", port: int | None = 7860) -> dict[str, Any]:
    """Safe launch settings: bounded uploads, no extra served paths, no telemetry, no SSR."""
    # every route, not only /upload: a base64 data: URL in a JSON body must not bypass max_file_size
    app_kwargs = {"middleware": [Middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)]}
    return dict(app_kwargs=app_kwargs, server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE,
                allowed_paths=None, show_error=False, enable_monitoring=False, ssr_mode=False, run_history=False,
                footer_links=["api", "gradio"], theme=gr.themes.Soft(primary_hue="indigo"), css=CSS)
