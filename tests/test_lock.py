"""One writer per lake: a second command refuses at once naming the holder, waits when
asked, and takes over the lock of a run that was killed."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipelines.config import load_config
from pipelines.lock import LakeLocked, lake_lock

pytestmark = pytest.mark.fast


def _cfg(tmp_path, *extra):
    return load_config("conf/demo.yaml", [f"run_dir={tmp_path}", *extra])


def _cli(tmp_path, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pipelines", "index", "--config", "conf/demo.yaml",
                           f"run_dir={tmp_path}", *extra], capture_output=True, text=True, env=env, timeout=120)


def test_a_second_command_on_a_held_lake_refuses_naming_the_holder(tmp_path):
    cfg = _cfg(tmp_path)
    with lake_lock(cfg, "run-A", "nightly"):
        out = _cli(tmp_path)
        assert out.returncode == 2, out.stderr
        err = out.stderr.strip()
        assert err.startswith(f"error: the lake {cfg.storage.root} is being written by another run")
        assert f"host {socket.gethostname()}, pid {os.getpid()}, run run-A (nightly), started " in err
        assert "Traceback" not in err and err.count("\n") == 0
    out = _cli(tmp_path)  # released: the same command now runs
    assert out.returncode == 0 and "[index] read 0" in out.stdout
    assert not os.path.exists(f"{cfg.storage.root}/_lock.json")


def test_two_holders_in_one_process_exclude_each_other(tmp_path):
    cfg = _cfg(tmp_path)
    with lake_lock(cfg, "a", "rank"):
        with pytest.raises(LakeLocked, match="run a \\(rank\\)"):
            with lake_lock(cfg, "b", "rank"):
                pass


def test_a_waiting_command_runs_once_the_holder_is_done(tmp_path):
    cfg = _cfg(tmp_path)
    waiter = _cfg(tmp_path, "lock.wait_s=20", "lock.poll_s=0.2")
    got = {}

    def second():
        started = time.monotonic()
        with lake_lock(waiter, "b", "rank"):
            got["waited"] = time.monotonic() - started

    with lake_lock(cfg, "a", "rank"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.5)
        assert "waited" not in got
    t.join(timeout=20)
    assert got["waited"] >= 1.0


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    cfg = _cfg(tmp_path, "lock.stale_after_s=2", "lock.heartbeat_s=0.5")
    uri = f"{cfg.storage.root}/_lock.json"
    os.makedirs(cfg.storage.root, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    # Killed on this host: its process is gone, the lock is taken over at once.
    with open(uri, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": int(dead.stdout), "run_id": "dead", "command": "nightly",
                   "started": now, "heartbeat": now, "token": "x"}, f)
    with lake_lock(cfg, "new", "nightly") as me:
        assert json.load(open(uri))["token"] == me["token"]
    # Killed on another host: taken over once its heartbeat is older than stale_after_s.
    with open(uri, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "run_id": "far", "command": "rank", "started": now,
                   "heartbeat": now, "token": "y"}, f)
    with pytest.raises(LakeLocked, match="host elsewhere, pid 1, run far"):
        with lake_lock(cfg, "new", "rank"):
            pass
    time.sleep(2.2)
    with lake_lock(cfg, "new", "rank"):
        pass


def test_a_live_holder_keeps_its_lock_fresh(tmp_path):
    cfg = _cfg(tmp_path, "lock.stale_after_s=1", "lock.heartbeat_s=0.2")
    with lake_lock(cfg, "long", "nightly"):
        time.sleep(1.5)  # longer than stale_after_s: only the heartbeat keeps it
        with pytest.raises(LakeLocked):
            with lake_lock(cfg, "other", "nightly"):
                pass
