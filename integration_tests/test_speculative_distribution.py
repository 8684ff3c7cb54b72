"""Exactness of speculative decoding through the whole engine: on a tiny random-weight Llama, the
first output tokens sampled (unseeded) with speculation have the distribution they have without
it (chi-square tests on contingency tables), for plain, top-k/top-p and penalised sampling, with
n-gram drafts, greedy drafts of a second random model (method "draft_model") and drafts sampled
from a random bigram model (through the engine's Proposer interface: its distributions reach the
rejection sampler); and seeded requests get the very same tokens either way."""

import collections

import pytest
import torch

transformers = pytest.importorskip("transformers")
stats = pytest.importorskip("scipy.stats")

from tessera.engine import LLM  # noqa: E402
from tessera.sampling import SamplingParams  # noqa: E402
from tessera.spec_decode import Drafts  # noqa: E402

from .test_engine_random_models import save_word_tokenizer  # noqa: E402

VOCAB = 160
MAX_TOKENS = 5
N = 1500  # samples per arm
CYCLE_LOGIT = 6.0
# a repetitive prompt, so that prompt lookup drafts after most tokens
PROMPT = [20, 21, 22, 23, 24, 20, 21, 22, 23, 24, 20, 21, 22]
# adaptive off: the batch is large, and the adaptive policy would rightly not speculate
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
    "adaptive": False,
}
SETTINGS = {
    "plain": dict(temperature=1.0),
    "top_k_top_p": dict(temperature=1.0, top_k=8, top_p=0.9),
    "penalised": dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.3),
}


def build_model(folder, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
        # a model that mostly continues the prompt's cycle, so that drafts are often (not always)
        # accepted: norms of weight 1, layers that add little to the residual, and each cycle
        # token's head row pointed at the embedding of the token before it
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.02)
        model.lm_head.weight.mul_(0.5)
        emb = model.model.embed_tokens.weight.mul_(5.0)
        for a, b in zip(PROMPT[:5], PROMPT[1:6], strict=True):
            model.lm_head.weight[b] += CYCLE_LOGIT * emb[a] / emb[a].norm() / 8
    model.save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny-llama"), 0)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """Another random model built the same way: it also follows the prompt's cycle, so that its
    greedy drafts are accepted often, not always."""
    return build_model(tmp_path_factory.mktemp("tiny-llama-draft"), 1)


class BigramDraft:
    """Drafts sampled token by token from a random bigram table (softmax of a row chosen by the
    last token), nudged toward the prompt's cycle so that acceptance is moderate."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.logits = torch.randn(VOCAB, VOCAB, generator=g)
        for a, b in zip(PROMPT[:5], PROMPT[1:6], strict=True):
            self.logits[a, b] += 3.0

    forward_seconds = 0.0

    def catch_up_tokens(self, request) -> int:
        return 0

    def release(self, request_ids) -> None:
        pass

    def draft(self, requests, ks) -> Drafts:
        tokens, rows = [], []
        for r, k in zip(requests, ks, strict=True):
            last, d = r.token_ids[-1], []
            for _ in range(k):
                q = self.logits[last].softmax(-1)
                last = int(torch.multinomial(q, 1))
                d.append(last)
                rows.append(q)
            tokens.append(d)
        return Drafts(tokens, torch.stack(rows) if rows else None)


@pytest.fixture(scope="module")
def engines(model_dir, draft_dir):
    # the bigram proposer replaces the in-process runner's
    kw = dict(dtype="float32", kv_cache_memory=64 * 2**20, max_model_len=64, max_num_seqs=256)
    kw["distributed_executor_backend"] = "uni"
    plain = LLM(str(model_dir), **kw)
    ngram = LLM(str(model_dir), speculative_config=NGRAM, **kw)
    draft = LLM(str(model_dir), speculative_config=NGRAM, **kw)
    draft.engine.runner.proposer = BigramDraft()
    draft_model = LLM(
        str(model_dir),
        speculative_config={
            "method": "draft_model",
            "model": str(draft_dir),
            "num_speculative_tokens": 3,
            "adaptive": False,
        },
        **kw,
    )
    return {"plain": plain, "ngram": ngram, "draft": draft, "draft_model": draft_model}


def samples(llm: LLM, params: SamplingParams, n: int) -> list[tuple[int, ...]]:
    return [tuple(o.token_ids) for o in llm.generate([PROMPT] * n, params)]


def chi2_p(a: list, b: list) -> float:
    """p-value of a chi-square test that ``a`` and ``b`` come from one distribution, categories
    with fewer than 10 samples in both together pooled."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    big = [k for k in ca.keys() | cb.keys() if ca[k] + cb[k] >= 10]
    rows = [[ca[k] for k in big], [cb[k] for k in big]]
    rows[0].append(len(a) - sum(rows[0]))
    rows[1].append(len(b) - sum(rows[1]))
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [r[:-1] for r in rows]
    return stats.chi2_contingency(rows).pvalue


@pytest.mark.parametrize("proposer", ["ngram", "draft", "draft_model"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_speculation_keeps_the_distribution_of_the_first_tokens(engines, setting, proposer):
    plain, spec = engines["plain"], engines[proposer]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **SETTINGS[setting])
    torch.manual_seed(1)
    ref = samples(plain, params, N)
    before = spec.stats()
    got = samples(spec, params, N)
    s = spec.stats()
    drafted = s.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = s.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert accepted >= 50 and drafted - accepted >= 50, (accepted, drafted)  # both outcomes happen
    # each position's marginal, and the joint law of the second and third tokens
    for pos in range(1, MAX_TOKENS):
        p = chi2_p([t[pos] for t in ref], [t[pos] for t in got])
        assert p > 1e-3, f"{setting}: token {pos}: p = {p:.2g}"
    p = chi2_p([t[1:3] for t in ref], [t[1:3] for t in got])
    assert p > 1e-3, f"{setting}: tokens 1-2 jointly: p = {p:.2g}"


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_seeded_requests_sample_the_same_tokens_with_speculation(engines, setting, proposer):
    plain, spec = engines["plain"], engines[proposer]
    params = [SamplingParams(max_tokens=12, ignore_eos=True, seed=s, **SETTINGS[setting]) for s in range(16)]
    before = spec.stats().spec_num_drafts
    ref = [o.token_ids for o in plain.generate([PROMPT] * 16, params)]
    got = [o.token_ids for o in spec.generate([PROMPT] * 16, params)]
    assert got == ref
    assert spec.stats().spec_num_drafts > before


@pytest.mark.parametrize("which", ["other_vocabulary", "missing"])
def test_a_bad_draft_model_is_refused_before_any_weight_loads(
    default_model_path, draft_dir, monkeypatch, which
):
    import tessera.engine.worker as worker_module  # where LLM's weights load

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the draft was checked")

    monkeypatch.setattr(worker_module, "load_model", no_loading)
    model, message = {
        "other_vocabulary": (
            str(draft_dir),
            "another vocabulary than the target .* a draft model must share",
        ),
        "missing": (str(draft_dir / "nowhere.gguf"), "no such file"),
    }[which]
    config = {"method": "draft_model", "model": model, "num_speculative_tokens": 4}
    with pytest.raises(Exception, match=message):
        LLM(str(default_model_path), speculative_config=config)
