"""One tensor-parallel rank of test_tensor_parallel.py, run as a script (pytest's importlib mode
leaves test modules unimportable in a spawned process):

    python tp_worker.py RANK WORLD RENDEZVOUS_FILE CASES_JSON OUT_DIR

Every rank joins a gloo group of WORLD processes; each case names a checkpoint and a number of
ranks n, and ranks 0..n-1 load their part of it (the others sit the case out) and run
``greedy``; rank 0 saves what it got to ``OUT_DIR/<case>.pt``.
"""

from __future__ import annotations

import json
import sys

import torch

from tessera.formats import open_checkpoint
from tessera.models import LayerKVCache, TPInfo, build_attention_metadata, load_model

BLOCK_SIZE = 4


@torch.inference_mode()
def greedy(model, prompts: list[list[int]], steps: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill the prompts in one batch in two chunks each, then ``steps`` greedy decode steps of
    all of them over a NaN-filled paged cache. Returns the logits of every computed token, in
    step order ``[T, vocab]``, and the greedy tokens of each step."""
    per_seq = -(-(max(map(len, prompts)) + steps) // BLOCK_SIZE)
    tables = [[i * per_seq + j for j in range(per_seq)] for i in range(len(prompts))]
    cache = [
        LayerKVCache.allocate(
            per_seq * len(prompts), BLOCK_SIZE, s.num_kv_heads, s.head_dim, model.dtype, fill=float("nan")
        )
        for s in model.kv_cache_spec()
    ]
    done = [0] * len(prompts)
    all_logits, tokens = [], []

    def step(parts: list[list[int]]) -> torch.Tensor:
        for i, part in enumerate(parts):
            done[i] += len(part)
        lens = [len(p) for p in parts]
        positions, metas = build_attention_metadata(lens, list(done), [tables], BLOCK_SIZE, model.device)
        ids = torch.tensor([t for p in parts for t in p], dtype=torch.long)
        logits = model.compute_logits(model.forward(ids, positions, cache, metas[0]))
        all_logits.append(logits)
        return logits[torch.tensor(lens).cumsum(0) - 1]  # each sequence's last token

    step([p[: len(p) // 2] for p in prompts])
    last = step([p[len(p) // 2 :] for p in prompts])
    for _ in range(steps):
        tokens.append(last.argmax(-1).tolist())
        last = step([[t] for t in tokens[-1]])
    tokens.append(last.argmax(-1).tolist())
    return torch.cat(all_logits), tokens


def run_case(case: dict, tp: TPInfo):
    dtype = getattr(torch, case.get("dtype", "float32"))
    model = load_model(open_checkpoint(case["path"]), dtype, packed_weights=case.get("packed", False), tp=tp)
    return greedy(model, case["prompts"], case["steps"])


def main(rank: int, world: int, rendezvous: str, cases_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from tessera.kernels import set_tensor_parallel_group

    torch.set_num_threads(1)  # several ranks share this machine's cores (NUMBA_NUM_THREADS too)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    with open(cases_file) as f:
        cases = json.load(f)
    # every process takes part in making every group, in the same order
    groups = {n: dist.new_group(list(range(n))) for n in sorted({c["ranks"] for c in cases})}
    for case in cases:
        n = case["ranks"]
        if rank < n:
            set_tensor_parallel_group(groups[n])
            logits, tokens = run_case(case, TPInfo(rank, n))
            if rank == 0:
                torch.save({"logits": logits, "tokens": tokens}, f"{out_dir}/{case['name']}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
