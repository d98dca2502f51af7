"""One writer per run directory (qtrain.files.lock_run_dir): a second qtrain into a directory
being written stops with one line and exit 2; the lock goes with its process, however it ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtrain import cli
from qtrain.config import UserError
from qtrain.files import LOCK, check_unlocked, lock_run_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

#: Holds the lock of argv[1] and says so, until killed.
HOLDER = """
import sys, time
from qtrain.files import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    """Two opens of the lock file conflict even within one process; the error is one line
    naming the directory and the holder's pid; the lock and its file go when the block ends."""
    with lock_run_dir(tmp_path):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
        for attempt in (lambda: lock_run_dir(tmp_path).__enter__(),
                        lambda: check_unlocked(tmp_path)):
            with pytest.raises(UserError) as err:
                attempt()
            message = str(err.value)
            assert "\n" not in message and f"(pid {os.getpid()})" in message
            assert message.startswith(f"{tmp_path} is being written by another qtrain process")
    assert not (tmp_path / LOCK).exists()
    check_unlocked(tmp_path)
    with lock_run_dir(tmp_path):  # free again
        pass


def test_a_killed_holder_leaves_no_lock(tmp_path):
    """The OS releases the lock of a SIGKILLed process: its file stays behind, unlocked."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            check_unlocked(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK).exists()  # stale, and harmless
    check_unlocked(tmp_path)
    with lock_run_dir(tmp_path):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())


# --- through the command line -------------------------------------------------------------------

@pytest.fixture
def tiny_run(tmp_path, fake_mnist, monkeypatch):
    """Arguments of a one-epoch qtrain run on tiny Fashion-MNIST-shaped data."""
    monkeypatch.delenv("QTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = fake_mnist(tmp_path / "data", 30, 5)
    return ["--data-dir", str(data), "--set", "per_class=10", "--epochs", "1", "--bits", "8",
            "--no-download"]


def _refused(capsys, argv, run_dir):
    """cli.main(argv) while run_dir is locked: exit 2 and one line naming the directory."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"qtrain: error: {run_dir} is being written by another qtrain process "
                      f"(pid {os.getpid()}); wait for it to end or choose another --out")


def test_second_qtrain_into_a_locked_directory_stops(tmp_path, tiny_run, capsys):
    """A new run, a resume, and a new run into a directory that holds a run: each stops with
    one line while the directory is locked; after the first run ends, --resume works."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with lock_run_dir(run_dir):  # another writer, as a second open file description
        _refused(capsys, [*tiny_run, "--out", str(run_dir)], run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # nothing written

    assert cli.main([*tiny_run, "--out", str(run_dir)]) == 0
    assert not (run_dir / LOCK).exists()  # released and removed when the run ended
    with lock_run_dir(run_dir):
        _refused(capsys, ["--resume", str(run_dir), "--epochs", "2"], run_dir)
        _refused(capsys, [*tiny_run, "--out", str(run_dir)], run_dir)
    assert cli.main(["--resume", str(run_dir), "--epochs", "2"]) == 0  # the lock was released
    epochs = [json.loads(line)["epoch"] for line in
              (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_concurrent_qtrain_processes_one_writes(tmp_path, tiny_run):
    """Two qtrain processes started at once into one new --out: one trains, the other stops
    with one line (the lock, or the run the first has already written), and every epoch is in
    metrics.jsonl once."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qtrain.cli", *tiny_run, "--epochs", "2", "--out", str(run_dir)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    deadline = time.time() + 300
    results = [p.communicate(timeout=max(1, deadline - time.time())) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1].strip().splitlines()
    assert len(loser) == 1 and ("being written by another qtrain process" in loser[0]
                                or "already holds a run" in loser[0]), loser
    epochs = [json.loads(line)["epoch"] for line in
              (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
