"""The collective ops' torch.distributed reference over 3 gloo processes: all_reduce sums in
place, all_gather puts parts of unequal sizes back in rank order, and both run over the group
``set_tensor_parallel_group`` names (checked in fresh interpreters: a process group per rank)."""

import subprocess
import sys

SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
from tessera.kernels import ops, set_tensor_parallel_group

rank, rendezvous = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=3)
pair = dist.new_group([0, 1])

x = torch.full((2, 3), float(rank + 1)).t()  # not contiguous
assert ops.all_reduce(x) is x and torch.equal(x, torch.full((3, 2), 6.0))

sizes = [3, 1, 2]


def part(r):
    return torch.arange(2 * sizes[r], dtype=torch.float32).reshape(2, -1) + 10 * r


mine, want = part(rank), torch.cat([part(r) for r in range(3)], 1)
assert torch.equal(ops.all_gather(mine, -1, sizes), want)
assert torch.equal(ops.all_gather(mine.t(), 0, sizes), want.t())
assert torch.equal(ops.all_gather(torch.full((1, 2), float(rank))), torch.tensor([[0.0, 0, 1, 1, 2, 2]]))
try:
    ops.all_gather(mine, -1, [1, 2, 3])  # no rank holds what this says: all refuse before sending
    raise SystemExit("a part of another size than ``sizes`` says was not refused")
except ValueError:
    pass

if rank < 2:
    set_tensor_parallel_group(pair)
    y = torch.tensor([float(rank + 1)])
    assert torch.equal(ops.all_reduce(y), torch.tensor([3.0]))
    assert torch.equal(ops.all_gather(torch.tensor([float(rank)]), 0, [1, 1]), torch.tensor([0.0, 1.0]))
dist.barrier()
dist.destroy_process_group()
print("ok")
"""


def test_all_reduce_and_uneven_all_gather_over_three_gloo_ranks_and_a_subgroup(tmp_path):
    rendezvous = str(tmp_path / "rendezvous")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(r), rendezvous],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and out.strip().endswith("ok"), f"rank {r}:\n{out[-3000:]}"
