"""TESSERA_KERNELS=reference: no backend loads and every op runs its torch reference (checked in
a fresh interpreter, since backends load once per process)."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json
from tessera.kernels import backend, explain
declared = backend("cpu")
runs = sorted({impl.split(".")[1] for _, impl, _ in explain("cpu")})
print(json.dumps({"cpu": declared and declared[0], "runs": runs}))
"""


def _run(env_value):
    env = dict(os.environ)
    env.pop("TESSERA_KERNELS", None)
    if env_value is not None:
        env["TESSERA_KERNELS"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reference_only_loads_no_backend():
    ref = _run("reference")
    assert ref == {"cpu": None, "runs": ["kernels"]}  # every op: tessera.kernels.*


def test_backends_load_by_default():
    default = _run(None)
    assert default["cpu"] == "tessera-kernels-cpu"
    assert "kernels_cpu" in default["runs"]
