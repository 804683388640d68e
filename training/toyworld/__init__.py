"""The toy world and its toy CLIPs: everything the project measures itself on, since no real CLIP weights or
datasets can be had here.

``world``: the procedural, seeded scenes, labels and captions (``ToyWorld``, ``WORLDS``, ``UNSEEN_SPLITS``);
``draw``: the shapes and textures they are drawn from; ``dataset``: the world behind the training scripts'
dataset interface (``--dataset toyworld``); ``export``: scenes written as a folder dataset;
``pretrain``: a tiny CLIP pretrained on captioned scenes (``python -m training.pretrain_toyclip``);
``examples``: the demo's example images (``python -m training.toyworld.examples``).
``python -m training.toyworld [export …]`` runs ``__main__``.
"""
from .world import *  # noqa: F401,F403  (the world's public names: ToyWorld, CLASS_NAMES, WORLDS, …)
from .captions import CAPTION_STYLES, CaptionedToyWorld, caption  # noqa: F401,E402  (pretraining captions)
