"""What a visitor waits for (issue #26): client-observed time of a ``/segment`` request against the handler's
own work, per stage, for a cold, a warm and an add-one-class request; and the full page paint in Chromium.

For each model (``toy``: the bundled toy CLIP at 256 px; ``rn50`` / ``vit``: RN50 and ViT-B-16 with random
weights at 512 px — the real FLOPs without a download) the app is served on loopback and measured with
``gradio_client`` (``download_files=False``, then every returned file downloaded, as the client would):

* handler: the page's own "total" (decode, image tower, text, head, label maps, rendering, encoding);
* encode: the handler's "encode pictures" stage (PNG of every picture);
* call: ``predict`` returning (queue, Gradio's pre/postprocessing, JSON) minus the handler;
* transfer: downloading the returned files;
* ratio: client-observed (call + transfer) / handler, and the issue's bound 1.5 × handler + 0.1 s.

With ``--browser`` (Debian's chromium through Playwright) the same page is opened, the image uploaded, the
vocabulary typed and Segment clicked: first paint of every panel after the click, cold and warm, against the
handler's total read off the page's own table. Everything is printed as measured in this one run.

    python benchmarks/page_latency.py                       # toy, rn50, vit; ≈ 3 min on 2 CPU cores
    python benchmarks/page_latency.py --models rn50 --browser
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
IMAGES = {"toy": REPO / "assets" / "examples" / "toy_test_294.png",
          "rn50": REPO / "assets" / "examples" / "grace_hopper.jpg",
          "vit": REPO / "assets" / "examples" / "grace_hopper.jpg"}
VOCAB = {"toy": "background, red cat, blue bird, green owl, brick, water, grass, sky",
         "rn50": "person, uniform, tie, flag, wall, curtain, medal, sky",
         "vit": "person, uniform, tie, flag, wall, curtain, medal, sky"}
EXTRA = {"toy": "sand", "rn50": "chair", "vit": "chair"}
SETS = ["maskclip-85", "parts", "a-photo-of"]


def load(model: str):
    from demo import DemoConfig, load_models

    if model == "toy":
        config = DemoConfig(clip="toy", discover=False, text_cache_dir=None)
    else:
        config = DemoConfig(clip={"rn50": "RN50", "vit": "ViT-B-16"}[model], pretrained=None, fallback="none",
                            discover=False, short_side=512, text_cache_dir=None)
    return load_models(config)


def stage(timings: dict, name: str) -> float:
    rows = {row[0]: row[1] for row in timings["data"]}
    return float(rows.get(name, 0.0))


def one_request(client, image, vocabulary: str) -> dict[str, float]:
    """One /segment call: the client's view and the handler's own table."""
    from demo.testing import fetch_whole, file_refs

    t0 = time.perf_counter()
    out = client.predict(image, vocabulary, SETS, [], "", api_name="/segment")
    t_call = time.perf_counter() - t0
    sizes = [fetch_whole(url, path)[0] for url, path in file_refs(out)]
    t_all = time.perf_counter() - t0
    timings = out[7]  # overlay, summary, compare, student, views, gpr, tsne, timings, label map, JSON
    handler = stage(timings, "total")
    return {"client": t_all, "handler": handler, "encode": stage(timings, "encode pictures"),
            "call": t_call - handler, "transfer": t_all - t_call, "kb": sum(sizes) / 1024}


def report(model: str, kind: str, rows: list[dict[str, float]]) -> None:
    m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    bound = 1.5 * m["handler"] + 0.1
    print(f"{model:5s} {kind:9s} client {m['client']:6.3f} s | handler {m['handler']:6.3f} (encode "
          f"{m['encode']:.3f}) | call overhead {m['call']:6.3f} | transfer {m['transfer']:6.3f} "
          f"({m['kb']:.0f} KB) | client/handler {m['client'] / m['handler']:.2f}× | bound {bound:.3f} s "
          f"{'met' if m['client'] <= bound else 'MISSED'}" + (f" (median of {len(rows)})" if len(rows) > 1 else ""))


def browser_paint(url: str, image: Path, vocabulary: str, repeats: int) -> None:
    """Full page paint after clicking Segment (a vocabulary not seen yet, then the same again), against the
    page's own handler total."""
    from demo.testing import browser_page

    with browser_page(url, timeout_ms=180_000) as page:
        page.locator("#image input[type=file]").set_input_files(str(image))
        page.wait_for_function("() => document.querySelector('#image img') !== null")
        page.locator("#vocabulary textarea").fill(vocabulary)
        for kind in ["new vocabulary"] + ["warm"] * repeats:  # the image tower ran for the API calls
            # timed inside the page, from the click event to the frame after every panel has loaded: Gradio marks
            # the outputs .pending/.generating while the request runs; record that it did, then wait for the marks
            # to go, the table to show its rows again (no "queue …" line on top) and every picture to be decoded
            page.evaluate("""() => { window.__busy = false; window.__paint = null;
                const btn = document.querySelector('#segment');
                btn.addEventListener('click', () => { window.__t0 = performance.now(); }, {capture: true, once: true});
                const check = () => {
                    if (document.querySelector('.pending, .generating')) { window.__busy = true; return; }
                    const done = window.__busy && document.querySelector('#timings').innerText.startsWith('stage')
                        && ['#overlay img', '#compare img', '#views img', '#tsne img'].every(s => {
                            const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; });
                    if (done && window.__paint === null) {
                        window.__paint = -1;
                        requestAnimationFrame(() => requestAnimationFrame(() => {
                            window.__paint = performance.now() - window.__t0; }));
                    }
                };
                window.__obs && window.__obs.disconnect();
                window.__obs = new MutationObserver(check);
                window.__obs.observe(document.body, {subtree: true, childList: true, attributes: true});
                window.__poll && clearInterval(window.__poll); window.__poll = setInterval(check, 5); }""")
            page.locator("#segment").click()
            paint = page.wait_for_function("() => window.__paint > 0 && window.__paint").json_value() / 1000
            text = page.evaluate("() => document.querySelector('#timings').innerText").split("\n")
            handler = float(text[len(text) - 1 - text[::-1].index("total") + 1])  # the cell after "total"
            print(f"      browser {kind}: paint {paint:6.3f} s | handler {handler:6.3f} s | paint/handler "
                  f"{paint / handler:.2f}× (bound 2×: {'met' if paint <= 2 * handler else 'MISSED'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="toy,rn50,vit")
    p.add_argument("--repeats", type=int, default=5, help="warm requests (median)")
    p.add_argument("--browser", action="store_true", help="also measure the page paint in Chromium")
    args = p.parse_args(argv)

    import torch
    from gradio_client import Client, handle_file

    from demo import build_demo
    from demo.testing import serve

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        models = load(model)
        with tempfile.TemporaryDirectory(), serve(build_demo(models)) as url:
            client = Client(url, verbose=False, download_files=False)
            t0 = time.perf_counter()
            client.predict(api_name="/info")
            print(f"{model}: {models.clip_description}; /info round trip {time.perf_counter() - t0:.3f} s")
            image = handle_file(str(IMAGES[model]))
            report(model, "cold", [one_request(client, image, VOCAB[model])])
            report(model, "warm", [one_request(client, image, VOCAB[model]) for _ in range(args.repeats)])
            report(model, "add-class", [one_request(client, image, VOCAB[model] + ", " + EXTRA[model])])
            if args.browser:
                browser_paint(url, IMAGES[model], VOCAB[model] + ", " + EXTRA[model] + ", floor", args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
