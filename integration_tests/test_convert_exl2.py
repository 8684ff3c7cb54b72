"""``tessera convert --to exl2`` on tiny random 2-layer Llamas made here (an HF folder, a GGUF file
written with the ``gguf`` package, a GPTQModel-made GPTQ checkpoint):

- the allocation hits the bits-per-weight budget and gives more bits where the measured error is
  larger; reusing the written measurement.json gives the same allocation;
- the written folder reloads with tessera, and its logits equal transformers' on the weights that
  a dequantizer written from exllamav2's source (``packages/formats/tests/test_exl2.py``) reads
  from the folder; the packed path runs its linears as InputSegments;
- bad input is refused before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.engine.convert import Calibration  # noqa: E402
from tessera.engine.convert_exl2 import convert_exl2  # noqa: E402
from tessera.formats import FormatError, open_checkpoint  # noqa: E402
from tessera.models import load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402

ROOT = Path(__file__).parents[1]
GPTQ_SOURCE = ROOT / "packages/formats/tests/fixtures/gptq/gptq-4bit-g32-actorder-asym-v1"
VOCAB = 96
PROMPT = [3, 17, 42, 9, 5, 50, 77, 8, 23, 64, 11, 2]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


reference_dequantize = _module(
    ROOT / "packages/formats/tests/test_exl2.py", "exl2_reference"
).reference_dequantize


def quiet(_s: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2, untied head) with a word-level tokenizer; the
    second layer's MLP is scaled up so that its linears are harder to quantize."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t1"}))
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """60 paragraphs of random words t2..t95 (48 calibrate, 12 are held out)."""
    g = torch.Generator().manual_seed(1)
    words = torch.randint(2, VOCAB, (60, 60), generator=g).tolist()
    path = tmp_path_factory.mktemp("text") / "cal.txt"
    path.write_text("\n\n".join(" ".join(f"t{i}" for i in row) for row in words))
    return path


CAL_ROWS, CAL_LENGTH = 16, 64


@pytest.fixture(scope="module")
def converted(tiny, text, tmp_path_factory):
    """``(folder, report)`` of the tiny model at 4.25 bpw, measured on the way."""
    dst = tmp_path_factory.mktemp("exl2") / "out"
    report = convert_exl2(tiny, dst, 4.25, Calibration(text, CAL_ROWS, CAL_LENGTH), log=quiet)
    assert [p.name for p in dst.parent.iterdir()] == ["out"]  # no state, measurement or staging left
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not a private temporary one
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in dst.iterdir())
    return dst, report


def reference_model(folder: Path) -> torch.nn.Module:
    """transformers' Llama on the folder's tensors, each EXL2 linear as exllamav2 reads it: the
    reference dequantizer's fp16 weights equal our reader's rounded to fp16 (exllamav2 rounds the
    product of scale and integer to fp16), and the model takes our reader's exact products."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config")
    stored = load_file(folder / "model.safetensors")
    ours = dict(open_checkpoint(folder).weights())
    state = {n: t.float() for n, t in stored.items() if ".q_" not in n}
    for prefix in {n.rsplit(".", 1)[0] for n in stored if n.endswith(".q_weight")}:
        parts = {
            k: stored[f"{prefix}.{k}"]
            for k in ("q_weight", "q_groups", "q_scale", "q_scale_max", "q_invperm")
        }
        ref = torch.from_numpy(reference_dequantize(parts).copy())
        assert torch.equal(ours[f"{prefix}.weight"].dequantize(torch.float16), ref), prefix
        state[f"{prefix}.weight"] = ours[f"{prefix}.weight"].dequantize(torch.float32)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def assert_logits_are_the_references(folder: Path, quantized_head: bool) -> None:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert ("lm_head.q_weight" in f.keys()) == quantized_head
    ours = load_model(open_checkpoint(folder), torch.float32)
    (got,) = forward_chunks(ours, [[PROMPT[:5], PROMPT[5:]]], block_size=4)
    with torch.no_grad():
        want = reference_model(folder)(torch.tensor([PROMPT])).logits[0]
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_the_allocation_spends_the_budget_and_gives_the_harder_linears_more_bits(converted):
    folder, report = converted
    assert 4.25 - 0.05 <= report.bpw <= 4.25
    doc = json.loads((folder / "measurement.json").read_text())["measurement"]
    assert len(doc) == 14 and all(len(v) == 12 for v in doc.values())
    chosen = {
        n: next(e for e in doc[n] if _desc(e, n) == report.plan[n])["total_bits"] / _numel(folder, n)
        for n in doc
    }
    error_at_4 = {n: next(e["error"] for e in doc[n] if _desc(e, n) == "1.0:4b_128g s4") for n in doc}
    hardest = sorted(doc, key=error_at_4.get)
    # the linears with the largest error at 4 bits get more bits than those with the smallest
    assert sum(chosen[n] for n in hardest[-4:]) > sum(chosen[n] for n in hardest[:4])
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "exl2" and cfg["bits"] == 4.25 and cfg["head_bits"] == 6


def _desc(entry: dict, name: str) -> str:
    from tessera.formats.quantize.exl2_options import EXL2Option

    return EXL2Option.from_dict(entry[name.rsplit(".", 1)[1]]).desc


def _numel(folder: Path, name: str) -> int:
    shapes = json.loads((folder / "measurement.json").read_text())["tessera"]["shapes"]
    return shapes[name][0] * shapes[name][1]


def test_the_folder_reloads_and_its_logits_are_transformers_on_the_reference_weights(converted):
    folder, _ = converted
    assert_logits_are_the_references(folder, quantized_head=True)


def test_the_packed_path_runs_the_written_linears_as_input_segments(converted):
    from tessera.kernels import InputSegments
    from tessera.kernels_cpu import native

    if native.library() is None:
        pytest.skip("no C kernels on this machine")
    folder, _ = converted
    ours = load_model(open_checkpoint(folder), torch.float32, packed_weights=True)
    assert all(isinstance(ly.self_attn.o_proj.weight, InputSegments) for ly in ours.layers)
    (got,) = forward_chunks(ours, [[PROMPT[:5], PROMPT[5:]]], block_size=4)
    with torch.no_grad():
        want = reference_model(folder)(torch.tensor([PROMPT])).logits[0]
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_reused_measurement_gives_the_same_allocation(tiny, text, converted, tmp_path):
    folder, report = converted
    again = convert_exl2(
        tiny, tmp_path / "again", 4.25, Calibration(text, CAL_ROWS, CAL_LENGTH),
        measurement=folder / "measurement.json", log=quiet,
    )  # fmt: skip
    assert not again.measured and again.plan == report.plan
    lower = convert_exl2(
        tiny, tmp_path / "lower", 3.6, Calibration(text, CAL_ROWS, CAL_LENGTH),
        measurement=folder / "measurement.json", log=quiet,
    )  # fmt: skip
    assert 3.55 <= lower.bpw <= 3.6


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"bpw": 3.0}, ValueError, "can be stored at"),
        ({"bpw": 9.0}, ValueError, "can be stored at"),
        ({"rows": 500}, FormatError, "not the 500 requested"),
        ({"head_bits": 7}, ValueError, "--head-bits 7"),
        ({"measure_rows": 0}, ValueError, "--measure-rows 0"),
        ({"exists": True}, ValueError, "already exists"),
        ({"measurement": "bad"}, FormatError, "not a readable measurement.json"),
        ({"measurement": "other"}, FormatError, "no measurement of model.layers.0.self_attn.q_proj"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tiny, text, tmp_path, change, error, message):
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "out"
    if change.get("exists"):
        dst.mkdir()
    measurement = None
    if change.get("measurement") == "bad":
        measurement = tmp_path / "m.json"
        measurement.write_text("{not json")
    elif change.get("measurement") == "other":
        measurement = tmp_path / "m.json"
        measurement.write_text(json.dumps({"measurement": {"model.layers.0.mlp": []}}))
    before = sorted(p.name for p in work.iterdir())
    with pytest.raises(error, match=message):
        convert_exl2(
            tiny, dst, change.get("bpw", 4.0), Calibration(text, change.get("rows", 4), 32),
            head_bits=change.get("head_bits", 6), measurement=measurement,
            measure_rows=change.get("measure_rows", 32), log=quiet,
        )  # fmt: skip
    assert sorted(p.name for p in work.iterdir()) == before


def test_a_gguf_source_converts(tmp_path):
    """A Q4_0 GGUF written with the ``gguf`` package (tools/bench/make_random_gguf.py: untied
    Q8_0 output, byte tokens), dequantized, then EXL2 with a quantized head."""
    make = _module(ROOT / "tools/bench/make_random_gguf.py", "make_random_gguf")
    src = make.write(
        str(tmp_path / "tiny.gguf"),
        layers=2,
        hidden=64,
        ffn=128,
        heads=4,
        kv_heads=2,
        vocab=288,
        scheme="Q4_0",
    )
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 10, (40, 30), generator=g).tolist()
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(" ".join("abcdefghij"[i] * 3 for i in row) for row in rows))
    report = convert_exl2(src, tmp_path / "out", 4.0, Calibration(text, 8, 64), log=quiet)
    assert 3.95 <= report.bpw <= 4.0 and report.head == "0.15:8b_128g/0.85:6b_128g s4"
    assert_logits_are_the_references(tmp_path / "out", quantized_head=True)


def test_a_gptq_source_converts(tmp_path):
    """GPTQModel's 4-bit act-order checkpoint (tools/make_gptq_fixtures.py), dequantized, then
    EXL2 at 4 bpw; its word tokenizer takes the calibration text."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(2, 160, (40, 40), generator=g).tolist()
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(" ".join(f"t{i}" for i in row) for row in rows))
    report = convert_exl2(GPTQ_SOURCE, tmp_path / "out", 4.0, Calibration(text, 8, 48), log=quiet)
    assert 3.95 <= report.bpw <= 4.0
    assert_logits_are_the_references(tmp_path / "out", quantized_head=True)


def test_fit_memory_takes_the_bpw_recommend_picks_and_says_so(monkeypatch, capsys):
    from tessera.engine import recommend
    from tessera.engine.cli import build_parser
    from tessera.engine.convert_exl2_cli import _bpw

    seen = []
    monkeypatch.setattr(recommend, "exl2_bpw_for", lambda *a: seen.append(a) or (4.5, "fp8"))
    ns = build_parser().parse_args(
        ["convert", "m", "d", "--to", "exl2", "--fit-memory", "2GiB", "--context", "4096", "--device", "cuda"]
    )
    assert _bpw(ns) == 4.5 and seen == [("m", "cuda", 2 * 2**30, 4096, 1)]
    assert "4.5 bpw (KV cache: fp8)" in capsys.readouterr().err
    for args in (["--bpw", "4", "--fit-memory", "2GiB", "--context", "9"], []):
        with pytest.raises(ValueError, match="exactly one of --bpw and --fit-memory"):
            _bpw(build_parser().parse_args(["convert", "m", "d", "--to", "exl2", *args]))
    with pytest.raises(ValueError, match="needs --context"):
        _bpw(build_parser().parse_args(["convert", "m", "d", "--to", "exl2", "--fit-memory", "2GiB"]))


def test_a_tied_head_is_written_as_its_own_quantized_lm_head(tiny, text, tmp_path):
    """A head tied to the embeddings is read every decode token: it is written as a separate
    6-bit lm_head (config.json unties it; the embedding table stays as it was), and the folder's
    logits are the references'."""
    from safetensors.torch import load_file, save_file

    tied = tmp_path / "tied"
    shutil.copytree(tiny, tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    tensors = load_file(tied / "model.safetensors")
    tensors.pop("lm_head.weight")
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "out"
    report = convert_exl2(tied, dst, 4.25, Calibration(text, CAL_ROWS, CAL_LENGTH), log=quiet)
    assert report.head.endswith("untied")
    assert json.loads((dst / "config.json").read_text())["tie_word_embeddings"] is False
    stored = load_file(dst / "model.safetensors")
    embed = stored["model.embed_tokens.weight"].float()
    torch.testing.assert_close(embed, tensors["model.embed_tokens.weight"])
    assert_logits_are_the_references(dst, quantized_head=True)
