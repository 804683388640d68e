"""MVP-SEG demo: ``python app.py [--device cuda] [--port 7860]`` (also the Hugging Face Spaces entry point).

Loads the models once, builds the Gradio page (``demo/``) and serves it. Without pretrained CLIP weights
(offline) it still starts, says which weights are missing and how to provide them, and runs on the bundled
toy-world model (or, before that exists, on clearly labelled random weights).
"""
from __future__ import annotations

# ZeroGPU (Spaces) needs `spaces` imported before torch; locally it is usually absent and not needed.
try:
    import spaces  # type: ignore[import-not-found]
except ImportError:
    spaces = None

import argparse
import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere

from mvpseg.clip_backbone import ClipSpec, add_clip_args  # noqa: E402  (after `spaces`, which must precede torch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (cuda when available)")
    add_clip_args(p, clip_help="open_clip model name, hf-hub:org/repo, a custom config's name, or 'toy' "
                                "(the bundled toy model)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                   help="learned prompts (.safetensors with its .json); repeatable")
    p.add_argument("--no-discover", action="store_true",
                   help="do not load the learned prompts and the student shipped under assets/")
    p.add_argument("--student", default=None, metavar="PATH",
                   help="MVP-SEG+ student checkpoint to show beside (default: one shipped under assets/ for the CLIP)")
    p.add_argument("--short-side", type=int, default=None,
                   help="CLIP input short side (default 512; 256 for the toy model)")
    p.add_argument("--max-classes", type=int, default=30, help="largest vocabulary accepted")
    p.add_argument("--fallback", default="auto", choices=["auto", "random", "none"],
                   help="without pretrained weights: toy model then random weights (auto), random weights, or fail")
    p.add_argument("--text-cache-dir", default=None, metavar="DIR|none",
                   help="keep text embeddings here across restarts (default: $MVPSEG_TEXT_CACHE_DIR, else /data/"
                        "mvpseg-text-cache on a Space with persistent storage, else ~/.cache/mvpseg/text-embeddings); "
                        "'none': in memory only")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    return p.parse_args(argv)


def _checkpoint(arg: str) -> tuple[str, str]:
    name, sep, path = arg.partition("=")
    if not sep:
        from pathlib import Path

        return Path(arg).stem, arg
    return name, path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from PIL import Image

    from demo import DemoConfig, build_demo, launch_kwargs, load_models
    from demo.models import text_cache_dir_from
    from demo.sources import MAX_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow refuses bigger images before decoding them
    spec = ClipSpec.from_args(args)
    text_cache = text_cache_dir_from(args.text_cache_dir)
    config = DemoConfig(clip=spec.model_name, pretrained=spec.pretrained, model_config=spec.model_config,
                        cache_dir=spec.cache_dir, normalization=spec.normalization, device=args.device,
                        checkpoints=tuple(_checkpoint(c) for c in args.checkpoint), discover=not args.no_discover,
                        student=args.student, short_side=args.short_side, max_classes=args.max_classes,
                        fallback=args.fallback, text_cache_dir=text_cache, dense_mode=spec.dense_mode,
                        sliding=spec.sliding)
    try:
        models = load_models(config)
    except Exception as e:  # e.g. --device cuda without CUDA, --fallback none offline, unknown model
        print(f"error: {e}", file=sys.stderr)
        return 2
    for notice in models.notices:
        logging.getLogger("mvpseg.demo").warning(notice.replace("\n\n", "\n"))
    gpu = spaces.GPU(duration=60) if spaces is not None else None
    demo = build_demo(models, gpu_decorator=gpu)
    demo.launch(**launch_kwargs(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
