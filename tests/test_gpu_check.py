"""The prepared GPU check runs every non-CUDA code path on CPU (`--cpu-smoke`), so it works the first time a GPU
session is lent: every section completes and records its figures."""

from __future__ import annotations

import json

from h1rl.bench.gpu_check import main


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert main(["--cpu-smoke", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["mode"] == "cpu-smoke" and results["failed_sections"] == []
    sections = ["a_kernels", "b_scan", "b_mixer", "c_engine_modes", "d_logprobs", "e_timing", "f_grpo_step",
                "g_fused_attention", "h_synced_decode", "i_against_teacher"]
    assert all(key in results and "error" not in results[key] for key in sections)
    assert results["g_fused_attention"]["all_fused"] and len(results["g_fused_attention"]["rows"]) == 5
    assert results["h_synced_decode"]["ok"]
    grpo = results["f_grpo_step"]
    assert grpo["settings"]["device"] == "cpu" and grpo["speedup"] > 0
    hybrids = {"h1rl HybridGRPOTrainer", "h1rl, share_prompt_prefix on", "h1rl, share_prompt_prefix off",
               "h1rl, length_chunks 1"}
    assert set(grpo["step_s"]) == {"trl.GRPOTrainer (generate)"} | hybrids
    assert set(grpo["speedups"]) == set(grpo["hybrid"]) == hybrids
    against = results["i_against_teacher"]
    assert {(r["cap"], r["model"], r["trainer"]) for r in against["rows"]} == {
        (16, "teacher", "trl.GRPOTrainer"), (16, "hybrid", "HybridGRPOTrainer"), (16, "hybrid", "trl.GRPOTrainer"),
        (32, "teacher", "trl.GRPOTrainer"), (32, "hybrid", "HybridGRPOTrainer")}
    assert all(r["step_s"] > 0 and r["rollout_s"] > 0 for r in against["rows"])
    assert set(against["partial_rollouts"]["runs"]) == {"off", "off + IS", "on"}
