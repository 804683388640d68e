"""The Gradio demo through its public API (``gradio_client``) on a free local port, plus the pieces behind it.

Models are tiny random-weight CLIPs (no downloads); ``HF_HUB_OFFLINE=1`` keeps the Hub out (conftest).
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import mvpseg  # noqa: E402
from demo import DemoConfig, build_demo, load_models, render  # noqa: E402
from demo.models import load_student  # noqa: E402
from demo.plots import embedding_groups, gpr_frame, tsne_points  # noqa: E402
from demo.sources import DISPLAY_MAX_SIDE, parse_hub_ref, DemoInputError  # noqa: E402
from demo.testing import free_port, save_random_prompts, serve, small_models, wait_until_serving  # noqa: E402
from mvpseg import visualize  # noqa: E402
from mvpseg.testing import tiny_clip, tiny_config_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "assets" / "examples" / "toy_test_294.png"
VOCAB = "background, red cat, brick, water"
SETS = ["learned", "maskclip-85", "parts"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(client, demo) for one server with a learned prompt set and a student, shared by this module."""
    models = small_models(tmp_path_factory.mktemp("demo_models"), student=True)
    demo = build_demo(models)
    with serve(demo) as url:
        yield Client(url, verbose=False), demo


def segment(client: Client, image=EXAMPLE, vocabulary: str = VOCAB, sets=SETS, files=(), hub: str = ""):
    img = handle_file(str(image)) if image is not None else None
    return client.predict(img, vocabulary, list(sets), [handle_file(str(f)) for f in files], hub,
                          api_name="/segment")


def rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------ endpoints
def test_every_public_endpoint_is_listed(app):
    client, _ = app
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/segment", "/learn", "/check_upload", "/check_hub", "/info"}


def test_info_reports_models_prompt_sets_and_student(app):
    info = app[0].predict(api_name="/info")
    names = [s["name"] for s in info["prompt_sets"]]
    assert names == ["session", "learned", "uploaded", "hub", "maskclip-85", "parts", "a-photo-of"]
    assert info["mode"] == "random" and "tiny" in info["clip"]
    assert info["student"]["configured"] is True
    assert info["limits"]["max_classes"] == 30


def test_segment_renders_every_panel_from_the_prediction(app):
    client, demo = app
    overlay, summary, compare, student_md, views, gpr, tsne, timings, labels_png, record = segment(client)
    pred = demo.service.predictor  # the request left its image cached: recompute the expected outputs
    image = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    classes = mvpseg.parse_vocabulary(VOCAB)
    colors = visualize.palette(len(classes))
    expected = {name: pred.predict(VOCAB, name) for name in SETS}

    # 1. the main overlay is the learned set's label map in the shared palette, with a legend below
    main = rgb(overlay)
    want = render.segmentation_panel(image, expected["learned"].label_map, classes, colors)
    np.testing.assert_array_equal(main, want)
    k = render.display_scale(*image.shape[:2])
    region = main[: image.shape[0] * k: k, : image.shape[1] * k: k]
    np.testing.assert_array_equal(region, visualize.overlay(image, expected["learned"].label_map, colors))
    assert "Learned · learned" in summary
    # 5./6. every prompt set and the student side by side (2×2 for four panels), same colours
    student = demo.service.models.student.predictor.predict(VOCAB)  # the student has the image cached too
    labels = ["Learned · learned", "Handcrafted · 85 templates (MaskCLIP baseline)",
              "Handcrafted · part-based views (head / leg / tail)", "MVP-SEG+ student (distilled)"]
    maps = [expected[name].label_map for name in SETS] + [student.label_map]
    panels = [(render.segmentation_panel(image, m, classes, colors), t) for m, t in zip(maps, labels)]
    np.testing.assert_array_equal(rgb(compare), render.side_by_side(panels, per_row=2))
    assert "MVP-SEG+ student from" in student_md
    # 2. per-prompt view grids for the multi-view sets only (learned, parts), stacked
    grids = [render.view_grid(image, expected[name], colors) for name in ("learned", "parts")]
    assert all(set(shown) == set(classes) for _, shown in grids)
    captions = [f"{labels[0]}: rows = classes, columns = prompts", f"{labels[2]}: rows = classes, columns = prompts"]
    np.testing.assert_array_equal(rgb(views), render.stacked([(g, c) for (g, _), c in zip(grids, captions)]))
    # 3. the bar chart's values are the GPR scores, coloured like the overlay
    data = gpr["value"]["data"]
    assert [row[0] for row in data] == list(classes)
    np.testing.assert_allclose([row[1] for row in data], expected["learned"].gpr_scores, atol=1e-4)
    assert gpr["color_map"] == dict(visualize.legend_entries(classes, colors))
    # 4. the t-SNE plot (matplotlib, rendered once and cached) shows every class colour
    plot = rgb(tsne)
    assert plot.shape[0] > 300 and plot.shape[1] > 500
    for c in range(len(classes)):
        assert (np.abs(plot.astype(int) - colors[c]).max(axis=-1) <= 2).sum() > 50, classes[c]
    # 8. the downloads behind the main result: its label map (class ids) and a JSON of classes, shares, GPR
    np.testing.assert_array_equal(np.asarray(Image.open(labels_png)), expected["learned"].label_map)
    data_json = json.loads(Path(record).read_text())
    assert data_json["classes"] == list(classes) and data_json["label_map"] == "labels.png"
    shares = render.class_shares(expected["learned"].label_map, len(classes))
    assert data_json["pixel_share"] == {c: round(float(v), 4) for c, v in zip(classes, shares)}
    np.testing.assert_allclose([data_json["gpr_scores"][c] for c in classes], expected["learned"].gpr_scores,
                               atol=1e-4)
    assert list(data_json["prompt_sets"]) == SETS and data_json["settings"]["prompt_sets"] == SETS
    assert data_json["prompt_sets"]["parts"]["gpr_scores"] is None  # the part-based views have no global prompt
    assert abs(sum(data_json["student_pixel_share"].values()) - 1) < 1e-3
    # 7. time per stage, ending with the total
    stages = [row[0] for row in timings["data"]]
    assert stages[0] == "check + decode image" and stages[-1] == "total"
    assert "image features (CLIP image tower)" in stages and "MVP-SEG+ student" in stages
    assert all(row[1] >= 0 for row in timings["data"])


def test_caches_avoid_recomputation(app, tmp_path):
    client, demo = app
    stats = demo.service.predictor.stats
    student = demo.service.models.student.predictor.stats
    other = tmp_path / "other.png"
    Image.fromarray(np.asarray(Image.open(EXAMPLE).convert("RGB"))[::-1].copy()).save(other)

    def counts():
        return stats["image_encodes"], stats["text_encodes"], student["image_encodes"]

    segment(client, other, "sky, tree", ["learned"])
    img0, txt0, stu0 = counts()
    segment(client, other, "sky, tree, road", ["learned"])  # vocabulary only: no image encode
    assert counts() == (img0, txt0 + 1, stu0)
    segment(client, other, "sky, tree, road", ["learned", "parts"])  # prompt sets only: parts text, no image
    assert counts() == (img0, txt0 + 2, stu0)
    timings = segment(client, other, "sky, tree", ["learned"])[7]  # seen before: nothing recomputed
    assert counts() == (img0, txt0 + 2, stu0)
    notes = {row[0]: row[2] for row in timings["data"]}
    assert notes["image features (CLIP image tower)"].startswith("cached")
    assert notes["text embeddings · Learned · learned"].startswith("cached")
    assert notes["t-SNE of prompt embeddings"] == "cached"
    segment(client, EXAMPLE, "sky, tree", ["learned"])  # a new image: image tower only
    assert counts() == (img0 + 1, txt0 + 2, stu0 + 1)


def _png_with_size(path: Path, width: int, height: int) -> Path:
    """A valid tiny PNG whose header claims width×height (nothing big is ever written or decoded)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _text_file(path: Path) -> Path:
    path.write_text("this is not an image")
    return path


def _foreign_checkpoint(folder: Path) -> list[Path]:
    """Prompts learned for another CLIP (a different random tiny model: other text-tower weights)."""
    st = save_random_prompts(folder / "foreign.safetensors", tiny_clip(seed=1))
    return [st, st.with_suffix(".json")]


BAD_INPUTS = {
    "not an image": (lambda d: {"image": _text_file(d / "notes.png")}, "not an image that can be read"),
    "corrupt file": (lambda d: {"image": _truncated_png(d / "cut.png")}, "corrupt or truncated"),
    "huge image": (lambda d: {"image": _png_with_size(d / "huge.png", 9000, 9000)}, "limit is 40 MP"),
    "decompression bomb": (lambda d: {"image": _png_with_size(d / "bomb.png", 30000, 30000)}, "far too large"),
    "no image": (lambda d: {"image": None}, "No image"),
    "empty vocabulary": (lambda d: {"vocabulary": " , ;\n"}, "the vocabulary is empty"),
    "too many classes": (lambda d: {"vocabulary": ", ".join(f"class {i}" for i in range(31))},
                         "31 classes is too many (limit 30)"),
    "over-long name": (lambda d: {"vocabulary": "cat, " + "x" * 61}, "61 characters (limit 60)"),
    "duplicate name": (lambda d: {"vocabulary": "cat, dog, Cat"}, "'Cat' appears twice"),
    "no prompt set": (lambda d: {"sets": []}, "Choose at least one prompt set"),
    "uploaded set without upload": (lambda d: {"sets": ["uploaded"]}, "is selected but"),
    "checkpoint for another CLIP": (lambda d: {"sets": ["uploaded"], "files": _foreign_checkpoint(d)},
                                    "learned for another CLIP"),
    "checkpoint without metadata": (lambda d: {"sets": ["uploaded"], "files": _foreign_checkpoint(d)[:1]},
                                    "Upload exactly two files"),
    "hub offline": (lambda d: {"sets": ["hub"], "hub": "hf-hub:someone/prompts"}, "not reachable"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_answered_with_its_message(app, tmp_path, case):
    client, _ = app
    make, message = BAD_INPUTS[case]
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        segment(client, **make(tmp_path))
    shown = str(err.value)
    assert "/tmp" not in shown and str(tmp_path) not in shown and "Traceback" not in shown  # no server paths


def test_server_keeps_serving_after_errors_and_oversized_uploads(app, tmp_path):
    client, _ = app
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (26 * 1024 * 1024))  # over max_file_size (25 MB): refused at upload
    with pytest.raises(Exception):
        segment(client, big)
    for make, _ in list(BAD_INPUTS.values())[:3]:
        with pytest.raises(AppError):
            segment(client, **make(tmp_path))
    overlay, summary, *_ = segment(client)
    assert Path(overlay).is_file() and "Learned · learned" in summary


def test_large_images_are_downscaled_with_a_note(app, tmp_path):
    big = tmp_path / "large.jpg"
    Image.fromarray(np.full((1500, 2400, 3), 90, np.uint8)).save(big)
    overlay, summary, *_ = segment(app[0], big, "sky, sea", ["learned"])
    assert "downscaled from 2400×1500 to 1024×640" in summary
    assert rgb(overlay).shape[1] == DISPLAY_MAX_SIDE


def test_uploaded_checkpoint_is_checked_and_used(app, tmp_path):
    client, demo = app
    st = save_random_prompts(tmp_path / "mine.safetensors", demo.service.models.clip, seed=3, n_seg=2)
    files = [handle_file(str(st)), handle_file(str(st.with_suffix(".json")))]
    status, selected = client.predict(files, ["parts"], api_name="/check_upload")
    assert "fits" in status and "2 views + global prompt" in status
    assert selected == ["parts", "uploaded"]
    _, summary, *_ = segment(client, sets=["uploaded", "parts"], files=[st, st.with_suffix(".json")])
    assert summary.startswith("**Learned · your uploaded checkpoint**")
    assert demo.service.predictor.prompt_set("uploaded").n_seg == 2
    with pytest.raises(AppError, match="learned for another CLIP"):
        client.predict([handle_file(str(p)) for p in _foreign_checkpoint(tmp_path)], [], api_name="/check_upload")


def test_hub_option_fails_plainly_offline(app):
    client, _ = app
    with pytest.raises(AppError, match="not reachable from this machine"):
        client.predict("hf-hub:someone/prompts", [], api_name="/check_hub")
    with pytest.raises(AppError, match="not a Hub reference"):
        client.predict("just-a-name", [], api_name="/check_hub")
    status, selected = client.predict("", ["parts"], api_name="/check_hub")
    assert status == "" and selected == ["parts"]


# ------------------------------------------------------------------------------------------ pieces
def test_legend_and_overlay_show_each_class_colour():
    image = np.full((40, 60, 3), 128, np.uint8)
    labels = np.zeros((40, 60), np.int32)
    labels[:, 30:] = 2  # classes 0 and 2 present, class 1 absent
    colors = visualize.palette(3)
    panel = render.segmentation_panel(image, labels, ["sky", "cat", "grass"], colors, min_side=120)
    assert panel.shape[1] == 120  # 60 px enlarged 2× (nearest: labels stay solid blocks)
    blend = lambda c: np.round(0.45 * 128 + 0.55 * colors[c].astype(float)).astype(np.uint8)  # noqa: E731
    np.testing.assert_array_equal(panel[10, 10], blend(0))
    np.testing.assert_array_equal(panel[10, 100], blend(2))
    legend = panel[80:]
    for c in range(3):  # every class has its swatch in the legend, present or not
        assert (legend == colors[c]).all(axis=-1).sum() >= 100


def test_tsne_is_sensible_for_small_vocabularies(tiny):
    pred = mvpseg.build_predictor(tiny, short_side=64)
    for vocab, method in [(("cat",), "PCA"), (("cat", "dog"), "t-SNE"), (("a", "b", "c", "d", "e"), "t-SNE")]:
        groups = embedding_groups([("parts", pred.text_features(vocab, "parts"))])
        pts, text = tsne_points(groups)
        assert pts.shape == (3 * len(vocab), 2) and np.isfinite(pts).all() and text.startswith(method)
        if method == "t-SNE":
            perplexity = float(text.rsplit(" ", 1)[1].rstrip(")"))
            assert perplexity < len(pts)


def test_gpr_frame_and_hub_refs():
    frame = gpr_frame(("a", "b"), np.array([0.25, 0.9]))
    assert frame.values.tolist() == [["a", 0.25], ["b", 0.9]]
    assert gpr_frame(("a",), None).empty
    assert parse_hub_ref("hf-hub:org/repo") == ("org/repo", "prompts.safetensors")
    assert parse_hub_ref("org/repo/sub/p.safetensors") == ("org/repo", "sub/p.safetensors")
    for bad in ("org", "hf-hub:org/repo/../x.safetensors", "org/repo/weights.bin"):
        with pytest.raises(DemoInputError):
            parse_hub_ref(bad)


def test_gpr_chart_says_why_scores_stay_at_one(tmp_path):
    # prompts learned with Eq. 7 as printed (the default L_cls where the background is labelled) keep every g_c ≈ 1:
    # the page says why
    from demo.service import SegmentService
    from demo.sources import prompts_from_upload

    service = SegmentService(small_models(tmp_path / "m", short_side=64))
    clip = service.predictor.clip
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for mode, noted in (("paper", True), ("bce", False)):
        torch.manual_seed(0)
        prompts = mvpseg.LearnedPrompts(clip.text_width, n_seg=3, n_ctx=8)
        path = mvpseg.save_prompts(tmp_path / f"{mode}.safetensors", prompts, clip,
                                   extra={"train_config": {"cls_mode": mode}})
        upload = prompts_from_upload([str(path), str(path.with_suffix(".json"))], clip)
        run = service.segment(image, "cat, dog", ["uploaded", "parts"], uploaded=upload)
        assert run.gpr_result.name == "uploaded"
        notes = [n for n in run.notes if n.startswith("GPR chart: 'Learned · your uploaded checkpoint' was learned "
                                                      "with L_cls as Eq. 7 prints it")]
        assert len(notes) == int(noted), (mode, run.notes)
    shipped = json.loads((REPO / "assets" / "prompts" / "toyworld-mvpseg.json").read_text())
    # the demo's toy prompts use calibrated GPR (issue #28), so its chart shows GPR at work and needs no note
    assert shipped["extra"]["train_config"]["cls_mode"] == "bce" and shipped["extra"]["train_config"]["gpr_bias"]


def test_student_slot_states(tiny, tmp_path):
    assert "not configured" in load_student(None, tiny, tiny.device, 64).status
    assert "does not exist" in load_student(str(tmp_path / "nope.safetensors"), tiny, tiny.device, 64).status


def test_shipped_students_are_offered_only_with_their_clip(tiny, tmp_path):
    """discover_student: a student under assets/ distilled against this CLIP's text tower is found (broken
    sidecars and prompt checkpoints are skipped); with another CLIP nothing is offered."""
    from demo.models import discover_student

    torch.manual_seed(0)
    net = mvpseg.StudentNet(mvpseg.StudentConfig("resnet-tiny", "deeplabv2", tiny.embed_dim))
    (tmp_path / "students").mkdir()
    (tmp_path / "students" / "a-broken.json").write_text("{not json")
    (tmp_path / "students" / "a-broken.safetensors").write_bytes(b"")
    save_random_prompts(tmp_path / "prompts" / "p.safetensors", tiny)
    path = mvpseg.save_student(tmp_path / "students" / "b.safetensors", net, mvpseg.TemplatePrompts.single(),
                               tiny)
    assert discover_student(tiny, tmp_path) == str(path)
    assert discover_student(tiny_clip(seed=1), tmp_path) is None
    assert discover_student(tiny, tmp_path / "nowhere") is None


def test_missing_weights_fall_back_with_instructions(tmp_path):
    config = DemoConfig(clip="mvpseg-tiny", pretrained="openai", model_config=str(tiny_config_file(tmp_path)),
                        discover=False, checkpoints=(("mine", str(tmp_path / "missing.safetensors")),))
    missing_toy = mvpseg.ClipSpec("toyclip", str(tmp_path / "no.safetensors"), None, str(tmp_path / "no.json"))
    models = load_models(config, toy_spec=missing_toy)
    assert models.mode == "random" and models.clip.spec.pretrained is None
    text = "\n".join(models.notices)
    assert "The CLIP weights mvpseg-tiny (openai) are missing" in text and "random weights" in text
    assert "Provide them in one of these ways" in text and "missing.safetensors" in text


@pytest.mark.skipif(not Path(mvpseg.TOY_CLIP_SPEC.pretrained).is_file(), reason="toy model not built yet")
def test_missing_weights_fall_back_to_the_toy_model(tmp_path):
    models = load_models(DemoConfig(clip="RN50", pretrained="openai", discover=False))
    assert models.mode == "toy" and models.predictor.short_side == 256
    assert "RN50 (openai) are missing" in models.notices[0] and "toy-world model" in models.notices[0]


def test_app_py_starts_offline_and_serves(tmp_path):
    """``python app.py`` itself: argument parsing, model loading, launch; answers /info and then stops."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "app.py"), "--clip", "mvpseg-tiny", "--model-config",
           str(tiny_config_file(tmp_path)), "--pretrained", "none", "--no-discover", "--device", "cpu",
           "--port", str(port), "--short-side", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", timeout=90)
        info = Client(f"http://127.0.0.1:{port}", verbose=False).predict(api_name="/info")
        assert info["mode"] == "random" and info["work_short_side"] == 64
        assert "random weights" in info["notices"][0]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out


def test_paths_in_messages_are_cut_to_file_names():
    from demo.widgets import redact_paths

    assert redact_paths("image /tmp/gradio/ab12/cut.png is truncated") == "image cut.png is truncated"
    assert redact_paths("(/root/.cache/mvpseg/x.json)") == "(x.json)"
    for kept in ("hf-hub:org/repo is not reachable", "see https://example.org/a/b", "3/4 of the pixels"):
        assert redact_paths(kept) == kept


def test_class_names_are_shown_as_plain_text_and_the_file_cache_is_bounded(app):
    from markdown_it import MarkdownIt

    from demo.layout import DELETE_CACHE
    from demo.messages import plain

    client, demo = app
    hostile = ["![x](http://127.0.0.1:9/y.png)", "[click](http://127.0.0.1:9/)", "<img src=x onerror=alert(1)>",
               "**bold** _it_ `code` # h | t ~ s"]
    md = MarkdownIt("commonmark").enable("table").enable("strikethrough")
    for name in hostile:
        html = md.render(plain(name))
        assert "<img" not in html and "<a " not in html and "<strong>" not in html and "<code>" not in html
        assert html == f"<p>{html_text(name)}</p>\n"  # the same characters, nothing rendered
    # through the app: a hostile name in the vocabulary comes back escaped in the summary
    summary = segment(client, vocabulary="background, [cat](http://127.0.0.1:9/)", sets=["maskclip-85"])[1]
    assert "](http" not in summary and "&#91;cat&#93;" in summary
    assert demo.delete_cache == DELETE_CACHE and DELETE_CACHE[1] <= 24 * 3600


def html_text(text: str) -> str:
    import html

    return html.escape(text, quote=False)


def test_oversized_request_bodies_are_refused_on_every_route_and_the_server_keeps_serving(app):
    """A base64 data: URL in a JSON body bypassed max_file_size (only /upload checks it): every route now
    answers 413 above MAX_BODY_BYTES, with or without Content-Length, before buffering the body."""
    import http.client
    from urllib.parse import urlparse

    from demo.limits import MAX_BODY_BYTES

    client, _ = app
    url = urlparse(client.src)
    body = b'{"data": ["data:image/png;base64,' + b"A" * (MAX_BODY_BYTES + 1024) + b'"]}'
    answers = []
    for chunked in (False, True):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        try:
            if chunked:  # no Content-Length: cut off while streaming
                pieces = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))
                conn.request("POST", "/gradio_api/queue/join", body=pieces,
                             headers={"Content-Type": "application/json"}, encode_chunked=True)
            else:
                conn.request("POST", "/gradio_api/queue/join", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answers.append((resp.status, b"too large" in resp.read()))
        except (BrokenPipeError, ConnectionResetError):
            answers.append("closed")  # the server closed the socket before the client finished sending
        finally:
            conn.close()
    assert (413, True) in answers and all(a in ((413, True), "closed") for a in answers), answers
    overlay, summary, *_ = segment(client)  # still serving
    assert Path(overlay).is_file()
