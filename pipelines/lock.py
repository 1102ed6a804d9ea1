"""One writer per lake: a lock object at <storage.root>/_lock.json.

A double-triggered cron must not start two runs writing the same tables. Every command
that writes the lake holds this lock for its whole run: it is created atomically (an
O_EXCL create locally, a conditional PUT on S3), names its holder (host, pid, run id,
command, start time) and is refreshed every `lock.heartbeat_s` by a background thread.
A second command refuses at once with the holder's name (or waits up to
`lock.wait_s`). A lock whose holder was killed is taken over once it is stale: its
heartbeat older than `lock.stale_after_s`, or at once when the holder was on this host
and its process is gone.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from contextlib import contextmanager

from model.errors import PipelineError
from ops.storage import create_exclusive, delete_file, read_json, write_bytes


class LakeLocked(PipelineError):
    pass


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _stale(holder: dict, stale_after_s: float) -> bool:
    if _now() - holder.get("heartbeat", 0) > stale_after_s:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True  # killed (kill -9): no heartbeat will come
        except (PermissionError, KeyError, ValueError):
            pass
    return False


def describe(holder: dict) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, run {holder.get('run_id')} "
            f"({holder.get('command')}), started {_iso(holder.get('started', 0))}")


@contextmanager
def lake_lock(cfg, run_id: str, command: str):
    """Holds the lake's lock for the block; LakeLocked if another live run holds it."""
    uri = f"{cfg.storage.root.rstrip('/')}/_lock.json"
    s3, conf = dict(cfg.storage.s3), cfg.lock
    me = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "command": command,
          "started": _now(), "token": os.urandom(8).hex()}
    deadline = _now() + conf.wait_s
    while True:
        me["heartbeat"] = _now()
        if create_exclusive(uri, json.dumps(me).encode(), s3):
            break
        holder = read_json(uri, s3)
        if holder is None:
            continue  # released between our try and our read
        if _stale(holder, conf.stale_after_s):
            print(f"[lock] taking over a stale lock of {describe(holder)}", flush=True)
            delete_file(uri, s3)
            continue
        if _now() >= deadline:
            raise LakeLocked(
                f"the lake {cfg.storage.root} is being written by another run ({describe(holder)}); "
                f"one writer at a time: wait for it, or set lock.wait_s to wait"
            )
        time.sleep(min(conf.poll_s, max(0.0, deadline - _now())))
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(conf.heartbeat_s):
            current = read_json(uri, s3) or {}
            if current.get("token") != me["token"]:
                return  # taken over: we were presumed dead
            me["heartbeat"] = _now()
            write_bytes(uri, json.dumps(me).encode(), s3)

    beat = threading.Thread(target=heartbeat, name="lake-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield me
    finally:
        stop.set()
        beat.join(timeout=5)
        if (read_json(uri, s3) or {}).get("token") == me["token"]:
            delete_file(uri, s3)
