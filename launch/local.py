#!/usr/bin/env python3
"""Starts N local CPU processes of one command under jax.distributed (tests, laptops).

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        agfsync-jax train --config=configs/tiny.py --workdir=/tmp/run

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
agfsync_jax.distributed) and its own simulated CPU devices. Output lines are prefixed
with the process id. If any process fails, the others are stopped and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
    parser.add_argument("--timeout_s", type=float, default=3600)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    address = f"127.0.0.1:{args.port or _free_port()}"
    procs = []
    for pid in range(args.num_processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(args.num_processes),
                   JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_pump, args=(proc, f"[p{pid}]"), daemon=True).start()
        procs.append(proc)
    deadline = time.time() + args.timeout_s
    failed = None
    while any(p.poll() is None for p in procs):
        failed = next((p for p in procs if p.poll() not in (None, 0)), None)
        if failed is not None or time.time() > deadline:
            break
        time.sleep(0.2)
    if failed is not None or time.time() > deadline:
        # One process dying leaves the others blocked in collectives: stop them.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    codes = [p.wait() for p in procs]
    time.sleep(0.1)  # let the output threads drain
    if any(codes):
        print(f"launch/local.py: exit codes {codes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
