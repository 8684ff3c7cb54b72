"""``tessera convert`` on a tiny random Llama made here:

- the calibration forward, with quantization switched off, is HF transformers' forward (layer by
  layer hidden states);
- the written GPTQ folder reloads with tessera, and GPTQModel (its own loader, in /tmp/gptq-venv)
  reads every linear to the weights our reader reads;
- an interrupted run leaves no destination and resumes to the same result as an uninterrupted one;
- bad input is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.engine import convert as conv  # noqa: E402
from tessera.engine.convert import Calibration, GPTQTarget, QuantizedLinear, convert  # noqa: E402
from tessera.formats import FormatError, GPTQTensor, open_checkpoint  # noqa: E402
from tessera.models import load_model  # noqa: E402

VOCAB = 96
GPTQ_PYTHON = Path("/tmp/gptq-venv/bin/python")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2) with a word-level tokenizer over t0..t95."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
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
def tied(tiny, tmp_path_factory) -> Path:
    """The tiny Llama with its LM head tied to the embeddings (as SmolLM2's is)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("tied")
    for f in tiny.iterdir():
        shutil.copy(f, folder / f.name)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """40 paragraphs of random words: 32 calibrate, 8 are held out."""
    g = torch.Generator().manual_seed(1)
    words = torch.randint(2, VOCAB, (40, 40), generator=g).tolist()
    paras = [" ".join(f"t{i}" for i in row) for row in words]
    path = tmp_path_factory.mktemp("text") / "cal.txt"
    path.write_text("\n\n".join(paras))
    return path


def test_calibration_forward_is_transformers_forward(tiny, text):
    class Identity:
        name = "none"

        def quantize(self, name, weight, hessian):
            return QuantizedLinear({}, weight, 0.0)

    ck = open_checkpoint(tiny)
    model = load_model(ck, torch.float32)
    ids = conv.calibration_rows(ck, Calibration(text, 3, 24))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        want = hf(ids, output_hidden_states=True).hidden_states
    x = model.embed_input_ids(ids.reshape(-1)).reshape(3, 24, -1)
    cos, sin = model.rotary.cos_sin(torch.arange(24), torch.full((24,), 24))
    for i, spec in enumerate(model.layer_specs):
        _, _, x = conv.quantize_layer(f"model.layers.{i}", spec, x, cos, sin, Identity())
        if i + 1 < len(model.layer_specs):  # transformers' last hidden state is after the final norm
            torch.testing.assert_close(x, want[i + 1], atol=1e-4, rtol=1e-4)


def _gptqmodel_weights(folders: list[Path], out: Path) -> list[dict[str, torch.Tensor]]:
    """GPTQModel's own dequantization (in bfloat16, its CPU dtype) of every quantized linear it
    loads from each folder, in one subprocess (importing GPTQModel takes ~15 s)."""
    script = f"""
import torch
from gptqmodel import BACKEND, GPTQModel
from safetensors.torch import save_file
for i, folder in enumerate({[str(f) for f in folders]!r}):
    m = GPTQModel.load(folder, device="cpu", backend=BACKEND.GPTQ_TORCH)
    ref = {{n: mod.dequantize_weight().T.float().contiguous() for n, mod in m.model.named_modules()
            if hasattr(mod, "dequantize_weight")}}
    save_file(ref, {str(out)!r} + f".{{i}}")
"""
    run = subprocess.run([str(GPTQ_PYTHON), "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    return [load_file(f"{out}.{i}") for i in range(len(folders))]


# (sym, act_order): GPTQ v1 with act-order, and v2 (asymmetric zeros) without
VARIANTS = [(True, True), (False, False)]


@pytest.fixture(scope="module")
def converted(tiny, text, tmp_path_factory) -> list[Path]:
    out = []
    for sym, act_order in VARIANTS:
        dst = tmp_path_factory.mktemp("converted") / "out"
        report = convert(tiny, dst, GPTQTarget(4, 32, sym, act_order), Calibration(text, 8, 32), log=print)
        assert len(report.errors) == 14 and max(report.errors.values()) < 0.05
        assert [p.name for p in dst.parent.iterdir()] == ["out"]  # no state or staging left
        out.append(dst)
    return out


def test_converted_gptq_reloads_with_tessera(tiny, converted):
    src = dict(open_checkpoint(tiny).weights())
    for (sym, act_order), dst in zip(VARIANTS, converted, strict=True):
        cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
        assert cfg["checkpoint_format"] == ("gptq" if sym else "gptq_v2") and cfg["desc_act"] == act_order
        ck = open_checkpoint(dst)
        ours = {n: t.dequantize() for n, t in ck.weights() if isinstance(t, GPTQTensor)}
        assert len(ours) == 14
        for name, w in ours.items():  # each its own source weight, moved by GPTQ's compensation
            assert (w - src[name]).norm() / src[name].norm() < 0.5, name
        load_model(ck, torch.float32)
        umask = os.umask(0)
        os.umask(umask)
        assert {f.stat().st_mode & 0o777 for f in dst.iterdir()} == {0o666 & ~umask}  # ordinary files


@pytest.mark.skipif(
    not GPTQ_PYTHON.is_file(),
    reason="GPTQModel's venv /tmp/gptq-venv is absent (tools/make_gptq_fixtures.py says how to make it)",
)
def test_gptqmodel_reads_the_written_folders_as_our_reader_does(converted, tmp_path):
    refs = _gptqmodel_weights(converted, tmp_path / "ref.safetensors")
    for dst, ref in zip(converted, refs, strict=True):
        ours = {n: t.dequantize() for n, t in open_checkpoint(dst).weights() if isinstance(t, GPTQTensor)}
        assert len(ref) == len(ours) == 14
        for name, w in ours.items():
            # bfloat16 on GPTQModel's side: scale and product each rounded (a zero off by one: ~10%)
            torch.testing.assert_close(w, ref[name.removesuffix(".weight")], rtol=2.0**-7, atol=1e-6)


@pytest.fixture(scope="module")
def with_head(tied, text, tmp_path_factory) -> Path:
    """The tied tiny Llama converted with its LM head quantized (8 bits, groups of 32) beside
    asymmetric 4-bit act-order layers (so the file is GPTQ v2 and the head's zeros are v2 too)."""
    dst = tmp_path_factory.mktemp("head") / "out"
    target = GPTQTarget(4, 32, False, True, lm_head_bits=8, lm_head_group_size=32)
    report = convert(tied, dst, target, Calibration(text, 8, 32), log=print)
    assert len(report.errors) == 15 and report.errors["lm_head"] < 0.01
    return dst


def test_a_quantized_lm_head_is_written_as_gptqmodel_writes_it_and_unties_a_tied_head(tied, with_head):
    """config.json says lm_head true with GPTQModel's dynamic rule for it and no longer ties the
    head; the embeddings stay as the source has them; our model's logits are transformers' on
    the same (dequantized) weights."""
    from .test_gptq_checkpoints import transformers_on_our_weights

    cfg = json.loads((with_head / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (
        cfg["tie_word_embeddings"] is False and q["lm_head"] is True and q["checkpoint_format"] == "gptq_v2"
    )
    assert q["dynamic"] == {"lm_head": {"bits": 8, "group_size": 32, "sym": True, "desc_act": False}}
    w = dict(open_checkpoint(with_head).weights())
    src = dict(open_checkpoint(tied).weights())
    head = w["lm_head.weight"]
    assert isinstance(head, GPTQTensor) and (head.bits, head.group_size, head.sym) == (8, 32, True)
    emb = src["model.embed_tokens.weight"]
    assert torch.equal(w["model.embed_tokens.weight"], emb)
    assert (head.dequantize() - emb).norm() / emb.norm() < 0.02
    ids = torch.tensor([[3, 17, 42, 90, 5, 60, 77, 8]])
    with torch.no_grad():
        want = transformers_on_our_weights(with_head)(ids).logits[0]
    ours = load_model(open_checkpoint(with_head), torch.float32)
    from tessera.models.harness import forward_chunks

    (got,) = forward_chunks(ours, [[ids[0, :5].tolist(), ids[0, 5:].tolist()]], block_size=4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    not GPTQ_PYTHON.is_file(),
    reason="GPTQModel's venv /tmp/gptq-venv is absent (tools/make_gptq_fixtures.py says how to make it)",
)
def test_gptqmodel_reads_a_quantized_lm_head_as_our_reader_does(with_head, tmp_path):
    (ref,) = _gptqmodel_weights([with_head], tmp_path / "ref.safetensors")
    ours = {n: t.dequantize() for n, t in open_checkpoint(with_head).weights() if isinstance(t, GPTQTensor)}
    assert len(ref) == len(ours) == 15 and "lm_head" in ref
    for name, w in ours.items():
        torch.testing.assert_close(w, ref[name.removesuffix(".weight")], rtol=2.0**-7, atol=1e-6)


def test_an_interrupted_run_leaves_no_destination_and_resumes_to_the_same_result(
    tiny, text, tmp_path, monkeypatch
):
    cal = Calibration(text, 4, 32)
    target = GPTQTarget(4, 32, True, True)
    whole = tmp_path / "whole"
    convert(tiny, whole, target, cal, log=lambda s: None)

    dst = tmp_path / "out"
    real = conv.quantize_layer

    def fail_on_layer_1(prefix, *args):
        if prefix.endswith(".1"):
            raise RuntimeError("interrupted")
        return real(prefix, *args)

    monkeypatch.setattr(conv, "quantize_layer", fail_on_layer_1)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert(tiny, dst, target, cal, log=lambda s: None)
    assert not dst.exists()
    monkeypatch.setattr(conv, "quantize_layer", real)
    report = convert(tiny, dst, target, cal, resume=True, log=lambda s: None)
    assert report.resumed_at == 1
    a, b = dict(open_checkpoint(whole).weights()), dict(open_checkpoint(dst).weights())
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, GPTQTensor):
            assert torch.equal(x.qweight, y.qweight) and torch.equal(x.scales, y.scales), name
        else:
            assert torch.equal(x, y), name


def test_an_error_while_writing_leaves_no_destination(tiny, text, tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "_write_side_files", lambda ck, folder: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        convert(tiny, tmp_path / "out", GPTQTarget(4, 32, True, False), Calibration(text, 2, 16))
    assert [p.name for p in tmp_path.iterdir()] == [".out.convert-state"]  # kept for a resume


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tessera.engine.cli", "convert", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--to", "awq"], "--to 'awq' is not a format"),
        (["--to", "gptq", "--bits", "5"], "--bits 5 is not a GPTQ width"),
        (["--to", "gptq", "--group-size", "48"], "--group-size 48 is not a power of two"),
        (["--to", "gptq", "--rows", "1000"], "not the 1000 requested"),
        (["--to", "gptq", "--lm-head-bits", "6"], "--lm-head-bits 6 is not a GPTQ width"),
        (
            ["--to", "gptq", "--lm-head", "--lm-head-group-size", "24"],
            "--lm-head-group-size 24 is not a power",
        ),
        (["--to", "gptq", "--head-bits", "6"], "--head-bits is EXL2's"),
        (["--to", "exl2", "--bpw", "4", "--lm-head"], "GPTQ's; EXL2 takes --head-bits"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tiny, text, tmp_path, extra, message):
    r = _cli(tiny, tmp_path / "out", "--calibration", text, "--row-length", "32", *extra)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_3_bit_sizes_not_in_multiples_of_32_are_refused_before_any_work():
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        vocab_size=49153,
    )  # fmt: skip
    GPTQTarget(3, 32, True, False, lm_head_bits=8).check(cfg, "m")
    with pytest.raises(ValueError, match="--lm-head-bits 3 needs the head's sizes in multiples of 32"):
        GPTQTarget(4, 32, True, False, lm_head_bits=3).check(cfg, "m")
    with pytest.raises(ValueError, match="--bits 3 needs layer sizes in multiples of 32"):
        GPTQTarget(3, 32, True, False).check(SimpleNamespace(**{**vars(cfg), "intermediate_size": 1540}), "m")


def test_an_existing_destination_needs_force(tiny, text, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    r = _cli(tiny, dst, "--to", "gptq", "--calibration", text, "--rows", "2", "--row-length", "16")
    assert r.returncode == 2 and "already exists (--force replaces it)" in r.stderr
    assert list(tmp_path.iterdir()) == [dst] and list(dst.iterdir()) == []
    r = _cli(
        tiny, dst, "--to", "gptq", "--calibration", text, "--rows", "2", "--row-length", "16", "--force",
        "--lm-head-bits", "4",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["linears"] == 15 and 0 < out["lm_head_relative_output_error"] < 0.05
    q = open_checkpoint(dst).config.quantization
    assert q.bits == 4 and q.lm_head and q.for_module("lm_head").group_size == 32


def test_a_calibration_text_too_short_is_a_format_error(tiny, text):
    with pytest.raises(FormatError, match="not the 500 requested"):
        conv.calibration_rows(open_checkpoint(tiny), Calibration(text, 500, 32))


@pytest.mark.skipif(
    not GPTQ_PYTHON.is_file(),
    reason="GPTQModel's venv /tmp/gptq-venv is absent (tools/make_gptq_fixtures.py says how to make it)",
)
def test_our_solver_is_within_5_percent_of_gptqmodels_on_the_same_layer(tiny, text, tmp_path):
    """q_proj of layer 0 on its calibration inputs (tools/quant/compare_gptq_layer.py does the
    same on a layer of the default model)."""
    from safetensors.torch import load_file, save_file

    from tessera.formats.quantize import gptq_quantize, relative_output_error
    from tessera.kernels import ops

    ck = open_checkpoint(tiny)
    model = load_model(ck, torch.float32)
    ids = conv.calibration_rows(ck, Calibration(text, 16, 64))
    spec = model.layer_specs[0]
    x = ops.rms_norm(model.embed_input_ids(ids.reshape(-1)), spec.input_norm, spec.eps)
    w = spec.qkv.weight[: spec.num_heads * spec.head_dim].contiguous()
    h = 2 * x.double().T @ x.double() / x.shape[0]
    save_file({"W": w, "X": x.contiguous()}, str(tmp_path / "in.safetensors"))
    runner = Path(__file__).parents[1] / "tools" / "quant" / "gptqmodel_layer.py"
    for act_order in (False, True):
        files = [str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")]
        flags = ["--bits", "4", "--group-size", "32", "--sym", *(["--act-order"] if act_order else [])]
        cmd = [str(GPTQ_PYTHON), str(runner), *files, *flags]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        theirs = relative_output_error(w, load_file(tmp_path / "out.safetensors")["Q"], h.float())
        ours = gptq_quantize(w, h.float(), group_bits=4, group_size=32, sym=True, act_order=act_order)
        assert ours.output_error <= 1.05 * theirs, (act_order, ours.output_error, theirs)
