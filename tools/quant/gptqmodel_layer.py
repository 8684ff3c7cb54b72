"""GPTQModel's own GPTQ solver on one linear: the reference our solver is measured against.

Runs in GPTQModel's venv, not the project's (GPTQModel pins its own stack):

    /tmp/gptq-venv/bin/python tools/quant/gptqmodel_layer.py IN.safetensors OUT.safetensors \
        --bits 4 --group-size 128 [--act-order] [--sym] [--damp 0.01]

IN holds ``W`` (float32 ``[out, in]``) and ``X`` (float32 ``[tokens, in]``, the layer's
calibration inputs). GPTQModel's ``GPTQ`` class takes an ``nn.Linear`` holding W, accumulates
its Hessian from X through ``add_batch`` (``2 X^T X / n``) and runs ``quantize()``. OUT gets
``Q`` (its dequantized weight, float32 ``[out, in]``), ``scale`` and ``zero`` (``[out, groups]``),
``g_idx`` and ``H`` (the Hessian it built, before damping).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GPTQMODEL_DISABLE_GPTQ_CUDA", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inp")
    p.add_argument("out")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--sym", action="store_true")
    p.add_argument("--damp", type=float, default=0.01)
    args = p.parse_args()

    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    data = load_file(args.inp)
    w, x = data["W"].float(), data["X"].float()
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    cfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.act_order,
        sym=args.sym,
        act_group_aware=False,
        damp_percent=args.damp,
    )
    gptq = GPTQ(layer, cfg)
    gptq.quantizer.configure(perchannel=True)
    for chunk in x.split(2048):
        gptq.add_batch(chunk[None], None)
    gptq.finalize_hessian()
    h = gptq.H.clone()
    q, scale, zero, g_idx, *_ = gptq.quantize()
    out = {
        "Q": q.float().contiguous(),
        "scale": scale.float().contiguous(),
        "zero": zero.float().contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
        "H": h.contiguous(),
    }
    save_file(out, args.out)


if __name__ == "__main__":
    main()
