"""Hub round trip, offline: ``push`` (dry run: the repo folder and its model card; a real upload with HfApi mocked)
and the reading side (library, ``build_predictor``, the demo's Hub box, ``mvpseg pull``) on a local Hugging Face
cache populated from the pushed folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mvpseg
from fixtures_data import make_voc, write_tiny_clip
from mvpseg import hub
from mvpseg.__main__ import main as cli
from mvpseg.clip_backbone import ClipSpec, load_clip
from mvpseg.hub.card import CardError, CardInfo, base_model_of, render_card
from mvpseg.student import FORMAT as STUDENT_FORMAT, StudentConfig, StudentNet, load_student, save_student

REPO = "someone/tiny-prompts"
STUDENT_REPO = "someone/tiny-student"
COMMAND = "python -m training.train_prompts --dataset voc --max-iters 6"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny CLIP, prompts saved with a recorded training config and command, and training.evaluate's real
    results.json for them (2 images)."""
    from training import evaluate

    root = tmp_path_factory.mktemp("hub")
    make_voc(root / "data")
    clip_args = write_tiny_clip(root / "clip")
    clip = load_clip(ClipSpec("mvpseg-tiny", clip_args[5], model_config=clip_args[3]))
    torch.manual_seed(0)
    prompts = mvpseg.LearnedPrompts(clip.text_width, n_seg=3, n_ctx=8)
    ckpt = mvpseg.save_prompts(root / "run" / "best.safetensors", prompts, clip, training_classes=("cat", "dog"),
                               extra={"train_config": {"dataset": "voc20", "max_iters": 6}, "command": COMMAND})
    evaluate.main(["--data", f"voc={root / 'data' / 'VOCdevkit'}", "--prompts", f"mine={ckpt}", "--baselines",
                   "maskclip-85", "--limit", "2", "--out", str(root / "eval"), *clip_args, "--device", "cpu",
                   "--num-workers", "0", "--no-progress"])
    return root, clip, ckpt, root / "eval" / "results.json"


def front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def populate_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """Lays ``folder`` out as huggingface_hub's cache does after a download: blobs named by their hash, the
    snapshot's files as relative symlinks to them, refs/main holding the commit."""
    base = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, base / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that every reader (default cache included) uses; the Hub is offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when huggingface_hub was imported
    return cache


def test_dry_run_writes_the_repo_with_a_valid_card(env, tmp_path):
    root, clip, ckpt, results = env
    out = hub.push(ckpt, REPO, eval_json=results, dry_run_dir=tmp_path / "repo")
    assert out.kind == "prompts" and out.url is None
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(out.files) == [
        "README.md", "eval.json", "prompts.json", "prompts.safetensors"]
    # the checkpoint is copied under the names the reading side defaults to, byte for byte
    assert (tmp_path / "repo" / hub.PROMPTS_FILE).read_bytes() == ckpt.read_bytes()
    assert (tmp_path / "repo" / "prompts.json").read_bytes() == ckpt.with_suffix(".json").read_bytes()

    meta, body = front_matter(tmp_path / "repo" / "README.md")
    assert meta["library_name"] == "mvpseg"
    assert meta["tags"] == ["open-vocabulary-segmentation", "clip", "mvp-seg", "prompt-learning"]
    assert meta["datasets"] == ["voc20"]
    assert "base_model" not in meta  # a local weights file: no Hub id to name
    assert meta["mvpseg"]["clip_model"] == "mvpseg-tiny" and meta["mvpseg"]["dense_mode"] == clip.dense_mode
    # model-index: this checkpoint's row of the evaluation ("mine"), not the baseline's
    row = json.loads(results.read_text())["results"]["voc20"]["mine"]
    (entry,) = meta["model-index"]
    assert entry["name"] == REPO
    (res,) = entry["results"]
    assert res["task"]["type"] == "image-segmentation" and res["dataset"] == {"name": "voc20", "type": "voc20"}
    got = {m["name"]: m["value"] for m in res["metrics"]}
    assert got == {"mIoU (seen classes)": row["miou_seen"], "mIoU (unseen classes)": row["miou_unseen"],
                   "hIoU (harmonic mean of seen and unseen mIoU)": row["hiou"], "mIoU (all classes)": row["miou"]}
    # huggingface_hub reads the card back (the Hub's own parser of model-index)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert [r.metric_value for r in card.data.eval_results] == [row["miou_seen"], row["miou_unseen"], row["hiou"],
                                                                 row["miou"]]
    # body: the recorded command, how to load it in the demo and in Python
    assert f"```bash\n{COMMAND}\n```" in body
    assert "`hf-hub:someone/tiny-prompts`" in body and 'checkpoints={"learned": "hf-hub:someone/tiny-prompts"}' in body
    assert "| voc20 | **mine** (this checkpoint) |" in body and "| voc20 | maskclip-85 |" in body
    # command= overrides the recorded one; the CLI does the same dry run
    hub.push(ckpt, REPO, command="my command", dry_run_dir=tmp_path / "repo2")
    assert "```bash\nmy command\n```" in front_matter(tmp_path / "repo2" / "README.md")[1]
    assert "model-index" not in front_matter(tmp_path / "repo2" / "README.md")[0]  # no --eval: no metrics
    assert cli(["push", str(ckpt), REPO, "--eval", str(results), "--dry-run", str(tmp_path / "repo3")]) == 0
    assert (tmp_path / "repo3" / "README.md").read_text() == (tmp_path / "repo" / "README.md").read_text()


def test_base_model_is_the_clip_on_the_hub():
    assert base_model_of("RN50", "openai") == "timm/resnet50_clip.openai"  # open_clip's record of the weights
    laion = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert base_model_of(f"hf-hub:{laion}", None) == laion
    assert base_model_of("mvpseg-tiny", "/tmp/tiny.safetensors") is None
    assert base_model_of("RN50", None) is None
    # in a card: prompts learned on OpenAI's RN50 name its Hub repo as base_model
    meta = {"format": "mvpseg-prompts", "clip_model": "RN50", "clip_pretrained": "openai", "n_seg": 3, "n_ctx": 32,
            "use_global": True, "training_classes": ["cat"], "normalization": "imagenet", "dense_mode": "maskclip",
            "extra": {"train_config": {"dataset": "folder"}}}
    card = render_card(CardInfo.from_meta("prompts", meta, REPO, hub.PROMPTS_FILE))
    fm = yaml.safe_load(card.split("\n---\n", 1)[0][4:])
    assert fm["base_model"] == "timm/resnet50_clip.openai" and "datasets" not in fm  # a local folder: not named
    assert "--clip RN50 --pretrained openai" in card and "local file" not in card


def test_pull_reads_exactly_the_pushed_layout(env, tmp_path, hf_cache, capsys):
    root, clip, ckpt, results = env
    hub.push(ckpt, REPO, eval_json=results, dry_run_dir=tmp_path / "repo")
    commit = populate_cache(hf_cache, REPO, tmp_path / "repo")
    original = load_file(str(ckpt))

    # library: the default file name is what push wrote
    path = hub.download(f"hf-hub:{REPO}")
    assert path == hf_cache / "models--someone--tiny-prompts" / "snapshots" / commit / "prompts.safetensors"
    prompts = hub.load_prompts_from_hub(f"hf-hub:{REPO}", clip)
    assert all(torch.equal(prompts.checkpoint_tensors()[k], original[k]) for k in original)
    assert prompts.meta.extra["command"] == COMMAND
    pred = mvpseg.build_predictor(clip, checkpoints={"learned": f"hf-hub:{REPO}"}, baselines=False)
    assert torch.equal(pred.prompt_set("learned").checkpoint_tensors()["ctx"], original["ctx"])

    # the demo's Hub box
    from demo.sources import prompts_from_hub

    source = prompts_from_hub(f"hf-hub:{REPO}", clip)
    assert source.origin == f"hf-hub:{REPO}/prompts.safetensors"
    assert all(torch.equal(source.prompts.checkpoint_tensors()[k], original[k]) for k in original)

    # the command line prints the local path
    assert cli(["pull", f"hf-hub:{REPO}"]) == 0
    assert capsys.readouterr().out.strip() == str(path)


def test_missing_files_and_bad_references(env, hf_cache, capsys):
    from demo.sources import DemoInputError, parse_hub_ref, prompts_from_hub

    _, clip, _, _ = env
    with pytest.raises(hub.HubError, match=r"Could not get prompts.safetensors and prompts.json from "
                                           r"hf-hub:someone/absent: the Hugging Face Hub is not reachable"):
        hub.download("hf-hub:someone/absent")
    with pytest.raises(DemoInputError, match=r"Could not get .* Download the two files elsewhere"):
        prompts_from_hub("hf-hub:someone/absent", clip)
    assert hub.parse_hub_ref("hf-hub:org/repo") == parse_hub_ref("hf-hub:org/repo") == ("org/repo",
                                                                                        "prompts.safetensors")
    assert hub.parse_hub_ref("org/repo", hub.STUDENT_FILE) == ("org/repo", "student.safetensors")
    assert hub.parse_hub_ref("hf-hub:org/repo/sub/p.safetensors") == ("org/repo", "sub/p.safetensors")
    for bad in ("org", "hf-hub:org/repo/../x.safetensors", "org/repo/weights.bin"):
        with pytest.raises(hub.HubError, match="Hub reference"):
            hub.parse_hub_ref(bad)
        with pytest.raises(DemoInputError, match="Hub reference"):
            parse_hub_ref(bad)
    assert cli(["pull", "hf-hub:someone/absent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not get") and err.count("\n") == 1


def test_student_round_trip(env, tmp_path, hf_cache):
    root, clip, ckpt, _ = env
    assert hub.STUDENT_FORMAT == STUDENT_FORMAT
    torch.manual_seed(1)
    net = StudentNet(StudentConfig("resnet-tiny", "deeplabv2", clip.embed_dim, background=True), None).eval()
    teacher = mvpseg.load_prompts(ckpt, clip)
    path = save_student(tmp_path / "s" / "student_final.safetensors", net, teacher, clip,
                        class_names=("background", "cat", "dog"), background_index=0, unseen=(2,), seen_penalty=0.5,
                        extra={"train_config": {"dataset": "context60", "max_iters": 4},
                               "command": "python -m training.distill --dataset context"})
    evals = {"header": {}, "results": {  # distill's eval.json: one dataset, methods at the top level
        "MVP-SEG+ (student)": {"miou": 30.0, "miou_seen": 35.0, "miou_unseen": 20.0, "hiou": 25.45},
        "MVP-SEG+ (student, no seen penalty)": {"miou": 29.0, "miou_seen": 37.0, "miou_unseen": 17.0, "hiou": 23.3},
        "MVP-SEG (teacher)": {"miou": 25.0, "miou_seen": 30.0, "miou_unseen": 15.0, "hiou": 20.0}}}
    (tmp_path / "eval.json").write_text(json.dumps(evals))
    out = hub.push(path, STUDENT_REPO, eval_json=tmp_path / "eval.json", dry_run_dir=tmp_path / "repo")
    assert out.kind == "student"
    assert sorted(out.files) == ["README.md", "eval.json", "student.json", "student.safetensors"]
    meta, body = front_matter(tmp_path / "repo" / "README.md")
    assert meta["tags"][-1] == "distillation" and meta["datasets"] == ["context60"]
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["mIoU (unseen classes)"] == 20.0 and metrics["hIoU (harmonic mean of seen and unseen mIoU)"] == 25.45
    assert "python -m training.distill --dataset context" in body
    assert "logits lowered by 0.5 at test time" in body  # the card says the student is calibrated
    assert "hf-hub:someone/tiny-student/student.safetensors" in body and 'kind="student"' in body

    populate_cache(hf_cache, STUDENT_REPO, tmp_path / "repo")
    got = hub.download(f"hf-hub:{STUDENT_REPO}", kind="student")
    assert got.name == "student.safetensors"
    loaded = load_student(got, clip)
    ref = net.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.net.state_dict().items())
    assert hub.resolve_checkpoint(str(path), "student") == str(path)  # a local path is left alone


def test_a_real_upload_sends_the_dry_run_folder(env, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    root, _, ckpt, results = env
    calls: dict = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (self.token, repo_id, kw)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}  # the staging folder, at call time
        calls["upload"] = (self.token, repo_id, files, kw)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = hub.push(ckpt, REPO, eval_json=results, token="hf_secret", private=True)
    assert out.url == f"https://huggingface.co/{REPO}/commit/abc" and out.folder is None
    token, repo, kw = calls["create"]
    assert (token, repo, kw["private"], kw["exist_ok"], kw["repo_type"]) == ("hf_secret", REPO, True, True, "model")
    token, repo, files, kw = calls["upload"]
    assert (token, repo, kw["repo_type"]) == ("hf_secret", REPO, "model")
    hub.push(ckpt, REPO, eval_json=results, dry_run_dir=tmp_path / "dry")
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "dry").iterdir()}  # exactly the dry run
    assert "prompts" in kw["commit_message"]


def test_push_refuses_what_it_cannot_describe(env, tmp_path, capsys):
    root, _, ckpt, results = env
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(mvpseg.CheckpointError, match="not an mvpseg prompt checkpoint"):
        hub.push(tmp_path / "x.safetensors", REPO, dry_run_dir=tmp_path / "r1")
    with pytest.raises(hub.HubError, match="not a Hub repo id"):
        hub.push(ckpt, "no-slash", dry_run_dir=tmp_path / "r2")
    two = json.loads(results.read_text())
    two["results"]["voc20"]["other"] = two["results"]["voc20"]["mine"]
    two["datasets"]["voc20"]["unseen_in_training_vocabulary"]["other"] = []
    (tmp_path / "two.json").write_text(json.dumps(two))
    with pytest.raises(CardError, match="several .*--eval-method"):
        hub.push(ckpt, REPO, eval_json=tmp_path / "two.json", dry_run_dir=tmp_path / "r3")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()  # nothing half-written
    hub.push(ckpt, REPO, eval_json=tmp_path / "two.json", eval_method="other", dry_run_dir=tmp_path / "r4")
    assert "**other** (this checkpoint)" in (tmp_path / "r4" / "README.md").read_text()
    assert cli(["push", str(ckpt), REPO, "--eval", str(tmp_path / "two.json"), "--dry-run", str(tmp_path / "r5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the evaluation results hold several") and err.count("\n") == 1
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # nothing here went to the network
