"""accuracy_reward: agreement with math-verify, bounded time on adversarial input, crashes and hangs replaced and
counted, no leaked processes."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from math_verify import parse, verify

import h1rl.rewards
from h1rl.rewards import AccuracyReward, accuracy_reward
from h1rl.rewards._verify_worker import CRASH_MARKER_ENV, HANG_MARKER_ENV

# (reference answer, completion): ordinary cases, right and wrong
ORDINARY = [
    ("42", r"Adding up, the total is \boxed{42}."),
    ("42", r"So the answer is $\boxed{41}$."),
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    ("0.5", r"The probability is \boxed{\dfrac{1}{2}}"),
    (r"\frac{1}{3}", r"\boxed{0.5}"),
    ("x^2+1", r"\boxed{1 + x^2}"),
    (r"\sqrt{2}", r"\boxed{2^{1/2}}"),
    (r"\pi/2", r"\boxed{\frac{\pi}{2}}"),
    ("(1,2)", r"the interval is \boxed{(1, 2)}"),
    (r"$\frac{3}{4}$", r"\boxed{\frac{3}{4}}"),
    ("7", "I think the answer is 7"),  # no boxed answer: math-verify's own extraction
    ("7", "I have no idea."),  # nothing to extract
    ("7", ""),
]
EXPECTED = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def alive(pid: int) -> bool:
    """A zombie is dead: an orphan is reaped by whatever adopts it, possibly late."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def math_verify_directly(gold: str, completion: str) -> float:
    """math-verify as its documentation uses it: reference inside math delimiters, completion parsed whole."""
    gold = gold if "$" in gold else f"${gold}$"
    return float(verify(parse(gold), parse(completion)))


@pytest.fixture(scope="module")
def reward():
    with accuracy_reward(timeout_s=10.0, num_workers=2) as r:
        yield r


def test_agrees_with_math_verify_on_ordinary_cases(reward):
    golds, completions = zip(*ORDINARY)
    rewards = reward(prompts=["q"] * len(ORDINARY), completions=list(completions), answer=list(golds))
    assert rewards == [math_verify_directly(g, c) for g, c in ORDINARY]
    assert rewards == EXPECTED


def test_chat_completions_and_number_columns(reward):
    completions = [
        [{"role": "assistant", "content": r"It is \boxed{12}."}],
        [{"role": "assistant", "content": r"It is \boxed{13}."}],
        # tool call, then the final assistant message holds the answer
        [
            {"role": "assistant", "content": "", "tool_calls": []},
            {"role": "tool", "content": r"\boxed{13}"},
            {"role": "assistant", "content": r"Done: \boxed{12}"},
        ],
        # the response parser split the reasoning off; the answer is in the content
        [{"role": "assistant", "reasoning_content": r"maybe \boxed{13}", "content": r"\boxed{12}"}],
    ]
    assert reward(completions=completions, answer=[12, 12, 12, 12]) == [1.0, 0.0, 1.0, 1.0]


def test_last_boxed_answer_is_the_final_answer(reward):
    # math-verify alone reads every boxed answer of a completion as a set; the final (last) one is the answer here
    completions = [r"\boxed{3} no wait, \boxed{4}"] * 2
    assert reward(completions=completions, answer=["4", "3"]) == [1.0, 0.0]


def test_unparseable_reference_is_none_and_counted(reward):
    reward.reset_stats()
    assert reward(completions=[r"\boxed{1}", r"\boxed{1}", r"\boxed{1}"], answer=[None, "", "1"]) == [None, None, 1.0]
    assert reward.stats()["bad_gold"] == 2 and reward.stats()["correct"] == 1 and reward.stats()["checked"] == 3


def test_missing_answer_column_names_it(reward):
    with pytest.raises(KeyError, match="'solution'.*columns passed were \\['answer'\\]"):
        AccuracyReward(answer_column="solution")(completions=["x"], answer=["1"])


def test_stats_log_metric_and_log_extra(reward):
    reward.reset_stats()
    metrics, extra = {}, {}
    rewards = reward(
        completions=[r"\boxed{1}", r"\boxed{2}", "nothing"],
        answer=["1", "1", "1"],
        log_metric=metrics.__setitem__,
        log_extra=extra.__setitem__,
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0, 0.0]
    assert reward.stats() == {
        "checked": 3,
        "correct": 1,
        "wrong": 1,
        "no_answer": 1,
        "bad_gold": 0,
        "timeouts": 0,
        "crashes": 0,
        "errors": 0,
    }
    assert metrics["accuracy_reward/correct"] == pytest.approx(1 / 3)
    assert metrics["accuracy_reward/failed"] == 0.0
    assert extra == {"accuracy_reward_status": ["correct", "wrong", "no_answer"]}


def test_adversarial_inputs_return_within_the_timeout_and_count_as_failures():
    adversarial = {
        "power tower": r"\boxed{9^{9^{9^{9^{9}}}}}",
        "nested braces": r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
        "100 kB of parentheses": "$" + "(" * 100_000 + "$",  # no boxed answer: math-verify's full extraction
        "huge integer power": "$" + "9" * 4000 + "^{" + "9" * 4000 + "}$",
    }
    timeout_s = 1.0
    with accuracy_reward(timeout_s=timeout_s, num_workers=2) as reward:
        reward(completions=[r"\boxed{1}"], answer=["1"])  # workers up before the clock starts
        reward.reset_stats()
        for name, completion in adversarial.items():
            start = time.monotonic()
            assert reward(completions=[completion], answer=["9"]) == [0.0], name
            assert time.monotonic() - start < timeout_s + 0.5, name
        stats = reward.stats()
        assert stats["timeouts"] + stats["errors"] + stats["crashes"] == len(adversarial), stats
        # random garbage is parsed quickly (and wrong); it must not take longer either
        garbage = "".join("0123456789+-*/^_{}()[]$\\ abcxyz=.,"[(i * 7919) % 34] for i in range(100_000))
        start = time.monotonic()
        assert reward(completions=[garbage], answer=["9"]) == [0.0]
        assert time.monotonic() - start < timeout_s + 0.5
        # the pool still scores ordinary completions afterwards
        assert reward(completions=[r"\boxed{2}", r"\boxed{3}"], answer=["2", "2"]) == [1.0, 0.0]


def test_a_crashed_worker_is_replaced_and_counted(monkeypatch):
    monkeypatch.setenv(CRASH_MARKER_ENV, "CRASH-HERE")
    with accuracy_reward(num_workers=2) as reward:
        completions = [r"\boxed{1}", r"\boxed{1 CRASH-HERE}", r"\boxed{1}", r"\boxed{2}"]
        assert reward(completions=completions, answer=["1"] * 4) == [1.0, 0.0, 1.0, 0.0]
        assert reward.stats()["crashes"] == 1 and reward.pool.restarts == 1
        assert reward(completions=[r"\boxed{5}"] * 3, answer=["5"] * 3) == [1.0] * 3  # the next batch works
        assert len(reward.pool.pids()) == 2


def test_a_worker_stuck_in_c_code_is_killed_at_the_deadline(monkeypatch):
    monkeypatch.setenv(HANG_MARKER_ENV, "HANG-HERE")  # the worker blocks SIGALRM and sleeps: its alarm cannot fire
    with accuracy_reward(timeout_s=1.0, num_workers=1) as reward:
        reward(completions=[r"\boxed{1}"], answer=["1"])
        stuck = reward.pool.pids()
        start = time.monotonic()
        assert reward(completions=[r"\boxed{1 HANG-HERE}", r"\boxed{1}"], answer=["1", "1"]) == [0.0, 1.0]
        assert time.monotonic() - start < 1.0 + 5.0  # the deadline, plus starting a replacement for sample 1
        assert reward.stats()["timeouts"] == 1 and reward.pool.restarts == 1
        assert not alive(stuck[0])


def test_identical_checks_run_once(monkeypatch):
    """G samples of a prompt often agree: identical (answer, reference) pairs are checked once and share the
    result, so three copies of a hanging check cost one deadline and one replaced worker, not three."""
    monkeypatch.setenv(HANG_MARKER_ENV, "HANG-HERE")
    with accuracy_reward(timeout_s=1.0, num_workers=1) as reward:
        hang = r"\boxed{1 HANG-HERE}"
        completions = [hang, r"\boxed{1}", hang, r"\boxed{2}", hang]
        assert reward(completions=completions, answer=["1"] * 5) == [0.0, 1.0, 0.0, 0.0, 0.0]
        stats = reward.stats()
        assert (stats["timeouts"], stats["correct"], stats["wrong"]) == (3, 1, 1)  # counted per sample
        assert reward.pool.restarts == 1
        # the same text against another reference is another check
        assert reward(completions=[r"\boxed{2}", r"\boxed{2}"], answer=["2", "3"]) == [1.0, 0.0]


def test_close_leaves_no_worker_processes():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    reward = accuracy_reward(num_workers=2)
    reward(completions=[r"\boxed{1}"], answer=["1"])
    pids = reward.pool.pids()
    assert len(pids) == 2 and set(pids) <= {p.pid for p in me.children(recursive=True)}
    reward.close()
    assert {p.pid for p in me.children(recursive=True)} == before
    assert not any(alive(pid) for pid in pids)
    assert reward(completions=[r"\boxed{1}"], answer=["1"]) == [1.0]  # usable again after close
    reward.close()


def _run_script(body: str) -> subprocess.Popen:
    """Run `body` in a fresh interpreter that imports h1rl.rewards without h1rl/__init__ (torch: seconds per run)."""
    preamble = f"""
        import sys, types
        sys.modules["h1rl"] = types.ModuleType("h1rl")
        sys.modules["h1rl"].__path__ = [{str(Path(h1rl.rewards.__file__).parent.parent)!r}]
    """
    script = textwrap.dedent(preamble) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_no_worker_outlives_the_interpreter():
    # exits without close(): the pool's finalizer kills the workers
    proc = _run_script(
        """
        from h1rl.rewards import accuracy_reward
        reward = accuracy_reward(num_workers=2)
        assert reward(completions=[r"\\boxed{1}"], answer=["1"]) == [1.0]
        print(*reward.pool.pids(), flush=True)
        """
    )
    out, _ = proc.communicate(timeout=60)
    pids = [int(p) for p in out.split()]
    assert proc.returncode == 0 and len(pids) == 2
    assert not any(alive(pid) for pid in pids)


def test_no_worker_outlives_a_killed_trainer():
    # SIGKILL gives the parent no chance to clean up; a worker stuck in C code dies with it (Linux)
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux-only")
    proc = _run_script(
        f"""
        import os
        os.environ["{HANG_MARKER_ENV}"] = "HANG-HERE"
        from h1rl.rewards import accuracy_reward
        reward = accuracy_reward(num_workers=1, timeout_s=600)
        reward(completions=[r"\\boxed{{1}}"], answer=["1"])
        print(*reward.pool.pids(), flush=True)
        reward(completions=["HANG-HERE"], answer=["1"])
        """
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    time.sleep(0.3)  # let the worker take the hanging task
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids and not any(alive(pid) for pid in pids)


def test_pickled_copy_keeps_settings_not_processes(reward):
    copy = pickle.loads(pickle.dumps(reward))
    assert (copy.answer_column, copy.timeout_s, copy.num_workers) == ("answer", 10.0, 2)
    assert copy._pool is None and copy.stats()["checked"] == 0
    with copy:
        assert copy(completions=[r"\boxed{1}"], answer=["1"]) == [1.0]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="timeout_s"):
        accuracy_reward(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        accuracy_reward(num_workers=0)
    with pytest.raises(TypeError, match="column 'answer' row 1 is a list"):
        AccuracyReward()(completions=["a", "b"], answer=["1", [1]])


def test_prefetched_checks_give_the_same_rewards_and_are_used():
    """`prefetch` checks completions in the background; the scoring call then returns what it would without it (same
    rewards, statuses and counters), takes the prefetched results instead of checking again, and drops the ones no
    call asked for."""
    completions = ["so \\boxed{4}", "\\boxed{5}", "no answer here", "\\boxed{4}"]
    columns = {"answer": ["4", "4", "4", None]}
    plain = accuracy_reward(num_workers=1)
    with accuracy_reward(num_workers=1) as reward:
        expected = plain(completions=completions, **columns)
        reward.prefetch(completions=completions[:2], **{"answer": columns["answer"][:2]})
        reward.prefetch(completions=["\\boxed{7}"], answer=["7"])  # never scored: dropped by the next call
        sent = []
        original = reward.pool.run
        reward.pool.run = lambda tasks: sent.append(len(tasks)) or original(tasks)
        assert reward(completions=completions, **columns) == expected == [1.0, 0.0, 0.0, None]
        assert sent == [1]  # only the completion not prefetched (the one without a reference is not checked)
        assert reward.stats() == plain.stats()
        assert reward._prefetched == {}
    plain.close()
