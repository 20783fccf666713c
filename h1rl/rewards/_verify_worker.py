r"""The math-verify worker process: run as a script by `h1rl.rewards.pool`, never imported by the trainer.

It is the only place where h1rl parses or compares mathematics. math-verify's parsed results are sympy objects
whose printing or comparison can hang, so they never leave this process: the parent receives plain JSON.

Protocol (one JSON object per line):
- stdin, one task: `{"gold": str, "answer": str | null, "text": str, "soft_timeout_s": float}`. `answer` is the
  inside of the completion's last `\boxed{}` (the parent extracts it); when it is null, math-verify's own extraction
  runs on `text`, the whole completion.
- stdout: first `{"ready": true}` once math-verify is imported and warmed up, then one
  `{"status": str, "detail": str}` per task, in order. Statuses: "correct", "wrong", "no_answer" (nothing to
  compare in the completion), "bad_gold" (the reference answer does not parse), "timeout" (the soft deadline
  below fired), "error" (math-verify raised).

Timeouts: math-verify's own SIGALRM timeouts are switched off; instead one `setitimer` alarm per task raises
`_SoftTimeout` (a BaseException, so that no `except Exception` inside sympy swallows it) at `soft_timeout_s`. That
catches the hangs seen so far (`9^{9^{9}}`, thousands of nested braces: sympy and the LaTeX parser loop in Python)
without losing the process. Code stuck inside one C call never returns to the interpreter to run the handler; the
parent kills such a worker at its hard deadline.

The worker ignores SIGINT (the trainer's Ctrl-C reaches the whole process group; the parent cleans up), exits when
stdin closes, and on Linux asks the kernel to kill it when the parent dies (`--die-with-parent=PID`), so a worker
stuck in C code cannot outlive a trainer killed with SIGKILL. Tests simulate crashes and C-level hangs through two
environment variables (`_test_hooks`).
"""

import os
import sys

# Running as a script puts this folder first on sys.path; drop it so that no sibling module shadows a library.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

# Test hooks (environment variables read per task): a task whose text or answer contains the variable's value
# makes the worker exit at once (crash), or block SIGALRM and sleep, like C code that ignores signals (hang).
CRASH_MARKER_ENV = "H1RL_TEST_CRASH_MARKER"
HANG_MARKER_ENV = "H1RL_TEST_HANG_MARKER"


class _SoftTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _SoftTimeout


def _describe(exc: BaseException) -> str:
    # Only string arguments are printed: str() of a sympy object can itself hang.
    message = "; ".join(arg for arg in exc.args if isinstance(arg, str))[:200]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _gold_latex(gold: str) -> str:
    # math-verify extracts LaTeX from inside math delimiters; a bare reference answer such as "x^2+1" or "\sqrt{2}"
    # only parses once wrapped (while "0.5" or "\frac{1}{2}" parse either way).
    if any(d in gold for d in ("$", "\\(", "\\[", "\\boxed")):
        return gold
    return f"${gold}$"


def check(gold: str, answer: str | None, text: str) -> tuple[str, str]:
    """Status and detail of one task (see the module docstring), without any deadline."""
    from math_verify import parse, verify

    gold_parsed = parse(_gold_latex(gold), parsing_timeout=None, raise_on_error=True)
    if not gold_parsed:
        return "bad_gold", "math-verify found no answer in the reference"
    source = text if answer is None else f"\\boxed{{{answer}}}"
    answer_parsed = parse(source, parsing_timeout=None, raise_on_error=True)
    if not answer_parsed:
        return "no_answer", "no boxed answer" if answer is None else "boxed answer does not parse"
    # verify(list, list) is any(pair verifies); pair by pair so that an exception in one comparison is reported
    # instead of silently reading as "wrong" (math-verify's default), while the verdict stays the same.
    failure = None
    for g in gold_parsed:
        for a in answer_parsed:
            try:
                if verify(g, a, timeout_seconds=None, raise_on_error=True):
                    return "correct", ""
            except Exception as exc:
                failure = failure or exc
    if failure is not None:
        return "error", _describe(failure)
    return "wrong", ""


def _test_hooks(task: dict) -> None:
    def marked(env: str) -> bool:
        marker = os.environ.get(env)
        return bool(marker) and (marker in task["text"] or marker in (task["answer"] or ""))

    if marked(CRASH_MARKER_ENV):
        os._exit(3)
    if marked(HANG_MARKER_ENV):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(3600)


def _run_task(task: dict) -> tuple[str, str]:
    _test_hooks(task)
    signal.setitimer(signal.ITIMER_REAL, task["soft_timeout_s"])
    try:
        return check(task["gold"], task["answer"], task["text"])
    except _SoftTimeout:
        return "timeout", f"soft deadline of {task['soft_timeout_s']:.2f} s"
    except Exception as exc:
        return "error", _describe(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _die_with_parent(parent_pid: int) -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    for arg in sys.argv[1:]:
        if arg.startswith("--die-with-parent=") and sys.platform.startswith("linux"):
            _die_with_parent(int(arg.split("=", 1)[1]))
    # The protocol owns the original stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warnings
    check("1", None, "$1$")  # import sympy, math-verify and the LaTeX grammar before the first deadline runs
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        status, detail = _run_task(json.loads(line))
        out.write(json.dumps({"status": status, "detail": detail}) + "\n")


if __name__ == "__main__":
    main()
