"""examples/distributed_fit.py --smoke in all three modes, as separate processes."""

import os
import re
import socket
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "distributed_fit.py")
ROOT = os.path.dirname(EXAMPLE.rsplit(os.sep, 1)[0])


def _start(*flags):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, EXAMPLE, "--smoke", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-5000:]
    match = re.search(r"replicas=(\d+) .* loss=([\d.]+) .*weights_checksum=([\d.]+)",
                      output)
    assert match, output[-2000:]
    return int(match.group(1)), float(match.group(2)), float(match.group(3))


def test_one_device_and_two_logical_devices():
    single = _result(_start())
    mirrored = _result(_start("--devices=2", "--jit_compile"))
    assert single[0] == 1 and mirrored[0] == 2
    assert single[1] < 2.3 and mirrored[1] < 2.3  # below log(10): it learns


# Two worker processes (~40 s); tests/test_multi_worker.py covers the engine's
# multi-worker path in `make test`.
@pytest.mark.slow
def test_two_workers_on_localhost(tmp_path):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    workers = ",".join(f"127.0.0.1:{p}" for p in ports)
    processes = [
        _start(f"--workers={workers}", f"--worker_index={i}",
               f"--backup_dir={tmp_path}", "--jit_compile")
        for i in range(2)
    ]
    results = [_result(p) for p in processes]
    assert results[0][0] == results[1][0] == 2
    assert results[0][2] == results[1][2]  # identical weights on both workers


# The benchmark tool under MultiWorkerMirroredStrategy (~80 s): `make test-all`.
@pytest.mark.slow
def test_distributed_benchmark_smoke():
    tool = os.path.join(ROOT, "tools", "distributed_benchmark.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, tool, "--smoke"], env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    for measure in ("ms/step, 2 replicas", "bytes all-reduced per factor update",
                    "inversion work per replica, split"):
        assert measure in result.stdout
