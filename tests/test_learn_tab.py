"""The demo's Learn tab (issue #25): labelled images from masks and painted strokes, the job runner (one per
session, a bounded queue, cancel, no leaks), and the whole flow through ``gradio_client``: learn, then segment
with the session's prompts."""
from __future__ import annotations

import gc
import resource
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mvpseg
from demo import learn
from demo.sources import DemoInputError
from mvpseg import visualize
from mvpseg.learning import FewShotSettings, LabelledImage

NAMES = ("background", "cat", "sky")


def _scene(size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    rgb = (rng.random((*size, 3)) * 255).astype(np.uint8)
    labels = np.zeros(size, np.uint8)
    labels[: size[0] // 2] = 2
    labels[10:20, 10:20] = 1
    return rgb, labels


def _write(folder: Path, name: str, rgb, labels, mask_mode: str = "L") -> tuple[str, str]:
    img, mask = folder / f"{name}.png", folder / f"{name}_mask.png"
    Image.fromarray(rgb).save(img)
    Image.fromarray(labels).convert(mask_mode).save(mask) if mask_mode != "L" else Image.fromarray(labels).save(mask)
    return str(img), str(mask)


def test_masks_pair_by_name_and_every_problem_names_its_file(tmp_path):
    a_img, a_mask = _write(tmp_path, "a", *_scene(seed=0))
    b_img, b_mask = _write(tmp_path, "b", *_scene(seed=1))
    out = learn.examples_from_masks([a_img, b_img], [b_mask, a_mask], NAMES)  # masks in the other order
    np.testing.assert_array_equal(out[0].rgb, np.asarray(Image.open(a_img)))
    np.testing.assert_array_equal(out[1].labels, np.asarray(Image.open(b_mask)))

    cases = {
        "2 images but 1 masks": ([a_img, b_img], [a_mask]),
        "No labelled image": ([], []),
    }
    for message, (imgs, masks) in cases.items():
        with pytest.raises(DemoInputError, match=message):
            learn.examples_from_masks(imgs, masks, NAMES)
    rgb, labels = _scene()
    small = tmp_path / "small_mask.png"
    Image.fromarray(labels[:20]).save(small)
    with pytest.raises(DemoInputError, match=r"a\.png is 48×40 but its mask small_mask\.png is 48×20"):
        learn.examples_from_masks([a_img], [str(small)], NAMES)
    with pytest.raises(DemoInputError, match=r"uses class ids \[2\] but only 2 class names"):
        learn.examples_from_masks([a_img], [a_mask], NAMES[:2])
    colour = tmp_path / "colour.png"
    Image.fromarray(np.stack([labels] * 3, -1)).save(colour)
    with pytest.raises(DemoInputError, match="is a RGB image: masks are class-id PNGs"):
        learn.examples_from_masks([a_img], [str(colour)], NAMES)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.full(labels.shape, 255, np.uint8)).save(empty)
    with pytest.raises(DemoInputError, match="No labelled pixel"):
        learn.examples_from_masks([a_img], [str(empty)], NAMES)
    junk = tmp_path / "junk.png"
    junk.write_text("not a png")
    with pytest.raises(DemoInputError, match="junk.png is not an image"):
        learn.examples_from_masks([a_img], [str(junk)], NAMES)
    with pytest.raises(DemoInputError, match="too many"):
        learn.examples_from_masks([a_img] * (learn.MAX_IMAGES + 1), [a_mask] * (learn.MAX_IMAGES + 1), NAMES)
    # a palette PNG: its indices are the ids
    pal = tmp_path / "p_mask.png"
    im = Image.fromarray(labels, mode="L").convert("P")
    im.save(pal)
    assert learn.examples_from_masks([a_img], [str(pal)], NAMES)[0].labels.max() == 2


def test_large_images_and_their_masks_are_downscaled_together(tmp_path):
    rgb, labels = _scene(size=(1000, 1600))
    img, mask = _write(tmp_path, "big", rgb, labels)
    ex = learn.examples_from_masks([img], [mask], NAMES)[0]
    assert max(ex.rgb.shape[:2]) == learn.MAX_SIDE and ex.rgb.shape[:2] == ex.labels.shape
    assert set(np.unique(ex.labels)) == {0, 1, 2}  # nearest: no blended ids


def test_painted_strokes_become_labels_and_unpainted_pixels_are_ignored():
    colors = visualize.palette(3)
    h, w = 30, 40
    background = np.full((h, w, 3), 128, np.uint8)
    layer = np.zeros((h, w, 4), np.uint8)
    layer[5, 5:15] = [*colors[1], 255]  # a stroke of class 1
    layer[20, 10:30] = [*np.clip(colors[2].astype(int) + 20, 0, 255), 255]  # class 2, antialiased shade
    layer[25, 0:5] = [*colors[0], 60]  # faint (alpha < 128): not painted
    layer[28, 0:5] = [1, 254, 128, 255]  # a colour far from every brush: ignored
    labels = learn.labels_from_painting(background, [layer], colors)
    expected = np.full((h, w), 255, np.uint8)
    expected[5, 5:15] = 1
    expected[20, 10:30] = 2
    np.testing.assert_array_equal(labels, expected)
    ex = learn.example_from_editor({"background": background, "layers": [layer], "composite": None}, colors)
    assert (ex.labels != 255).sum() == 30
    with pytest.raises(DemoInputError, match="No painted pixel"):
        learn.example_from_editor({"background": background, "layers": []}, colors)
    with pytest.raises(DemoInputError, match="upload an image"):
        learn.example_from_editor(None, colors)
    assert learn.labelled_share([ex]) == pytest.approx(30 / (h * w))


def test_class_names_respect_the_token_budget(tiny):
    assert learn.class_names("cat, sky", tiny, 16, 30) == ("cat", "sky")
    with pytest.raises(mvpseg.VocabularyError, match="tokens"):
        learn.class_names("cat, " + "名前" * 20, tiny, 16, 30)  # short in characters, long in tokens
    with pytest.raises(mvpseg.VocabularyError, match="too many"):
        learn.class_names(", ".join(f"c{i}" for i in range(5)), tiny, 16, 4)


def test_jobs_admit_one_per_session_and_a_bounded_queue():
    jobs = learn.Jobs(max_running=1, max_waiting=2)
    jobs.enter("a")
    with pytest.raises(learn.JobRefused, match="already running in this browser session"):
        jobs.enter("a")
    jobs.enter("b")
    with pytest.raises(learn.JobRefused, match="Too many learning jobs"):
        jobs.enter("c")
    assert jobs.wait_slot(0.01) and not jobs.wait_slot(0.01)  # one slot
    jobs.started()
    jobs.leave("a", had_slot=True, waited=False)
    jobs.leave("b", had_slot=False, waited=True)
    assert jobs.active == 0 and jobs.wait_slot(0.01)


def _examples(n=3):
    return [LabelledImage(*_scene(seed=i)) for i in range(n)]


def test_a_cancelled_job_stops_its_worker_frees_its_slot_and_leaks_nothing(tiny):
    """Closing the update stream (Gradio's cancel) stops the worker at its next step; the slot and the session
    are free again; repeated cancelled and finished jobs leave no thread behind and peak RSS bounded."""
    jobs = learn.Jobs()
    settings = FewShotSettings(n_seg=2, n_ctx=4, iterations=10_000, time_budget_s=120)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for round_ in range(4):
        updates = learn.run_job(jobs, "s1", tiny, _examples(), NAMES, settings, short_side=64, poll_s=0.05)
        for u in updates:
            if u.progress is not None and u.progress.phase == "learning" and u.progress.step >= 3:
                break
        updates.close()  # what a cancel does
        assert jobs.active == 0 and jobs.wait_slot(0.01)
        jobs._slots.release()
        done = list(learn.run_job(jobs, "s1", tiny, _examples(), NAMES,
                                  FewShotSettings(n_seg=2, n_ctx=4, iterations=5), short_side=64, poll_s=0.05))
        assert done[-1].result is not None and done[-1].result.stopped == "done"
    gc.collect()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("mvpseg-learn")]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 300


def test_a_failing_job_reports_its_error_and_frees_the_session(tiny):
    jobs = learn.Jobs()
    bad = [LabelledImage(np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 9, np.uint8))]
    with pytest.raises(ValueError, match="label ids"):
        list(learn.run_job(jobs, "s", tiny, bad, NAMES, FewShotSettings(), short_side=64, poll_s=0.05))
    assert jobs.active == 0 and jobs.wait_slot(0.01)


# ------------------------------------------------------------------------------------------ through the app
gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from gradio_client import Client

    from demo import build_demo
    from demo.testing import serve, small_models

    folder = tmp_path_factory.mktemp("learn_app")
    demo = build_demo(small_models(folder / "models", short_side=64))
    with serve(demo) as url:
        yield Client(url, verbose=False), folder


def test_learn_then_segment_with_the_session_prompts(app):
    from gradio_client import handle_file

    client, folder = app
    pairs = [_write(folder, f"s{i}", *_scene(seed=i)) for i in range(4)]
    status, curve, files, selected = client.predict(
        "background, cat, sky", [handle_file(i) for i, _ in pairs], [handle_file(m) for _, m in pairs], 2, 20, 60,
        ["maskclip-85"], api_name="/learn")
    assert status.startswith("✅ Learning finished") and "1 held-out image" in status
    assert sorted(Path(f).suffix for f in files) == [".json", ".safetensors"]
    assert selected["value"] == ["session", "maskclip-85"]
    rows = curve["data"]  # (iteration, value, curve): the loss every step, the validation every val_every steps
    assert {r[2] for r in rows} == {"training loss", "validation mIoU / 100"}
    assert [r[0] for r in rows if r[2] == "training loss"] == list(range(1, 21))
    assert all(0 <= r[1] <= 1 for r in rows if r[2] == "validation mIoU / 100")
    # the downloaded pair is a checkpoint for this CLIP (the app's tiny CLIP is tiny_clip(seed=0)), as uploads are
    from mvpseg.testing import tiny_clip

    pair = folder / "downloaded"
    pair.mkdir(exist_ok=True)
    for f in files:
        (pair / ("learned" + Path(f).suffix)).write_bytes(Path(f).read_bytes())
    loaded = mvpseg.load_prompts(pair / "learned.safetensors", tiny_clip(seed=0))
    assert loaded.n_seg == 2 and loaded.meta.training_classes == ("background", "cat", "sky")
    assert loaded.meta.extra["learned_in"] == "demo Learn tab"
    out = client.predict(handle_file(pairs[0][0]), "background, cat, sky", ["session", "parts"], [], "",
                         api_name="/segment")
    assert "Learned · in this browser session" in out[1]


@pytest.mark.parametrize("names, files, message", [
    ("background, cat", "sizes", "but its mask"),
    ("background", "normal", "uses class ids"),
    ("", "normal", "vocabulary is empty"),
    ("background, cat, sky", "none", "No labelled image"),
])
def test_learn_bad_inputs_get_one_clear_message(app, names, files, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, folder = app
    img, mask = _write(folder, "x", *_scene())
    if files == "sizes":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    imgs, masks = ([], []) if files == "none" else ([handle_file(img)], [handle_file(mask)])
    with pytest.raises(AppError, match=message):
        client.predict(names, imgs, masks, 2, 10, 30, [], api_name="/learn")
    assert client.predict(api_name="/info")["clip"]  # the server answers on
