"""Makes the README's pictures from the bundled toy model, offline: a screenshot of the page after a Segment
click (Debian's chromium through Playwright) and the per-prompt view-mask grid of the shipped learned prompts.

    python scripts/readme_pictures.py            # writes docs/images/page.jpg and docs/images/view_masks.jpg

The pictures show what `python app.py` shows without pretrained weights; rerun after a change to the page.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "images"))
    p.add_argument("--example", type=int, default=0, help="row of assets/examples/examples.json")
    args = p.parse_args(argv)

    import numpy as np
    from PIL import Image

    from demo import DemoConfig, build_demo, load_models, render
    from demo.testing import serve

    models = load_models(DemoConfig(clip="toy", text_cache_dir=None))
    if models.mode != "toy" or not models.learned_sets:
        print("error: the bundled toy model and its shipped prompts are needed (assets/toyclip, assets/prompts)",
              file=sys.stderr)
        return 2
    example = json.loads((REPO / "assets" / "examples" / "examples.json").read_text())[args.example]
    image_path = REPO / "assets" / "examples" / example["file"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # the view-mask grid of the first shipped learned set, as the page draws it
    from mvpseg import visualize

    pred = models.predictor
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    pred.set_image(rgb)
    result = pred.predict(example["vocabulary"], prompts=next(iter(models.learned_sets)))
    grid, _ = render.view_grid(rgb, result, visualize.palette(len(result.classes)))
    Image.fromarray(grid).convert("RGB").save(out / "view_masks.jpg", quality=85)  # heat maps: JPEG is 8× smaller

    from demo.testing import browser_page

    with serve(build_demo(models)) as url, browser_page(url, width=1280, height=900) as page:
        page.locator("#image input[type=file]").set_input_files(str(image_path))
        page.locator("#vocabulary textarea").fill(example["vocabulary"])
        page.locator("#segment").click()
        page.locator("#summary").get_by_text("Learned").first.wait_for()
        for sel in ("#overlay img", "#compare img", "#views img", "#tsne img"):
            page.locator(sel).scroll_into_view_if_needed()
            page.wait_for_function(f"() => {{ const i = document.querySelector('{sel}'); "
                                   "return i && i.complete && i.naturalWidth > 0; }")
        page.evaluate("() => window.scrollTo(0, 0)")
        shot = out / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        # the README shows the top of the page down to the side-by-side row: inputs, result, comparison
        full = Image.open(shot).convert("RGB")
        bottom = int(page.evaluate("() => { const r = document.querySelector('#compare').getBoundingClientRect();"
                                   " return r.bottom + window.scrollY; }")) + 40
        full.crop((0, 0, full.width, min(full.height, bottom))).save(out / "page.jpg", quality=85)
        shot.unlink()
    print(f"wrote {out / 'page.jpg'} and {out / 'view_masks.jpg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
