"""Class names, MaskCLIP prompt renamings and the paper's zero-shot splits.

Dataset names are the ones of the MMSegmentation dataset classes (the on-disk label ids index them);
prompt names are what MaskCLIP feeds to the text encoder (``tools/maskclip_utils/prompt_engineering.py``).
The unseen indices are MaskCLIP's zero-shot configs, which equal the lists of section 4.1 of the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

VOC20_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_RENAMES = {
    "aeroplane": "airplane", "diningtable": "dining table", "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}
# Sec. 4.1: potted plant, sheep, sofa, train, tv monitor.
VOC20_UNSEEN = (15, 16, 17, 18, 19)

CONTEXT60_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate",
    "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow",
    "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window",
    "wood",
)
CONTEXT_RENAMES = {"aeroplane": "airplane", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
# Sec. 4.1: cow, motorbike, sofa, cat, boat, fence, bird, tv monitor, keyboard, aeroplane
# (indices into the 60 classes, background = 0 kept as a class).
CONTEXT60_UNSEEN = (20, 34, 49, 15, 8, 25, 7, 55, 32, 1)

COCOSTUFF171_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
COCOSTUFF_RENAMES = {
    # X-other -> X
    "building-other": "building", "ceiling-other": "ceiling", "floor-other": "floor",
    "food-other": "food", "furniture-other": "furniture", "ground-other": "ground",
    "plant-other": "plant", "sky-other": "sky", "solid-other": "solid",
    "structural-other": "structural", "textile-other": "textile", "wall-other": "wall",
    "water-other": "water", "window-other": "window",
    # material/surface flipped
    "ceiling-tile": "tile ceiling", "floor-marble": "marble floor", "floor-stone": "stone floor",
    "floor-tile": "tile floor", "floor-wood": "wood floor", "wall-brick": "brick wall",
    "wall-concrete": "concrete wall", "wall-panel": "panel wall", "wall-stone": "stone wall",
    "wall-tile": "tile wall", "wall-wood": "wood wall", "window-blind": "blind window",
    # -stuff dropped
    "desk-stuff": "desk", "door-stuff": "door", "mirror-stuff": "mirror",
}
# Sec. 4.1: frisbee, skateboard, cardboard, carrot, scissors, suitcase, giraffe, cow, road,
# wall concrete, tree, grass, river, clouds, playing field.
COCOSTUFF171_UNSEEN = (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160)


@dataclass(frozen=True)
class ClassSplit:
    """A vocabulary with its zero-shot split.

    ``class_names``: names indexing the label maps; ``prompt_names``: names given to the text encoder;
    ``unseen``: sorted indices of the unseen classes (empty = fully supervised / no split).
    """

    class_names: tuple[str, ...]
    prompt_names: tuple[str, ...]
    unseen: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.prompt_names):
            raise ValueError("class_names and prompt_names differ in length")
        if len(set(self.unseen)) != len(self.unseen) or any(
            not 0 <= u < len(self.class_names) for u in self.unseen
        ):
            raise ValueError(f"bad unseen indices {self.unseen} for {len(self.class_names)} classes")
        object.__setattr__(self, "unseen", tuple(sorted(self.unseen)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def seen(self) -> tuple[int, ...]:
        unseen = set(self.unseen)
        return tuple(i for i in range(self.num_classes) if i not in unseen)

    @property
    def seen_prompt_names(self) -> tuple[str, ...]:
        return tuple(self.prompt_names[i] for i in self.seen)

    @property
    def unseen_prompt_names(self) -> tuple[str, ...]:
        return tuple(self.prompt_names[i] for i in self.unseen)

    def seen_label_map(self, ignore_index: int = 255):
        """Lookup table (length 256) mapping full label ids to seen-vocabulary ids.

        Unseen ids and the ignore id map to ``ignore_index``; ids >= num_classes map to
        ``ignore_index`` as well (callers validate labels before, see ``base.check_label``).
        """
        import numpy as np

        lut = np.full(256, ignore_index, dtype=np.uint8)
        for new, old in enumerate(self.seen):
            lut[old] = new
        return lut


def _renamed(names: tuple[str, ...], renames: dict[str, str]) -> tuple[str, ...]:
    unknown = set(renames) - set(names)
    if unknown:
        raise ValueError(f"renamings for unknown classes: {sorted(unknown)}")
    return tuple(renames.get(n, n) for n in names)


VOC20 = ClassSplit(VOC20_CLASSES, _renamed(VOC20_CLASSES, VOC_RENAMES), VOC20_UNSEEN)
CONTEXT60 = ClassSplit(
    CONTEXT60_CLASSES, _renamed(CONTEXT60_CLASSES, CONTEXT_RENAMES), CONTEXT60_UNSEEN
)
COCOSTUFF171 = ClassSplit(
    COCOSTUFF171_CLASSES, _renamed(COCOSTUFF171_CLASSES, COCOSTUFF_RENAMES), COCOSTUFF171_UNSEEN
)
