"""MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import multi_worker_problem as problem

MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi_worker_main.py")
TIMEOUT = 300


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _launch(out, backup_dir, fail_at=None):
    """Starts both workers; returns their exit codes."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        args = [sys.executable, MAIN, str(out), str(backup_dir)]
        if fail_at is not None:
            args.append(str(fail_at))
        processes.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    if fail_at is not None:
        # Worker 1 dies; a cluster manager then stops the survivor, which would
        # otherwise wait for its peer in a collective.
        processes[1].wait(timeout=TIMEOUT)
        processes[0].kill()
    codes = []
    for process in processes:
        output, _ = process.communicate(timeout=TIMEOUT)
        codes.append(process.returncode)
        if fail_at is None and process.returncode != 0:
            raise AssertionError(output[-5000:])
    return codes


def _load(out, index):
    with np.load(f"{out}.worker{index}.npz") as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    _launch(root / "result", root / "backup")
    return [_load(root / "result", i) for i in range(2)]


def test_workers_agree_and_match_a_single_process(uninterrupted):
    worker0, worker1 = uninterrupted
    for a, b in zip(worker0, worker1):
        np.testing.assert_array_equal(a, b)
    model = problem.model()
    model.fit(problem.dataset(), epochs=problem.EPOCHS, verbose=0)
    reference = [v.numpy() for v in model.weights + model.optimizer.variables]
    assert len(reference) == len(worker0)
    # Same global batches; per-worker partial sums reorder float32 additions.
    for got, want in zip(worker0, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_killed_worker_resumes_from_backup_with_curvature_state(uninterrupted, tmp_path):
    # 4 steps per epoch: the crash comes in the middle of the second epoch.
    codes = _launch(tmp_path / "result", tmp_path / "backup", fail_at=6)
    assert codes[1] == 17
    _launch(tmp_path / "result", tmp_path / "backup")
    for index in range(2):
        # The restarted run resumed after the first epoch instead of starting over.
        steps = (tmp_path / f"result.worker{index}.steps").read_text()
        assert int(steps) == 4 * (problem.EPOCHS - 1)
        for got, want in zip(_load(tmp_path / "result", index), uninterrupted[index]):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
