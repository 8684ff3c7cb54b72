"""tools/exllamav2_check.py without exllamav2: its weight comparison fed what exllamav2 would
hold (packages/formats/tests/exllamav2_ref.py, a port of its load and reconstruct kernel) for a
random SmolLM2-135M-shaped folder from tools/bench/make_random_exl2.py, and its plain fp32
reference forward against tessera's."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_ONE_LAYER = dict(
    layers=1, hidden=576, ffn=1536, heads=9, kv_heads=3, vocab=49152, rope_theta=100000.0
)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tools():
    sys.path[:0] = [
        str(ROOT / "tools/bench"),
        str(ROOT / "tools"),
    ]  # make_random_exl2 imports make_random_gguf
    try:
        import exllamav2_check
        import make_random_exl2
    finally:
        sys.path.remove(str(ROOT / "tools/bench"))
        sys.path.remove(str(ROOT / "tools"))
    ref = _load("tessera_exllamav2_ref", ROOT / "packages/formats/tests/exllamav2_ref.py")
    return exllamav2_check, make_random_exl2, ref


@pytest.fixture(scope="module")
def folder(tools, tmp_path_factory):
    _, make_random_exl2, _ = tools
    return make_random_exl2.write(tmp_path_factory.mktemp("exl2") / "smollm2", **SMOLLM2_ONE_LAYER)


class Held:
    """A stand-in for an ``ExLlamaV2Linear``: ``get_weight_tensor_dq`` as the port computes it."""

    def __init__(self, dq: torch.Tensor):
        self.dq = dq

    def get_weight_tensor_dq(self) -> torch.Tensor:
        return self.dq


def held_by_exllamav2(folder: Path, ref) -> tuple[dict, list]:
    """Every EXL2 linear as exllamav2 0.3.2 would hold it after ``model.load()``, and its MLPs."""
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    prefixes = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".q_weight")})

    def parts(p):
        return {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == p}

    theirs = {p: Held(ref.linear_dq(parts(p))) for p in prefixes}
    mlps = []
    for p in prefixes:
        if p.endswith(".mlp.down_proj"):
            base = p.removesuffix("down_proj")
            keys = (base + "gate_proj", base + "up_proj", p)
            for key, dq in zip(keys, ref.mlp_dq(*(parts(k) for k in keys)), strict=True):
                theirs[key] = Held(dq)
            mlps.append(keys)
    return theirs, mlps


def test_weights_compare_equal_in_the_order_exllamav2_holds_the_mlp(tools, folder):
    check, _, ref = tools
    from tessera.formats import open_checkpoint

    theirs, mlps = held_by_exllamav2(folder, ref)
    got = check.weights_compared(open_checkpoint(folder), theirs, mlps)
    assert got["linears"] == 8 and got["held_permuted"] == 3
    assert got["all_equal"] and got["max_abs_diff"] == 0.0
    # compared as stored, the three MLP linears of every layer differ: issue 13's 90 of 211
    plain = check.weights_compared(open_checkpoint(folder), theirs)
    assert plain["equal"] == 5 and plain["held_permuted"] == 0 and not plain["all_equal"]
    assert plain["worst"].endswith(("gate_proj", "up_proj", "down_proj"))


def test_a_wrong_weight_is_still_found(tools, folder):
    check, _, ref = tools
    from tessera.formats import open_checkpoint

    theirs, mlps = held_by_exllamav2(folder, ref)
    q = theirs["model.layers.0.self_attn.q_proj"]
    q.dq = q.dq.clone()
    q.dq[3, 5] += 0.5
    got = check.weights_compared(open_checkpoint(folder), theirs, mlps)
    assert not got["all_equal"] and got["unequal_elements"] == 1
    assert got["worst"] == "model.layers.0.self_attn.q_proj"


def test_the_reference_forward_is_tesseras_fp32_forward(tools, folder):
    """reference_forward is the yardstick of the per-module states exllamav2 is compared with."""
    check, _, _ = tools
    from tessera.formats import open_checkpoint
    from tessera.models import load_model
    from tessera.models.harness import forward_chunks

    ids = check.token_ids(SMOLLM2_ONE_LAYER["vocab"])
    states, logits = check.reference_forward(open_checkpoint(folder), ids, torch.device("cpu"))
    assert len(states) == 2 * SMOLLM2_ONE_LAYER["layers"] + 2  # exllamav2: modules 1..head_layer_idx
    assert [check.state_name(i, len(states)) for i in range(len(states))] == [
        "embedding",
        "layer 0 attention",
        "layer 0 mlp",
        "final norm",
    ]
    model = load_model(open_checkpoint(folder), torch.float32, torch.device("cpu"), packed_weights=False)
    (want,) = forward_chunks(model, [[ids]], block_size=16)
    assert check.rel_err(logits, want.float()) < 1e-5


class TwoPaths:
    """A stand-in for an ``ExLlamaV2Linear`` whose fused kernel is off by ``fused_error`` at up to
    32 rows (as exllamav2 takes its fused GEMM there)."""

    def __init__(self, w: torch.Tensor, fused_error: float = 0.0):
        self.w, self.fused_error = w, fused_error
        self.in_features = w.shape[0]

    def forward(self, x: torch.Tensor, force_recons: bool = False) -> torch.Tensor:
        out = x.float() @ self.w
        if not force_recons and x.shape[-2] <= 32:
            out = out * (1 + self.fused_error)
        return out.half()


def test_linear_paths_name_the_kernel_that_departs(tools):
    check, _, _ = tools
    g = torch.Generator().manual_seed(0)
    held = {
        f"model.layers.{i}.mlp.{n}_proj": TwoPaths(torch.randn(64, 32, generator=g), 0.1 if i == 2 else 0.0)
        for i in range(3)
        for n in ("up", "down")
    }
    held["model.layers.1.self_attn.q_proj"] = TwoPaths(torch.randn(64, 64, generator=g))
    held["lm_head"] = TwoPaths(torch.randn(64, 100, generator=g))
    got = check.linear_paths(held, device="cpu")
    # layer 0, the last layer and the head, at 16 and 40 rows; layer 1 not sampled
    assert {k.rsplit(" ", 1)[0] for k in got} == {
        "lm_head",
        *(f"model.layers.{i}.mlp.{n}_proj" for i in (0, 2) for n in ("up", "down")),
    }
    assert got["model.layers.2.mlp.up_proj x16"] == pytest.approx(0.1, rel=1e-2)
    assert got["model.layers.2.mlp.up_proj x40"] < 1e-3 and got["lm_head x16"] < 1e-3
