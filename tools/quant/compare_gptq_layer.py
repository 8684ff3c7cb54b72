"""Our GPTQ solver against GPTQModel's on one real linear: the same weight, the same calibration
inputs, the relative output error ``trace((W-Q) H (W-Q)^T) / trace(W H W^T)`` of both.

The linear is one of the default model (dequantized from its GGUF); its inputs are computed from
calibration rows of ../shared/data/wiki.utf8 through the unquantized layers before it (our
``convert.quantize_layer`` with quantization off). GPTQModel runs in its own venv
(tools/quant/gptqmodel_layer.py).

    uv run python tools/quant/compare_gptq_layer.py [--layer 3] [--linear self_attn.q_proj]
        [--rows 16] [--row-length 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tessera.engine import convert as conv
from tessera.engine import resolve_model
from tessera.formats import open_checkpoint
from tessera.formats.calibration import default_text
from tessera.formats.quantize import gptq_quantize, relative_output_error
from tessera.models import load_model

GPTQ_PYTHON = Path("/tmp/gptq-venv/bin/python")
RUNNER = Path(__file__).with_name("gptqmodel_layer.py")
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


class _Capture:
    """A LayerQuantizer that quantizes nothing and keeps the inputs' Hessians by linear name."""

    name = "capture"

    def __init__(self) -> None:
        self.hessians: dict[str, torch.Tensor] = {}

    def quantize(self, name, weight, hessian):
        self.hessians[name] = hessian
        return conv.QuantizedLinear({}, weight, 0.0)


def layer_inputs(model, ids: torch.Tensor, layer: int, linear: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, X)``: the linear's float32 weight and its inputs ``[tokens, in]`` on ``ids``."""
    rows, t = ids.shape
    x = model.embed_input_ids(ids.reshape(-1)).reshape(rows, t, -1)
    cos, sin = model.rotary.cos_sin(torch.arange(t), torch.full((t,), t))
    for i in range(layer):
        _, _, x = conv.quantize_layer(f"model.layers.{i}", model.layer_specs[i], x, cos, sin, _Capture())
    spec = model.layer_specs[layer]
    captured: dict[str, torch.Tensor] = {}
    real_hessian = conv._hessian

    def keep_inputs(inputs, chunks):
        captured[len(captured)] = torch.cat([inputs(r).reshape(-1, inputs(r).shape[-1]) for r in chunks])
        return real_hessian(inputs, chunks)

    conv._hessian = keep_inputs
    try:
        cap = _Capture()
        conv.quantize_layer(f"model.layers.{layer}", spec, x, cos, sin, cap)
    finally:
        conv._hessian = real_hessian
    stage = {"self_attn.q_proj": 0, "self_attn.o_proj": 1, "mlp.gate_proj": 2, "mlp.down_proj": 3}[linear]
    d = spec.head_dim
    weights = {
        "self_attn.q_proj": spec.qkv.weight[: spec.num_heads * d],
        "self_attn.o_proj": spec.o.weight,
        "mlp.gate_proj": spec.gate_up.weight[: spec.gate_up.weight.shape[0] // 2],
        "mlp.down_proj": spec.down.weight,
    }
    return weights[linear].float().contiguous(), captured[stage]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--linear", default="self_attn.q_proj", choices=LINEARS)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--row-length", type=int, default=512)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not GPTQ_PYTHON.is_file():
        raise SystemExit(f"compare_gptq_layer: {GPTQ_PYTHON} is absent (tools/make_gptq_fixtures.py)")
    ck = open_checkpoint(resolve_model(args.model))
    model = load_model(ck, torch.float32)
    ids = conv.calibration_rows(ck, conv.Calibration(default_text(), args.rows, args.row_length))
    w, x = layer_inputs(model, ids, args.layer, args.linear)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"W": w, "X": x.contiguous()}, f"{tmp}/in.safetensors")
        for act_order in (False, True):
            cmd = [str(GPTQ_PYTHON), str(RUNNER), f"{tmp}/in.safetensors", f"{tmp}/out.safetensors",
                   "--bits", "4", "--group-size", "128", "--sym", "--damp", "0.01"]  # fmt: skip
            subprocess.run([*cmd, *(["--act-order"] if act_order else [])], check=True, capture_output=True)
            theirs = relative_output_error(w, load_file(f"{tmp}/out.safetensors")["Q"], h.float())
            res = gptq_quantize(w, h.float(), group_bits=4, group_size=128, sym=True, act_order=act_order)
            rows.append(
                {
                    "linear": f"model.layers.{args.layer}.{args.linear}",
                    "shape": list(w.shape),
                    "tokens": x.shape[0],
                    "act_order": act_order,
                    "ours": res.output_error,
                    "gptqmodel": theirs,
                    "ours_over_gptqmodel": res.output_error / theirs,
                }
            )
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(
                f"{r['linear']} {r['shape']} act_order={r['act_order']!s:5} ours {r['ours']:.6f} "
                f"gptqmodel {r['gptqmodel']:.6f} ratio {r['ours_over_gptqmodel']:.4f}"
            )


if __name__ == "__main__":
    main()
