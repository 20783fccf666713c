"""`VerifierPool`: math-verify worker processes with a hard per-task deadline; hung or crashed workers are replaced.

Why processes, and why plain subprocesses: math-verify's timeout is SIGALRM-based, so it works only in a main thread
(TRL's own accuracy reward switches it off elsewhere), some inputs run for minutes without it (`9^{9^{9}}`,
thousands of nested braces), and a signal cannot stop code stuck in one C call. A check that must never hang the
trainer has to run where it can be killed. Each worker is `python h1rl/rewards/_verify_worker.py`, started with
`subprocess` rather than `multiprocessing`: it imports neither the trainer's `__main__` (which "spawn" and
"forkserver" re-import) nor torch, it inherits no CUDA or thread state (which "fork" would copy), and it talks JSON
lines over pipes, so nothing sympy-shaped ever reaches the trainer process.

How `run(tasks)` works: identical tasks are checked once (their results are shared); tasks go to idle workers one at
a time; one `selectors` loop in the calling thread reads answers and watches deadlines. A task gets `timeout_s` from
the moment it is sent: the worker's own alarm fires at `0.8 * timeout_s` (this catches Python-level hangs and keeps
the process); at `timeout_s` the parent kills the worker (SIGKILL), records "timeout", and starts a replacement. A
worker that dies during a task records "crash" and is replaced the same way. A worker that cannot start (math-verify
missing, a broken environment) raises `RuntimeError` at once instead of scoring anything: that is a setup error, not
a failed check.

Lifetime: workers start on the first `run` (importing math-verify takes about a second) and stay up between
calls; `close()` kills them, and a `weakref.finalize` does the same at interpreter exit or when the pool is garbage
collected. POSIX only (pipes in `selectors`, `setitimer` in the worker).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")
SOFT_TIMEOUT_FRACTION = 0.8  # the worker's own alarm, as a fraction of the hard deadline


def default_num_workers() -> int:
    """min(4, CPUs this process may run on)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen
    start_deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    ready: bool = False
    task: int | None = None  # index of the task it is working on
    deadline: float = float("inf")  # when that task's time is up


class VerifierPool:
    """`num_workers` verifier processes; `run(tasks)` returns one `(status, detail)` per task, in order.

    A task is `{"gold": str, "answer": str | None, "text": str}` (see `_verify_worker.py`). Statuses are the
    worker's ("correct", "wrong", "no_answer", "bad_gold", "timeout", "error") plus "timeout" (killed at the hard
    deadline) and "crash" (the worker died). Thread-safe: concurrent `run` calls take turns.
    """

    def __init__(self, num_workers: int, timeout_s: float, start_timeout_s: float = 60.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0  # workers killed or lost and replaced
        self._workers: list[_Worker] = []
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _kill_all, self._workers, self._selector)

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and debugging)."""
        return [w.proc.pid for w in self._workers]

    def run(self, tasks: list[dict]) -> list[tuple[str, str]]:
        # A check is a function of its task alone, so identical tasks (G samples of one prompt often agree) are
        # sent once and share the result, a timeout included.
        keys = [json.dumps(task, sort_keys=True) for task in tasks]
        first_of: dict[str, dict] = {}
        for key, task in zip(keys, tasks):
            first_of.setdefault(key, task)
        slot = {key: i for i, key in enumerate(first_of)}
        distinct = list(first_of.values())
        with self._lock:
            try:
                results = self._run(distinct)
            except BaseException:
                self._close()  # unknown state (e.g. KeyboardInterrupt mid-task): the next run starts afresh
                raise
        return [results[slot[key]] for key in keys]

    def close(self) -> None:
        """Kill all workers. The pool stays usable: the next `run` starts new ones."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        for worker in list(self._workers):
            self._discard(worker)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, tasks: list[dict]) -> list[tuple[str, str]]:
        results: list[tuple[str, str] | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        while queue or any(w.task is not None for w in self._workers):
            self._fill()
            for worker in list(self._workers):  # a failed send removes the worker
                if worker.ready and worker.task is None and queue:
                    self._send(worker, queue.popleft(), tasks, results)
            now = time.monotonic()
            wake = min(((w.deadline if w.ready else w.start_deadline) for w in self._workers), default=now)
            for key, _ in self._selector.select(timeout=max(0.0, wake - now)):
                self._read(key.data, results)
            self._expire(results)
        return results  # type: ignore[return-value]  (every slot is filled when the loop ends)

    def _fill(self) -> None:
        while len(self._workers) < self.num_workers:
            self._spawn()

    def _spawn(self) -> None:
        argv = [sys.executable, str(WORKER_SCRIPT)]
        if threading.current_thread() is threading.main_thread():
            # The kernel's parent-death signal follows the spawning *thread*; only the main thread lives as long
            # as the process.
            argv.append(f"--die-with-parent={os.getpid()}")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        os.set_blocking(proc.stdout.fileno(), False)
        worker = _Worker(proc=proc, start_deadline=time.monotonic() + self.start_timeout_s)
        self._workers.append(worker)
        self._selector.register(proc.stdout, selectors.EVENT_READ, worker)

    def _send(self, worker: _Worker, index: int, tasks: list[dict], results: list) -> None:
        task = tasks[index]
        message = {
            "gold": task["gold"],
            "answer": task["answer"],
            "text": task["text"],
            "soft_timeout_s": SOFT_TIMEOUT_FRACTION * self.timeout_s,
        }
        worker.task = index
        worker.deadline = time.monotonic() + self.timeout_s
        try:  # an idle worker is blocked reading stdin, so this write completes even past the pipe buffer
            worker.proc.stdin.write((json.dumps(message) + "\n").encode())
        except (BrokenPipeError, OSError):
            self._lost(worker, results)

    def _read(self, worker: _Worker, results: list) -> None:
        try:
            data = os.read(worker.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self._lost(worker, results)
            return
        worker.buffer += data
        while (end := worker.buffer.find(b"\n")) >= 0:
            message = json.loads(worker.buffer[:end])
            del worker.buffer[: end + 1]
            if not worker.ready:
                worker.ready = True
            elif worker.task is not None:
                results[worker.task] = (message["status"], message["detail"])
                worker.task, worker.deadline = None, float("inf")

    def _lost(self, worker: _Worker, results: list) -> None:
        """The worker's pipes closed: it died (or is dying)."""
        try:
            code = worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        if not worker.ready:
            self._discard(worker)
            raise RuntimeError(
                f"a math-verify worker ({WORKER_SCRIPT.name}) exited with code {code} before it was ready; its "
                f"error is on stderr above (is math-verify installed for {sys.executable}?)"
            )
        if worker.task is not None:
            results[worker.task] = ("crash", f"worker exited with code {code}")
        self._discard(worker)
        self.restarts += 1

    def _expire(self, results: list) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now >= worker.deadline:
                results[worker.task] = ("timeout", f"worker killed after {self.timeout_s:g} s")
                self._discard(worker)
                self.restarts += 1
            elif not worker.ready and now >= worker.start_deadline:
                self._discard(worker)
                raise RuntimeError(
                    f"a math-verify worker ({WORKER_SCRIPT.name}) did not start within {self.start_timeout_s:g} s"
                )

    def _discard(self, worker: _Worker) -> None:
        self._selector.unregister(worker.proc.stdout)
        self._workers.remove(worker)
        _kill(worker)


def _kill(worker: _Worker) -> None:
    if worker.proc.poll() is None:
        worker.proc.kill()
    worker.proc.wait()
    worker.proc.stdin.close()
    worker.proc.stdout.close()


def _kill_all(workers: list[_Worker], selector: selectors.BaseSelector) -> None:
    """The finalizer: must not reference the pool itself."""
    while workers:
        _kill(workers.pop())
    selector.close()
