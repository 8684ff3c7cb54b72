"""Registers and spilled bytes of a Triton kernel compiled for an NVIDIA target without a GPU
(Triton's own compiler and the cuobjdump it ships): the checks the interpreter cannot make.
Imported by the compile scripts the tests run in a process without TRITON_INTERPRET."""

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(
    fn, sig: dict, consts: dict, arch: int, aligned: list[str], num_warps: int = 4, num_stages: int = 3
) -> dict:
    """{"REG": registers per thread, "LOCAL": bytes spilled to local memory} of ``fn`` compiled
    for sm_``arch`` with argument types ``sig``, ``consts`` as constexprs, and the ``aligned``
    arguments declared divisible by 16 (as Triton specializes them at run time)."""
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned if a in sig}
    src = ASTSource(fn, {**sig, **{c: "constexpr" for c in consts}}, consts, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True)
    line = next(ln for ln in dump.stdout.splitlines() if "REG:" in ln)
    fields = dict(kv.split(":") for kv in line.split() if ":" in kv)
    return {"REG": int(fields["REG"]), "LOCAL": int(fields["LOCAL"])}
