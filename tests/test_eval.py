r"""`h1rl eval`: accuracy and pass@k for a plain transformer (model.generate) and a hybrid (rollout engine).

The models are tiny and trained here in seconds to answer every question with "\boxed{4}" 70% of the time and
"\boxed{5}" otherwise, and the problems alternate between answers 4 and 5, so the right numbers are known: greedy
accuracy exactly 0.5, sampled accuracy near 0.5, pass@4 well above it.
"""

from __future__ import annotations

import json

import pytest
import torch

from h1rl.data.arithmetic import ArithmeticTask, write_jsonl
from h1rl.data.teacher import TeacherConfig, build_teacher, train_teacher
from h1rl.data.tokenizer import task_corpus, train_tokenizer
from h1rl.eval import EvalConfig, evaluate, format_table, main, pass_at_k, read_results, trace_rows
from h1rl.models import HybridForCausalLM
from h1rl.models.convert import convert_teacher

TRAIN = TeacherConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, steps=60,
                      batch_size=16, lr=1e-2, warmup_steps=5, log_every=0, seed=0)


def biased_rows(n: int) -> list[dict]:
    rows = ArithmeticTask(1, seed=0).generate(n, "train")
    return [{**r, "solution": "\\boxed{4}" if i % 10 < 7 else "\\boxed{5}"} for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, trained transformer and hybrid (saved), and a test file with answers 4, 5, 4, 5, ..."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = train_tokenizer(task_corpus(n_per_level=100))
    teacher = build_teacher(tokenizer, TRAIN)
    train_teacher(teacher, tokenizer, TRAIN, rows=biased_rows(200))
    hybrid = convert_teacher(teacher, ["t", "m2"], seed=0)
    train_teacher(hybrid, tokenizer, TeacherConfig(**{**TRAIN.__dict__, "steps": 30, "lr": 3e-3}),
                  rows=biased_rows(200))
    hybrid.eval()
    for name, model in (("teacher", teacher), ("hybrid", hybrid)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    problems = [{"question": r["question"], "answer": str(4 + i % 2)}
                for i, r in enumerate(ArithmeticTask(1, seed=0).generate(12, "test"))]
    data = write_jsonl(problems, root / "test.jsonl")
    return {"root": root, "tokenizer": tokenizer, "teacher": teacher, "hybrid": hybrid, "data": data}


@pytest.mark.parametrize("which", ["teacher", "hybrid"])
def test_greedy_accuracy_and_sampled_pass_at_k(world, which):
    path = world["root"] / which
    greedy = evaluate(path, world["data"], max_completion_length=8)
    assert greedy["num_problems"] == 12 and greedy["temperature"] == 0.0
    answers = [p["completions"][0] for p in greedy["problems"]]
    assert all(text == "\\boxed{4}" for text in answers), answers  # the most likely reply, every time
    assert greedy["accuracy"] == greedy["pass@1"] == 0.5
    assert [p["correct"] for p in greedy["problems"]] == [[p["answer"] == "4"] for p in greedy["problems"]]

    sampled = evaluate(path, world["data"], num_samples=4, pass_k=[1, 2, 4], max_completion_length=8, seed=1)
    assert sampled["temperature"] == 1.0
    texts = {t for p in sampled["problems"] for t in p["completions"]}
    assert {"\\boxed{4}", "\\boxed{5}"} <= texts  # sampling at temperature 1 gives both answers
    assert 0.25 < sampled["accuracy"] < 0.75
    assert sampled["pass@1"] == pytest.approx(sampled["accuracy"])
    assert sampled["accuracy"] <= sampled["pass@2"] <= sampled["pass@4"]
    assert sampled["pass@4"] > sampled["accuracy"] + 0.1
    expected = sum(pass_at_k(4, p["num_correct"], 4) for p in sampled["problems"]) / 12
    assert sampled["pass@4"] == pytest.approx(expected)
    assert sampled["checker"]["checked"] == 48 and sampled["checker"]["timeouts"] == 0
    assert sampled["truncated"] == 0.0 and sampled["no_answer"] == 0.0


def test_engine_and_generate_agree_on_an_exact_hybrid(world):
    """An all-attention hybrid equals its teacher: greedy completions from the rollout engine and from
    model.generate must be the same texts."""
    exact = convert_teacher(world["teacher"], ["t", "t"]).eval()
    assert isinstance(exact, HybridForCausalLM)
    rows = [{"question": r["question"], "answer": r["answer"]} for r in ArithmeticTask(3, 1).generate(6, "test")]
    a = evaluate(world["teacher"], rows, world["tokenizer"], max_completion_length=12)
    b = evaluate(exact, rows, world["tokenizer"], max_completion_length=12)
    assert [p["completions"] for p in a["problems"]] == [p["completions"] for p in b["problems"]]


def test_cli_prints_a_table_and_writes_json(world, capsys):
    out = world["root"] / "results" / "eval.json"
    code = main(["--model", str(world["root"] / "hybrid"), "--dataset_name", str(world["data"]), "-n", "2",
                 "--max_completion_length", "8", "--max_samples", "6", "--batch_size", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "pass@2" in printed and str(out) in printed
    summary = json.loads(out.read_text())
    assert "problems" not in summary and summary["details"] == "eval.details.jsonl"
    samples = [json.loads(line) for line in (out.parent / "eval.details.jsonl").read_text().splitlines()]
    assert [(s["problem"], s["sample"]) for s in samples] == [(i, j) for i in range(6) for j in range(2)]
    assert {"question", "answer", "completion", "correct", "finish_reason"} <= set(samples[0])
    results = read_results(out)
    assert results["num_problems"] == 6 and results["num_samples"] == 2
    assert results["config"]["batch_size"] == 4 and len(results["problems"][0]["completions"]) == 2
    assert [p["num_correct"] for p in results["problems"]] == [sum(p["correct"]) for p in results["problems"]]
    assert results["pass@2"] >= results["accuracy"]

    traces = world["root"] / "results" / "traces.jsonl"
    assert main(["--model", str(world["root"] / "hybrid"), "--dataset_name", str(world["data"]), "-n", "2",
                 "--max-completion-length", "8", "--max-samples", "6", "--batch-size", "4", "--out", str(out),
                 "--traces", str(traces), "--traces-all"]) == 0  # TRL's parser takes --key-with-dashes too
    rows = [json.loads(line) for line in traces.read_text().splitlines()]
    results = read_results(out)
    assert rows == trace_rows(results, only_correct=False) and 6 <= len(rows) <= 12
    assert f"{len(rows)} completions of 6 problems" in capsys.readouterr().out


def test_trace_rows_keep_correct_distinct_completions_as_chats():
    results = {"config": {"system_prompt": "Be brief."}, "problems": [
        {"question": "q1", "completions": ["a", "a", "b", "c"], "correct": [True, True, True, False]},
        {"question": "q2", "completions": ["d", ""], "correct": [False, False]},  # an empty one is never kept
    ]}
    chat = lambda q, a: {"messages": [{"role": "system", "content": "Be brief."},  # noqa: E731
                                      {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    assert trace_rows(results) == [chat("q1", "a"), chat("q1", "b")]
    assert trace_rows(results, only_correct=False) == [chat("q1", "a"), chat("q1", "b"), chat("q1", "c"),
                                                       chat("q2", "d")]
    results["config"]["system_prompt"] = None
    assert trace_rows(results)[0]["messages"][0] == {"role": "user", "content": "q1"}


def test_pass_at_k_estimator():
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_bad_settings_and_data_are_named(world, tmp_path):
    with pytest.raises(ValueError, match="identical completions"):
        EvalConfig(num_samples=4, temperature=0.0)
    with pytest.raises(ValueError, match=r"pass_k values must be in 1..num_samples \(2\)"):
        EvalConfig(num_samples=2, pass_k=[4])
    bad = write_jsonl([{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": "2"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question'\] \(prompt_column\); the dataset has "
                                         r"\['prompt', 'answer'\]"):
        evaluate(world["teacher"], str(bad), world["tokenizer"])
    with pytest.raises(ValueError, match=r"row 1: column 'question': empty prompt"):
        evaluate(world["teacher"], [{"question": "q", "answer": "1"}, {"question": " ", "answer": "2"}],
                 world["tokenizer"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        evaluate(world["teacher"], str(tmp_path / "missing.jsonl"), world["tokenizer"])
    with pytest.raises(ValueError, match="needs its tokenizer"):
        evaluate(world["teacher"], [{"question": "q", "answer": "1"}])


def test_format_table_lines_up():
    r = {"num_problems": 3, "num_samples": 4, "temperature": 1.0, "accuracy": 0.25, "pass@1": 0.25, "pass@4": 0.5,
         "no_answer": 0.0, "truncated": 0.0, "mean_completion_tokens": 5.0}
    table = format_table({"a": r, "longer name": {**r, "accuracy": 1.0}})
    lines = table.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert "pass@4" in lines[0] and "1.000" in lines[2]


def test_eval_leaves_the_global_rng_and_training_mode_alone(world):
    model = world["teacher"].train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate(model, [{"question": "Mia has two apples.", "answer": "2"}], world["tokenizer"], num_samples=2,
             max_completion_length=4)
    assert torch.equal(torch.rand(3), expected) and model.training
    model.eval()


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "8"], "--max-new-tokens was renamed --max_completion_length"),
    (["--question-column", "q"], "--question-column was renamed --prompt_column"),
    (["--data", "x.jsonl"], "--data was renamed --dataset_name"),
    (["--split", "train"], "--split was renamed --dataset_test_split"),
    (["--num_sample", "2"], "unknown option --num_sample (did you mean '--num_samples'?)"),
])
def test_cli_names_renamed_and_unknown_options(argv, message, capsys):
    """`h1rl eval` takes `--key value` for the keys of EvalArguments and EvalConfig (TRL's parser, as `h1rl grpo`);
    an old name fails with the new one named, before anything loads."""
    assert main(["--model", "nowhere", *argv]) == 2
    assert message in capsys.readouterr().err
