"""``tessera info``: the platform, the kernel backend and what runs each op (and why), the
architectures tessera runs, and for a model given, how its layers and KV cache are laid out."""

from __future__ import annotations

import argparse
import json

import torch

from tessera.kernels import backend, explain, preferred_dtype
from tessera.models import supported_architectures
from tessera.platform import current_platform


def gather(model: str | None = None) -> dict:
    plat = current_platform()
    declared = backend(plat.device.type)
    out = {
        "platform": {
            "name": plat.name,
            "torch_device": str(plat.device),
            "dist_backend": plat.dist_backend,
            "memory_total_gib": round(plat.total_memory() / 2**30, 1),
            "memory_free_gib": round(plat.free_memory() / 2**30, 1),
            "torch": torch.__version__,
        },
        "kernel_backend": None
        if declared is None
        else {"name": declared[0], **{k: str(v).removeprefix("torch.") for k, v in declared[1].items()}},
        "preferred_dtype": str(preferred_dtype(plat.device)).removeprefix("torch."),
        "ops": [{"op": op, "runs": impl, "why": why} for op, impl, why in explain(plat.device.type)],
        "architectures": supported_architectures(),
    }
    if model is not None:
        out["model"] = _model(model)
    return out


def _model(name: str) -> dict:
    from tessera.formats import open_checkpoint
    from tessera.kvcache import KVCacheSpec, group_layers
    from tessera.models import LoadOptions, model_class

    from .model_source import resolve_model

    ck = open_checkpoint(resolve_model(name))
    c = ck.config
    cls = model_class(c.architecture)
    specs = cls(c, LoadOptions()).kv_cache_spec()
    groups = group_layers([KVCacheSpec(s.sliding_window, s.num_kv_heads, s.head_dim) for s in specs])
    return {
        "path": str(ck.path),
        "architecture": c.architecture,
        "class": f"{cls.__module__}.{cls.__name__}",
        "layers": c.num_hidden_layers,
        "experts": f"{c.num_experts_per_tok} of {c.num_experts}" if c.num_experts else None,
        "kv_cache_groups": [
            {
                "kind": "full" if g.spec.sliding_window is None else f"sliding({g.spec.sliding_window})",
                "layers": list(g.layers),
            }
            for g in groups.groups
        ],
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="also show how this model's layers are laid out")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(ns: argparse.Namespace) -> int:
    info = gather(ns.model)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["platform"]
    print(
        f"platform     {p['name']} ({p['torch_device']}), dist backend {p['dist_backend']}, "
        f"{p['memory_free_gib']} of {p['memory_total_gib']} GiB free, torch {p['torch']}"
    )
    kb = info["kernel_backend"]
    if kb is None:
        print("kernels      no backend for this device: the torch reference runs every op")
    else:
        rest = ", ".join(f"{k} {v}" for k, v in kb.items() if k != "name")
        print(f"kernels      {kb['name']}: {rest}")
    print(f"dtype        {info['preferred_dtype']} (what the kernels prefer; --dtype auto)")
    print("ops")
    width = max(len(o["op"]) for o in info["ops"])
    for o in info["ops"]:
        print(f"  {o['op']:<{width}}  {o['runs']}")
        if o["why"]:
            print(f"  {'':<{width}}    {o['why']}")
    print(f"models       {', '.join(info['architectures'])}")
    if "model" in info:
        m = info["model"]
        print(
            f"model        {m['path']}: {m['architecture']} -> {m['class']}, {m['layers']} layers"
            + (f", experts {m['experts']}" if m["experts"] else "")
        )
        for g in m["kv_cache_groups"]:
            print(f"  KV group   {g['kind']}: layers {g['layers']}")
    return 0
