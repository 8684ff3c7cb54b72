"""Speculative verification under a JSON schema with the default model's tokenizer: n-gram drafts
(which often leave the grammar), masks computed over each draft and rolled back, the rejection
sampler; the matcher advances over the kept tokens only, and every finished text parses and fits
the schema (checked by jsonschema)."""

import json

import jsonschema
import pytest
import torch

from tessera.formats import open_checkpoint
from tessera.sampling import (
    GrammarCompiler,
    Sampler,
    SamplingParams,
    SamplingRow,
    StructuredOutput,
    make_generator,
    speculative_rows,
)
from tessera.spec_decode import NgramProposer, rejection_sample

pytestmark = pytest.mark.usefixtures("default_model_path")  # skips where the model is absent

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    },
    "required": ["ok", "n", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup(default_model_path):
    tok = open_checkpoint(default_model_path).tokenizer()
    return tok, GrammarCompiler(tok.hf.to_str(), tok.vocab_size, tok.eos_token_ids)


@pytest.mark.parametrize("seed", range(4))
def test_speculative_samples_under_a_json_schema_fit_it(setup, seed):
    tok, compiler = setup
    spec = StructuredOutput(json_schema=json.dumps(SCHEMA))
    matcher = compiler.matcher(spec)
    # text for prompt lookup to copy from: some of it fits the grammar, some does not
    prompt = tok.encode('e.g. {"ok":true,"n":12,"tags":["red","green"]} or {"ok": no, "n":"x"}')
    params = SamplingParams(temperature=1.0, seed=seed, structured=spec)
    row = SamplingRow(
        params, make_generator(seed, torch.device("cpu")), prompt, [], matcher, compiler.vocab_size
    )
    ngram, sampler = NgramProposer(1, 3, 4), Sampler(eos_token_ids=tok.eos_token_ids)
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    accepted = drafted = 0
    for _ in range(80):
        draft = ngram.propose(prompt + out)
        rows = speculative_rows(row, draft)
        # random logits that favour the draft, so that some drafts are accepted and some not
        logits = torch.randn(len(rows), tok.vocab_size, generator=g) * 2
        logits[range(len(draft)), draft] += 6.0
        result = rejection_sample(sampler.probabilities(logits, rows), [draft], [row])
        new = result.token_ids[0]
        accepted, drafted = accepted + result.num_accepted[0], drafted + len(draft)
        stop = next((i for i, t in enumerate(new) if t in tok.eos_token_ids), None)
        kept = new if stop is None else new[:stop]
        # the matcher advances over the kept tokens only (a stopped matcher refuses EOS itself)
        assert matcher.consume_tokens(kept), f"a kept token left the grammar: {tok.decode(out + kept)!r}"
        out += kept
        row.output_token_ids = out
        if stop is not None:
            assert matcher.is_accepting(), f"EOS before the grammar was complete: {tok.decode(out)!r}"
            break
    else:
        pytest.fail(f"no EOS after 80 steps: {tok.decode(out)!r}")
    jsonschema.validate(json.loads(tok.decode(out)), SCHEMA)
    assert 0 < accepted < drafted  # both acceptance and rejection happened
