"""Hostile and damaged model files through the tessera command: one line on stderr naming the file,
exit code 2, no traceback, and a peak RSS under 1 GB. The files are the cases of
packages/formats/tests/bad_files.py (where the readers' messages are tested one by one)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS_LIMIT_KIB = 1024 * 1024
# settings that keep even a file that wrongly loaded small
SMALL = ["--max-tokens", "1", "--max-model-len", "64", "--kv-cache-memory", "16MiB", "--dtype", "float32"]

# Runs a command, prints its peak RSS (ru_maxrss of the waited-for child, KiB on Linux) and exits
# with its exit code. It kills the command past twice the limit, so a file that grows memory
# without bound fails the test instead of exhausting the machine.
WATCH = r"""
import os, resource, subprocess, sys, time
kill_kib = int(sys.argv[1])
child = subprocess.Popen(sys.argv[2:])
page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
killed = 0
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/statm") as f:
            rss_kib = int(f.read().split()[1]) * page_kib
    except (OSError, ValueError, IndexError):
        rss_kib = 0
    if rss_kib > kill_kib:
        child.kill()
        killed = 1
    time.sleep(0.02)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"watch: killed={killed} peak_rss_kib={peak}", flush=True)
sys.exit(child.returncode if child.returncode >= 0 else 128 - child.returncode)
"""

# The CLI's main() on each file in one process (torch is imported once, not once per file): one
# JSON line per file with the exit code and what main() wrote to stderr, or the traceback that
# escaped it.
EACH = r"""
import contextlib, io, json, sys, traceback
from tessera.engine.cli import main
for path in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(["generate", "--model", path, "hi", *json.loads(sys.argv[2])])
    except BaseException:
        rc, err = "raised", io.StringIO(err.getvalue() + traceback.format_exc())
    print(json.dumps({"path": path, "rc": rc, "stderr": err.getvalue()}), flush=True)
"""


def _bad_files():
    path = ROOT / "packages" / "formats" / "tests" / "bad_files.py"
    spec = importlib.util.spec_from_file_location("tessera_bad_files", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bad_files = _bad_files()


def watched(*command: str, timeout: float) -> tuple[subprocess.CompletedProcess, int, str]:
    """The command's result, its peak RSS in KiB, and its stdout without the watcher's line."""
    r = subprocess.run(
        [sys.executable, "-c", WATCH, str(2 * PEAK_RSS_LIMIT_KIB), *command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    *out, last = r.stdout.splitlines()
    assert last.startswith("watch: killed=0 "), f"killed past {2 * PEAK_RSS_LIMIT_KIB} KiB: {last}"
    return r, int(last.rsplit("=", 1)[1]), "\n".join(out)


def assert_one_clear_line(stderr: str, bad) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"tessera: error: {bad.source}: "), lines[0]
    for fragment in bad.fragments:
        assert fragment in lines[0], lines[0]


def test_every_bad_file_is_one_line_and_exit_code_2_in_bounded_memory(tmp_path):
    bads = {name: build(tmp_path) for name, build in bad_files.CASES.items()}
    paths = [str(b.model) for b in bads.values()]
    r, peak_kib, out = watched(sys.executable, "-c", EACH, json.dumps(paths), json.dumps(SMALL), timeout=180)
    assert r.returncode == 0, r.stderr
    results = [json.loads(line) for line in out.splitlines()]
    assert [x["path"] for x in results] == paths, r.stderr
    for (name, bad), result in zip(bads.items(), results, strict=True):
        assert result["rc"] == 2, f"{name}: {result}"
        assert_one_clear_line(result["stderr"], bad)
    assert peak_kib < PEAK_RSS_LIMIT_KIB, f"peak RSS {peak_kib} KiB over {len(paths)} bad files"


@pytest.mark.parametrize(
    "case",
    [
        "gguf-block-count-2**40",
        "gguf-tensor-dims-overflow-64-bits",
        "hf-num-hidden-layers-1e9",
        "hf-config-is-an-array",
    ],
)
def test_the_tessera_command_on_a_bad_file_prints_one_line_and_exits_2(tmp_path, case):
    bad = bad_files.CASES[case](tmp_path)
    r, peak_kib, out = watched(
        sys.executable,
        "-m",
        "tessera.engine.cli",
        "generate",
        "--model",
        str(bad.model),
        "hi",
        *SMALL,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert out == ""
    assert_one_clear_line(r.stderr, bad)
    assert peak_kib < PEAK_RSS_LIMIT_KIB
