"""``python -m training.toyworld [--examples DIR --count N --seed S]``: demo example images (toy_<k>.png);
``python -m training.toyworld export DIR …``: scenes written as a folder dataset (``export.py``).
Also runs by path: ``python training/toyworld …``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run by path: the repository root makes ``training`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        from training.toyworld.export import main as export_main

        return export_main(argv[1:])
    from training.toyworld.world import export_examples

    parser = argparse.ArgumentParser(prog="python -m training.toyworld",
                                     description="Export toy-world example images for the demo.")
    parser.add_argument("--examples", default="assets/examples")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args(argv)
    print("\n".join(export_examples(cli.examples, cli.count, cli.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
