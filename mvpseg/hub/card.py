"""The model card ``mvpseg.hub.push`` writes: YAML front matter (library, tags, the CLIP it was learned on as
``base_model``, datasets, ``model-index`` metrics from a ``training.evaluate`` JSON) and a body with the training
command, the results table and how to load the checkpoint in the demo, on the command line and in Python.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

LIBRARY = "mvpseg"
BASE_TAGS = ("open-vocabulary-segmentation", "clip", "mvp-seg")
KIND_TAG = {"prompts": "prompt-learning", "student": "distillation"}
TASK = ("image-segmentation", "Open-vocabulary semantic segmentation (zero-shot)")
METRICS = (("miou_seen", "mIoU", "mIoU (seen classes)"), ("miou_unseen", "mIoU", "mIoU (unseen classes)"),
           ("hiou", "hIoU", "hIoU (harmonic mean of seen and unseen mIoU)"), ("miou", "mIoU", "mIoU (all classes)"))
NOT_HUB_DATASETS = ("folder",)  # a local folder: no dataset name worth listing


class CardError(ValueError):
    """Evaluation results that do not say which row belongs to the checkpoint."""


def base_model_of(clip_model: str, clip_pretrained: str | None) -> str | None:
    """The Hub id of the CLIP (``hf-hub:`` names, or open_clip's record of where a tag's weights live on the Hub);
    None for a local file or a custom model."""
    for name in (clip_model, clip_pretrained or ""):
        if name.startswith("hf-hub:"):
            return name[len("hf-hub:"):].strip("/") or None
    if not clip_pretrained:
        return None
    try:
        import open_clip

        hub = (open_clip.get_pretrained_cfg(clip_model, clip_pretrained) or {}).get("hf_hub", "")
    except Exception:  # an unknown model or tag: no Hub id
        return None
    return hub.strip("/") or None


def _flatten_results(results: dict, dataset: str | None) -> dict[str, dict[str, dict]]:
    """{dataset: {method: scores}} from training.evaluate's results.json or distill's eval.json (one dataset)."""
    res = results.get("results", {})
    if res and all(isinstance(v, dict) and "miou" in v for v in res.values()):
        return {dataset or "dataset": res}
    return {ds: m for ds, m in res.items() if isinstance(m, dict)}


def pick_method(kind: str, results: dict, flat: dict[str, dict[str, dict]], eval_method: str | None) -> str:
    """The results row of this checkpoint: ``eval_method``, else the only learned prompt set (evaluate records
    which methods were learned) or the only student row."""
    methods = {m for rows in flat.values() for m in rows}
    if eval_method is not None:
        if eval_method not in methods:
            raise CardError(f"method '{eval_method}' is not in the evaluation results (they hold: "
                            f"{', '.join(sorted(methods))})")
        return eval_method
    if kind == "student":
        candidates = {m for m in methods if "(student)" in m}
    else:
        candidates = {m for d in (results.get("datasets") or {}).values() if isinstance(d, dict)
                      for m in (d.get("unseen_in_training_vocabulary") or {})}
    if len(candidates) != 1:
        what = "no row for a learned checkpoint" if not candidates else f"several ({', '.join(sorted(candidates))})"
        raise CardError(f"the evaluation results hold {what}: name this checkpoint's row with --eval-method "
                        f"(one of: {', '.join(sorted(methods))})")
    return candidates.pop()


@dataclass
class CardInfo:
    """Everything the card says, read from a checkpoint's JSON metadata."""

    kind: str
    repo_id: str
    filename: str
    clip_model: str
    clip_pretrained: str | None
    normalization: str | None = None
    dense_mode: str | None = None
    classes: tuple[str, ...] = ()
    train_config: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    architecture: str = ""
    results: dict[str, dict[str, dict]] = field(default_factory=dict)  # dataset -> method -> scores
    method: str | None = None

    @classmethod
    def from_meta(cls, kind: str, meta: dict, repo_id: str, filename: str, command: str | None = None,
                  results: dict | None = None, eval_method: str | None = None) -> "CardInfo":
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        config = extra.get("train_config") if isinstance(extra.get("train_config"), dict) else {}
        if kind == "prompts":
            arch = (f"{meta.get('n_seg')} segmentation prompt(s)" + (" + 1 global prompt (GPR)" if
                    meta.get("use_global") else "") + f", {meta.get('n_ctx')} context tokens each")
            classes, norm, dense = meta.get("training_classes", ()), meta.get("normalization"), meta.get("dense_mode")
        else:
            c = meta.get("config") or {}
            arch = f"{c.get('backbone')} + {c.get('head')} student, classifier = the teacher's fused text embeddings"
            if meta.get("seen_penalty"):
                arch += (f"; the seen training classes' logits lowered by {float(meta['seen_penalty']):g} at test "
                         "time (calibrated stacking, chosen on the training images)")
            classes, norm = meta.get("class_names", ()), meta.get("clip_normalization")
            dense = meta.get("teacher_dense_mode")
        info = cls(kind, repo_id, filename, str(meta.get("clip_model")), meta.get("clip_pretrained"), norm, dense,
                   tuple(classes or ()), config, command or extra.get("command"), arch)
        if results is not None:
            info.results = _flatten_results(results, config.get("dataset"))
            info.method = pick_method(kind, results, info.results, eval_method)
        return info

    @property
    def datasets(self) -> list[str]:
        ds = self.train_config.get("dataset")
        return [ds] if ds and ds not in NOT_HUB_DATASETS else []

    def metadata(self) -> dict[str, Any]:
        """The YAML front matter as a dict (huggingface_hub's ModelCardData turns it into YAML)."""
        out: dict[str, Any] = {"library_name": LIBRARY, "tags": [*BASE_TAGS, KIND_TAG[self.kind]],
                               "pipeline_tag": "image-segmentation"}
        base = base_model_of(self.clip_model, self.clip_pretrained)
        if base:
            out["base_model"] = base
        if self.datasets:
            out["datasets"] = self.datasets
        out["mvpseg"] = {"kind": self.kind, "file": self.filename, "clip_model": self.clip_model,
                         "clip_pretrained": self.clip_pretrained, "normalization": self.normalization,
                         "dense_mode": self.dense_mode}
        return out

    def eval_results(self) -> list:
        from huggingface_hub import EvalResult

        out = []
        for ds, rows in self.results.items():
            scores = rows.get(self.method or "", {})
            for key, metric, name in METRICS:
                if isinstance(scores.get(key), (int, float)):
                    out.append(EvalResult(task_type=TASK[0], task_name=TASK[1], dataset_type=ds, dataset_name=ds,
                                          metric_type=metric, metric_value=float(scores[key]), metric_name=name))
        return out


def _results_table(info: CardInfo) -> list[str]:
    lines = ["| dataset | method | mIoU(S) | mIoU(U) | hIoU | mIoU |", "| --- | --- | --- | --- | --- | --- |"]
    for ds, rows in info.results.items():
        for method, s in rows.items():
            name = f"**{method}** (this checkpoint)" if method == info.method else method
            cells = " | ".join("–" if s.get(k) is None else f"{float(s[k]):.1f}"
                               for k in ("miou_seen", "miou_unseen", "hiou", "miou"))
            lines.append(f"| {ds} | {name} | {cells} |")
    return lines


def _usage(info: CardInfo) -> list[str]:
    ref = f"hf-hub:{info.repo_id}" + ("" if info.kind == "prompts" else f"/{info.filename}")
    spec = f"mvpseg.ClipSpec({json.dumps(info.clip_model)}, {json.dumps(info.clip_pretrained)})".replace("null", "None")
    clip_args = f"--clip {info.clip_model}" + (f" --pretrained {info.clip_pretrained}" if info.clip_pretrained else "")
    if info.normalization and info.normalization != "imagenet":
        clip_args += f" --normalization {info.normalization}"
    flag = "--prompts" if info.kind == "prompts" else "--student"
    lines = ["## Use it", "", "Install mvpseg (`pip install .` in its repository; the `mvpseg` command comes with "
             "it).", ""]
    if info.kind == "prompts":
        lines += ["**Demo** (`python app.py`): type `" + ref + "` into *…or a Hub repo* and press Enter; the prompts "
                  "load when the demo's CLIP is the one they were learned on.", ""]
    else:
        lines += ["**Demo**: `python app.py --student \"$(mvpseg pull " + ref + ")\"` (downloads it, prints its "
                  "path).", ""]
    lines += ["**Command line**:", "", "```bash",
              f'mvpseg segment photo.jpg --classes "cat, dog, grass, sky" {flag} {ref} {clip_args}', "```", "",
              "**Python**:", "", "```python", "import mvpseg"]
    if info.kind == "prompts":
        lines += ["from mvpseg.hub import load_prompts_from_hub", "",
                  f'pred = mvpseg.build_predictor({spec}, checkpoints={{"learned": "{ref}"}})',
                  'pred.set_image("photo.jpg")', 'r = pred.predict("cat, dog, grass, sky", prompts="learned")',
                  f'prompts = load_prompts_from_hub("{ref}")  # the LearnedPrompts module itself']
    else:
        lines += ["from mvpseg.hub import download", "",
                  f'pred = mvpseg.StudentPredictor.from_checkpoint(download("{ref}", kind="student"))  '
                  "# loads the CLIP it records", 'pred.set_image("photo.jpg")',
                  'r = pred.predict(["cat", "dog", "grass", "sky"])']
    lines += ["```"]
    if info.clip_pretrained and ("/" in info.clip_pretrained or info.clip_pretrained.endswith((".pt", ".safetensors"))):
        lines += ["", f"The CLIP weights were a local file when this was trained (`{info.clip_pretrained}`): pass your "
                  "copy of the same weights; a different CLIP is refused with a message."]
    return lines


def render_card(info: CardInfo) -> str:
    """README.md: front matter + body."""
    from huggingface_hub import ModelCardData

    meta = info.metadata()
    data = ModelCardData(model_name=info.repo_id, eval_results=info.eval_results() or None, **meta)
    what = "Learned MVP-SEG prompts" if info.kind == "prompts" else "An MVP-SEG+ student"
    body = [f"# {info.repo_id}", "",
            f"{what} for open-vocabulary semantic segmentation on a frozen CLIP, made with mvpseg (an implementation "
            "of MVP-SEG: Multi-View Prompt Learning for Open-Vocabulary Semantic Segmentation).", "",
            f"- file: `{info.filename}` with its metadata `{info.filename[:-len('.safetensors')]}.json`",
            f"- CLIP: `{info.clip_model}` (`{info.clip_pretrained}`), input normalisation "
            f"{info.normalization or 'not recorded'}, dense features {info.dense_mode or 'the tower default'}",
            f"- model: {info.architecture}"]
    if info.train_config:
        cfg = info.train_config
        body.append(f"- trained on: {cfg.get('dataset')} ({len(info.classes)} classes"
                    + (f", {cfg.get('max_iters')} iterations max" if cfg.get("max_iters") else "") + ")")
    if info.classes:
        body.append(f"- classes: {', '.join(info.classes[:40])}" + (" …" if len(info.classes) > 40 else ""))
    body += ["", "## Training command", ""]
    body += (["```bash", info.command, "```"] if info.command else ["Not recorded."])
    if info.results:
        body += ["", "## Results", "", "Single-scale evaluation by `training.evaluate` (`eval.json` in this repo); "
                 "unseen classes were never seen in training.", "", *_results_table(info)]
    body += ["", *_usage(info)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
