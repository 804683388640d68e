import torch
import torch.nn.functional as F

from mvpseg import LearnedPrompts, TemplatePrompts


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_encode_text_matches_open_clip(tiny):
    texts = ["a photo of a cat.", "a dog", "there is the traffic light in the scene.", "sky"]
    ours = tiny.encode_text(texts)
    ref = F.normalize(tiny.model.encode_text(tiny.tokenize(texts)), dim=-1)
    assert _rel_err(ours, ref) < 1e-5


def test_truncated_learned_prompts_match_full_length(tiny):
    torch.manual_seed(1)
    prompts = LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=32)
    names = ["cat", "dining table", "tv monitor", "sky"]
    prefix, suffix, eot = prompts._frozen_tokens(tiny, tuple(names))
    x = torch.cat([prefix, prompts.ctx[1].unsqueeze(0).expand(4, -1, -1), suffix], 1)
    with torch.no_grad():
        cut = tiny.encode_embeddings(x, eot, truncate=True)
        full = tiny.encode_embeddings(x, eot, truncate=False)
    assert int(eot.max()) + 1 < x.shape[1]  # truncation really skips positions
    assert _rel_err(cut, full) < 1e-5


def test_chunked_templates_match_full_length_and_keep_order(tiny):
    names = [f"class {i}" for i in range(7)]
    sentences = [t.format(n) for t in TemplatePrompts.maskclip85().views[0][:20] for n in names]
    tokens = tiny.tokenize(sentences)
    emb = tiny.token_embeddings(tokens)
    with torch.no_grad():
        chunked = tiny.encode_embeddings(emb, tokens.argmax(-1), chunk_size=16)
        full = tiny.encode_embeddings(emb, tokens.argmax(-1), truncate=False)
    assert _rel_err(chunked, full) < 1e-5
