"""The bad-input table (issue #18): hostile or unlucky inputs to the app, the ``mvpseg`` command line and the
training scripts. Every row asserts the message the user gets, the exit status (command lines), that no
traceback and no server path is shown, and — for the app — that the server keeps answering with bounded
memory afterwards.

The command-line rows call each script's ``main(argv)`` in this process and finish them as the interpreter
would (``_finish``: an uncaught exception goes through ``sys.excepthook``, which the scripts replace;
``SystemExit("text")`` prints the text and exits 1); ``test_real_processes_match_the_in_process_rows`` checks
that equivalence on real subprocesses, with and without ``--debug``.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
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

from demo import build_demo  # noqa: E402
from demo.testing import raw_queue_call, serve, small_models  # noqa: E402
from fixtures_data import make_folder, write_tiny_clip  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "assets" / "examples" / "toy_test_294.png"
SERVER_PATH = re.compile(r"(/tmp/|/work/|/root/|/home/|gradio_cached|mvpseg_prompts_)")


class _Evil:  # a pickle that would print if it were ever unpickled
    def __reduce__(self):
        return (print, ("unpickled!",))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ files
def png(w: int, h: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w×h and whose pixel data is one tiny zlib stream (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big"))
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gif_animated() -> bytes:
    frames = [Image.fromarray(np.full((48, 64, 3), c, np.uint8)) for c in (30, 200, 90)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png16_gray() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_cmyk() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def jpeg_rotated() -> bytes:
    img = Image.fromarray(np.zeros((40, 80, 3), np.uint8))
    exif = img.getexif()
    exif[274] = 6  # rotate 90° on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


IMAGE_FILES = {  # name: bytes
    "empty.png": b"",
    "text.png": b"this is not an image\n" * 20,
    "truncated.png": png(64, 48)[:200],
    "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="9"/></svg>',
    "bomb.png": png_header_only(30000, 30000),
    "sliver.png": png(2100, 20),
    "tiny.png": png(1, 1),
    "animated.gif": gif_animated(),
    "gray16.png": png16_gray(),
    "cmyk.jpg": jpeg_cmyk(),
    "rotated.jpg": jpeg_rotated(),
    "palette.png": png(50, 40, mode="P"),
}

TOKEN_HEAVY = "большая собака на траве рядом с красным домом у реки"  # 52 characters, 46 BPE tokens

# (id, image file or None, vocabulary, prompt sets, uploaded files (name: bytes|"good"|"other-clip"), hub,
#  expected: "ok" + substring of the summary, or a substring of the error)
APP_ROWS = [
    ("no image", None, "cat", ["maskclip-85"], {}, "", "No image"),
    ("empty file", "empty.png", "cat", ["maskclip-85"], {}, "", "not an image that can be read"),
    ("text as png", "text.png", "cat", ["maskclip-85"], {}, "", "not an image that can be read"),
    ("truncated png", "truncated.png", "cat", ["maskclip-85"], {}, "", "corrupt or truncated"),
    ("svg", "drawing.svg", "cat", ["maskclip-85"], {}, "", "not a readable image"),
    ("decompression bomb", "bomb.png", "cat", ["maskclip-85"], {}, "", "far too large"),
    ("extreme aspect", "sliver.png", "cat", ["maskclip-85"], {}, "", "aspect ratio"),
    ("empty vocabulary", "tiny.png", "", ["maskclip-85"], {}, "", "vocabulary is empty"),
    ("only separators", "tiny.png", " , ,, ", ["maskclip-85"], {}, "", "vocabulary is empty"),
    ("only invisible characters", "tiny.png", "\u200b, \u2060\x00", ["maskclip-85"], {}, "", "vocabulary is empty"),
    ("too many classes", "tiny.png", ", ".join(f"c{i}" for i in range(31)), ["maskclip-85"], {}, "", "too many"),
    ("name too long", "tiny.png", "x" * 500, ["maskclip-85"], {}, "", "characters (limit"),
    ("over the token budget", "tiny.png", TOKEN_HEAVY, ["learned"], {}, "", "tokens, but prompt set 'learned'"),
    ("duplicate names", "tiny.png", "cat, Cat", ["maskclip-85"], {}, "", "appears twice"),
    ("no prompt set", "tiny.png", "cat", [], {}, "", "Choose at least one prompt set"),
    ("unknown prompt set", "tiny.png", "cat", ["nope"], {}, "", "'nope' (type: <class 'str'>) is not in the list"),
    ("upload missing", "tiny.png", "cat", ["uploaded"], {}, "", "is selected but not given"),
    ("upload one file", "tiny.png", "cat", ["uploaded"], {"p.safetensors": b"x"}, "", "exactly two files"),
    ("upload garbage", "tiny.png", "cat", ["uploaded"], {"p.safetensors": b"x" * 100, "p.json": b"{"}, "",
     "not valid JSON"),
    ("upload a pickle", "tiny.png", "cat", ["uploaded"], {"p.safetensors": "pickle", "p.json": "good"}, "",
     "not a readable safetensors"),
    ("upload for another clip", "tiny.png", "cat", ["uploaded"], {"p.safetensors": "other", "p.json": "other"}, "",
     "another CLIP"),
    ("hub not selected but malformed", "tiny.png", "cat", ["hub"], {}, "not a repo", "not a Hub reference"),
    ("hub unreachable", "tiny.png", "cat", ["hub"], {}, "hf-hub:org/repo", "Could not get"),
    ("markdown in a name", "tiny.png", "[cat](http://127.0.0.1:9/)", ["maskclip-85"], {}, "", "ok:&#91;cat&#93;"),
    ("NUL inside a name", "tiny.png", "ca\x00t", ["maskclip-85"], {}, "", "ok:cat"),
    ("1x1 image", "tiny.png", "cat, dog", ["maskclip-85"], {}, "", "ok:"),
    ("animated gif", "animated.gif", "cat", ["maskclip-85"], {}, "", "ok:only its first frame"),
    ("16-bit gray", "gray16.png", "cat", ["maskclip-85"], {}, "", "ok:"),
    ("cmyk jpeg", "cmyk.jpg", "cat", ["maskclip-85"], {}, "", "ok:"),
    ("exif rotated", "rotated.jpg", "cat", ["maskclip-85"], {}, "", "ok:"),
    ("palette png", "palette.png", "cat", ["parts"], {}, "", "ok:"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    for name, data in IMAGE_FILES.items():
        (folder / name).write_bytes(data)
    models = small_models(folder / "models", student=False)
    demo = build_demo(models)
    with serve(demo) as url:
        yield Client(url, verbose=False), demo, folder


def _uploads(folder: Path, demo, files: dict) -> list:
    from demo.testing import save_random_prompts
    from mvpseg.testing import tiny_clip

    if not files:
        return []
    good = folder / "models" / "learned"
    other = save_random_prompts(folder / "other" / "p.safetensors", tiny_clip(seed=0, name="mvpseg-tiny-other"))
    out = []
    target = folder / f"upload_{len(list(folder.glob('upload_*')))}"
    target.mkdir()
    for name, data in files.items():
        suffix = Path(name).suffix
        if data == "good":
            data = good.with_suffix(suffix).read_bytes()
        elif data == "other":
            data = other.with_suffix(suffix).read_bytes()
        elif data == "pickle":
            data = pickle.dumps(_Evil())
        (target / name).write_bytes(data)
        out.append(handle_file(str(target / name)))
    return out


def test_app_rows_give_clear_messages_and_the_server_keeps_serving_with_bounded_memory(served):
    client, demo, folder = served
    ok = client.predict(handle_file(str(EXAMPLE)), "cat, dog", ["maskclip-85", "learned"], [], "",
                        api_name="/segment")  # warm up: caches and lazy imports are not growth
    assert Path(ok[0]).is_file()
    before = rss_mb()
    problems = []
    for name, image, vocab, sets, files, hub, expected in APP_ROWS:
        img = handle_file(str(folder / image)) if image else None
        try:
            out = client.predict(img, vocab, sets, _uploads(folder, demo, files), hub, api_name="/segment")
            said, succeeded = str(out[1]), True
        except AppError as e:
            said, succeeded = str(e), False
        if (succeeded != expected.startswith("ok:") or expected.removeprefix("ok:") not in said
                or "Traceback" in said or "Something went wrong" in said or SERVER_PATH.search(said)):
            problems.append((name, succeeded, said[:300]))
    assert not problems and len(APP_ROWS) >= 30, problems
    for _ in range(3):  # still serving, and memory does not ratchet with repeated bad input
        for row in APP_ROWS[:8]:
            try:
                client.predict(handle_file(str(folder / row[1])) if row[1] else None, row[2], row[3], [], "",
                               api_name="/segment")
            except AppError:
                pass
    after = rss_mb()
    out = client.predict(handle_file(str(EXAMPLE)), "cat, dog", ["maskclip-85"], [], "", api_name="/segment")
    assert Path(out[0]).is_file()
    assert after - before < 300, f"RSS grew {after - before:.0f} MB over the bad-input rows"


def test_inline_data_url_images_are_refused(served):
    """Gradio decodes an image given as a base64 data: URL in the payload (no upload, no max_file_size): the
    image component refuses it."""
    client, _, _ = served
    data = "data:image/png;base64," + base64.b64encode(png(32, 32)).decode()
    payload = {"path": None, "url": data, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.png"}
    # a raw call sends every input, the session's learned-prompts state (last) included
    stream = raw_queue_call(client.src.rstrip("/"), "/segment",
                            [payload, "cat", ["maskclip-85"], [], "", None, False, None], "datauri1")
    assert "Inline data: URLs are not accepted" in stream and "process_completed" in stream
    assert '"success": true' not in stream.replace("'", '"')


# ------------------------------------------------------------------------------------------ command lines
def _finish(main, argv, capsys) -> tuple[int, str, str]:
    """Runs ``main(argv)`` and ends it as the interpreter ends a script: (exit status, stdout, stderr)."""
    try:
        rc = main(argv)
        code = rc if isinstance(rc, int) else 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    except Exception as e:  # noqa: BLE001 - what the interpreter would do
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Everything the command-line rows point at: a tiny CLIP, good and bad checkpoints, images, folders."""
    from demo.testing import save_random_prompts
    from mvpseg.testing import tiny_clip

    root = tmp_path_factory.mktemp("cli_rows")
    clip_args = write_tiny_clip(root / "clip")
    clip = tiny_clip()
    good = save_random_prompts(root / "good.safetensors", clip)
    other = save_random_prompts(root / "other.safetensors", tiny_clip(seed=0, name="mvpseg-tiny-o2"))
    f = {"root": root, "clip": clip_args, "good": good, "other": other}
    for name, data in IMAGE_FILES.items():
        (root / name).write_bytes(data)
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (root / "garbage.json").write_text(json.dumps({"format": "mvpseg-prompts", "version": 1}))
    (root / "notjson.safetensors").write_bytes(good.read_bytes())
    (root / "notjson.json").write_text("{not json")
    (root / "evil.pt").write_bytes(pickle.dumps(_Evil()))
    (root / "state.pt").write_bytes(b"\x00garbage")
    (root / "no_images").mkdir()
    make_folder(root / "data", n=6)
    make_folder(root / "noclasses", n=3)
    (root / "noclasses" / "classes.txt").unlink()
    make_folder(root / "badmask", n=4)
    for m in (root / "badmask" / "masks").iterdir():
        Image.fromarray(np.full((40, 56), 9, np.uint8), mode="L").save(m)
    make_folder(root / "sizes", n=4)
    for m in (root / "sizes" / "masks").iterdir():
        Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(m)
    return f


def _segment_rows(f: dict) -> list[tuple[str, list[str], int, str]]:
    r, clip = f["root"], f["clip"]
    base = ["--classes", "cat, dog", "--short-side", "64", *clip]
    return [  # (id, argv, exit status, substring of stderr)
        ("missing image", ["segment", str(r / "absent.png"), *base], 2, "absent.png: no such file or folder"),
        ("corrupt image", ["segment", str(r / "truncated.png"), "--out", str(r / "o1.png"), *base], 2, "corrupt"),
        ("not an image", ["segment", str(r / "text.png"), "--out", str(r / "o2.png"), *base], 2,
         "not a readable image"),
        ("bomb", ["segment", str(r / "bomb.png"), "--out", str(r / "o3.png"), *base], 2, "the limit is"),
        ("empty vocabulary", ["segment", str(r / "tiny.png"), "--classes", " , ", *clip], 2, "vocabulary is empty"),
        ("token budget", ["segment", str(r / "tiny.png"), "--classes", TOKEN_HEAVY, "--prompts", str(f["good"]),
                          "--out", str(r / "o4.png"), *clip], 2, "tokens, but prompt set"),
        ("garbage prompts", ["segment", str(r / "tiny.png"), "--prompts", str(r / "garbage.safetensors"),
                             "--out", str(r / "o5.png"), *base], 2, "incomplete"),
        ("prompts json broken", ["segment", str(r / "tiny.png"), "--prompts", str(r / "notjson.safetensors"),
                                 "--out", str(r / "o6.png"), *base], 2, "not valid JSON"),
        ("prompts for another clip", ["segment", str(r / "tiny.png"), "--prompts", str(f["other"]),
                                      "--out", str(r / "o7.png"), *base], 2, "another CLIP"),
        ("pickle as clip weights", ["segment", str(r / "tiny.png"), "--out", str(r / "o8.png"), "--classes", "cat",
                                    *clip[:4], "--pretrained", str(r / "evil.pt")], 2, "cannot load CLIP weights"),
        ("unknown clip", ["segment", str(r / "tiny.png"), "--classes", "cat", "--clip", "NoSuchModel-9",
                          "--pretrained", "none"], 2, "Unknown CLIP model"),
        ("offline tag", ["segment", str(r / "tiny.png"), "--classes", "cat", "--cache-dir", str(r / "cache")], 2,
         "Cannot load CLIP weights RN50 (openai)"),
        ("out is an image with many inputs", ["segment", str(r / "tiny.png"), str(r / "cmyk.jpg"), "--out",
                                              str(r / "x.png"), *base], 2, "looks like an image file"),
        ("folder without images", ["segment", str(r / "no_images"), *base], 2, "no image"),
        ("garbage student", ["segment", str(r / "tiny.png"), "--student", str(r / "garbage.safetensors"),
                             "--out", str(r / "o9.png"), *base], 2, "not an mvpseg student"),
        ("batch with bad files", ["segment", str(r / "tiny.png"), str(r / "text.png"), "--out", str(r / "batch"),
                                  "--no-progress", *base], 1, "skipped"),
    ]


def test_segment_command_rows(files, capsys):
    from mvpseg.__main__ import main

    problems = []
    for name, argv, status, says in _segment_rows(files):
        code, out, err = _finish(main, argv, capsys)
        if code != status or says not in err or "Traceback" in err or "unpickled!" in out:
            problems.append((name, code, err[-400:]))
    assert not problems, problems


def _training_rows(f: dict) -> list[tuple[str, str, list[str], int, str]]:
    r, clip = f["root"], f["clip"]
    run = ["--n-ctx", "8", "--global-batch", "2", "--max-iters", "2", "--num-workers", "0", "--device", "cpu",
           "--no-progress", "--cpu-threads", "1", *clip]
    return [  # (id, script, argv, exit status, substring of the last stderr line)
        ("folder missing", "train", ["--dataset", "folder", "--data-root", str(r / "nowhere"), "--out",
                                     str(r / "t1"), *run], 1, "dataset folder not found"),
        ("no classes.txt", "train", ["--dataset", "folder", "--data-root", str(r / "noclasses"), "--out",
                                     str(r / "t2"), *run], 1, "class list not found"),
        ("mask ids outside classes.txt", "train", ["--dataset", "folder", "--data-root", str(r / "badmask"),
                                                   "--out", str(r / "t3"), *run], 1, "outside classes.txt"),
        ("mask size differs", "train", ["--dataset", "folder", "--data-root", str(r / "sizes"), "--out",
                                        str(r / "t4"), *run], 1, "is 5x5 but image"),
        ("unknown dataset", "train", ["--dataset", "imagenet", "--data-root", str(r), "--out", str(r / "t5"), *run],
         1, "imagenet"),
        ("resume garbage state", "train", ["--dataset", "folder", "--data-root", str(r / "data"), "--out",
                                           str(r / "t6"), "--resume", str(r / "state.pt"), *run], 1,
         "cannot read training checkpoint"),
        ("resume a pickle", "train", ["--dataset", "folder", "--data-root", str(r / "data"), "--out", str(r / "t7"),
                                      "--resume", str(r / "evil.pt"), *run], 1, "cannot read training checkpoint"),
        ("pickle as clip weights", "train", ["--dataset", "folder", "--data-root", str(r / "data"), "--out",
                                             str(r / "t8"), *run[:-2], "--pretrained", str(r / "evil.pt")], 1,
         "cannot load CLIP weights"),
        ("toy world too big", "train", ["--dataset", "toyworld", "--data-root", "image_size=100000", "--out",
                                        str(r / "t9"), *run], 1, "image_size"),
        ("bad argument", "train", ["--dataset", "folder", "--data-root", str(r / "data"), "--out", str(r / "t10"),
                                   "--max-iters", "many", *run[6:]], 2, "invalid int value"),
        ("evaluate garbage prompts", "evaluate", [*clip, "--data", f"folder={r / 'data'}", "--prompts",
                                                  f"x={r / 'garbage.safetensors'}", "--num-workers", "0",
                                                  "--device", "cpu", "--no-progress"], 1, "incomplete"),
        ("evaluate missing folder", "evaluate", [*clip, "--data", f"folder={r / 'nowhere'}", "--baselines",
                                                 "a-photo-of", "--num-workers", "0", "--device", "cpu",
                                                 "--no-progress"], 1, "dataset folder not found"),
    ]


def test_training_command_rows(files, capsys):
    from training import evaluate, train_prompts

    scripts = {"train": train_prompts.main, "evaluate": evaluate.main}
    os.environ.pop("MVPSEG_DEBUG", None)
    problems = []
    for name, script, argv, status, says in _training_rows(files):
        code, out, err = _finish(scripts[script], argv, capsys)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if (code != status or says not in last or "Traceback" in err or "unpickled!" in out
                or "weights_only=False" in err):
            problems.append((name, code, err[-600:]))
    assert not problems, problems


def test_the_table_has_at_least_forty_rows(files):
    assert len(APP_ROWS) + len(_segment_rows(files)) + len(_training_rows(files)) >= 40


def test_real_processes_match_the_in_process_rows(files):
    """Exit status and stderr of real processes (the interpreter's own SystemExit / excepthook handling), and
    ``--debug`` bringing the traceback back."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MVPSEG_DEBUG", None)
    r = files["root"]

    def run(*argv):
        return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    seg = run("-m", "mvpseg", "segment", str(r / "truncated.png"), "--classes", "cat", "--out", str(r / "s.png"),
              *files["clip"])
    assert seg.returncode == 2 and "corrupt" in seg.stderr and "Traceback" not in seg.stderr
    train = ["-m", "training.train_prompts", "--dataset", "folder", "--data-root", str(r / "badmask"), "--out",
             str(r / "p1"), "--n-ctx", "8", "--global-batch", "2", "--max-iters", "2", "--num-workers", "0",
             "--device", "cpu", "--no-progress", *files["clip"]]
    plain, debug = run(*train), run(*train, "--debug")
    for proc in (plain, debug):
        assert proc.returncode == 1 and "outside classes.txt" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in plain.stderr and plain.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback (most recent call last)" in debug.stderr
