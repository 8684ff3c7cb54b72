"""Grammar-constrained sampling over random logits: every sampled sequence is in the language."""

import json
import re

import pytest
import torch

from tessera.formats import open_checkpoint
from tessera.sampling import GrammarCompiler, Sampler, SamplingParams, SamplingRow, StructuredOutput

pytestmark = pytest.mark.usefixtures("default_model_path")  # skips where the model is absent


@pytest.fixture(scope="module")
def setup(default_model_path):
    tok = open_checkpoint(default_model_path).tokenizer()
    return tok, GrammarCompiler(tok.hf.to_str(), tok.vocab_size, tok.eos_token_ids)


def sample_constrained(tok, compiler, spec, seed, steps=60):
    """Random logits at every step (a model that knows nothing): only the grammar shapes the text."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0, structured=spec)
    row = SamplingRow(params, None, matcher=compiler.matcher(spec), matcher_vocab=compiler.vocab_size)
    out = []
    sampler = Sampler(eos_token_ids=tok.eos_token_ids)
    for _ in range(steps):
        logits = torch.randn(1, tok.vocab_size, generator=g) * 3
        (t,) = sampler(logits, [row]).token_ids
        if t in tok.eos_token_ids:
            return tok.decode(out), True
        out.append(t)
        row.output_token_ids = out
    return tok.decode(out), False


@pytest.mark.parametrize("seed", range(5))
def test_regex_constrained_samples_match_the_regex(setup, seed):
    tok, compiler = setup
    text, done = sample_constrained(tok, compiler, StructuredOutput(regex=r"[a-c]{2,5}-\d\d"), seed)
    assert done and re.fullmatch(r"[a-c]{2,5}-\d\d", text)


@pytest.mark.parametrize("seed", range(3))
def test_choice_constrained_samples_are_one_of_the_choices(setup, seed):
    tok, compiler = setup
    text, done = sample_constrained(tok, compiler, StructuredOutput(choice=["red", "green", "blue"]), seed)
    assert done and text in ("red", "green", "blue")


def test_json_schema_samples_parse_when_finished(setup):
    tok, compiler = setup
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    text, done = sample_constrained(
        tok, compiler, StructuredOutput(json_schema=json.dumps(schema)), 0, steps=40
    )
    assert done and json.loads(text) in ({"ok": True}, {"ok": False})


def test_bad_constraints_are_refused_by_name(setup):
    _, compiler = setup
    with pytest.raises(ValueError, match="grammar is invalid"):
        compiler.validate(StructuredOutput(regex="[a-"))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutput(regex="a", choice=["a"]).grammar_spec()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput(json_schema="{nope").grammar_spec()
