"""Time one decode step of this checkout against another revision, side by side in one run, and against the floor.

    python scripts/compare_decode_step.py BASE_REVISION [--hidden 512 --vocab 32000 --layers 8 --rows 1 2 4 8]

The revision is checked out into a temporary git worktree; each measurement runs in a fresh subprocess, alternating
between the two trees (`--rounds` times), so both see the same machine load. What is timed is `StaticDecoder.step`
(the rollout engine's eager decode step) of a random hybrid (every other layer m2) over a 512-token KV context, per
number of active rows; the figure is the median of each tree's per-round medians. The floor is the bytes a step must
read (every weight but the embedding, once; the KV it attends) divided by this machine's streaming read bandwidth,
measured here as a matrix-vector product over a 512 MiB matrix (too large for any cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r'''
import json, statistics, sys, time, torch
from transformers import MistralConfig, MistralForCausalLM
from h1rl.models.convert import convert_teacher
from h1rl.rollout.decode_step import StaticDecoder
hidden, vocab, layers, rows = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), [int(r) for r in sys.argv[4:]]
torch.manual_seed(0)
cfg = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=None,
                    pad_token_id=0)
model = convert_teacher(MistralForCausalLM(cfg).eval(), ["m2" if i % 2 else "t" for i in range(layers)],
                        ssm_cfg={"d_state": 16}).eval()
out = {}
for n in rows:
    dec = StaticDecoder(model, n, 1024)
    tokens, cols = torch.randint(1, vocab, (n,)), torch.full((n,), 512)
    with torch.no_grad():
        for _ in range(5):
            dec.step(tokens, cols, cols, 513)
        times = []
        for _ in range(40):
            start = time.perf_counter()
            dec.step(tokens, cols, cols, 513)
            times.append(time.perf_counter() - start)
    out[n] = statistics.median(times)
weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
kv = sum(2 * s.key[:, :, :513].numel() * s.key.element_size() for s in dec.cache.layers if hasattr(s, "key"))
print(json.dumps({"step_s": out, "weight_bytes": weights, "kv_bytes_per_row": kv // max(rows)}))
'''

BANDWIDTH = r'''
import time, torch
m = torch.randn(8192, 16384)  # 512 MiB
v = torch.randn(16384)
best = min((lambda t0: (torch.mv(m, v), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(8))
print(m.numel() * 4 / best)
'''


def run(tree: Path, code: str, *args: str) -> str:
    env = {"PYTHONPATH": str(tree)}
    import os

    env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the revision to compare against (e.g. HEAD~3)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            trees = {"base": base, "this": REPO}
            shape = [str(args.hidden), str(args.vocab), str(args.layers), *map(str, args.rows)]
            per_round: dict[str, list[dict]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    per_round[name].append(json.loads(run(tree, MEASURE, *shape)))
            bandwidth = float(run(REPO, BANDWIDTH))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)
    info = per_round["this"][0]
    print(f"decode step, hidden {args.hidden}, {args.layers} layers (half m2), vocab {args.vocab}, 512-token context, "
          f"torch threads {__import__('torch').get_num_threads()}; {args.base} vs this checkout, {args.rounds} "
          f"alternating rounds; streaming read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'rows':>5} {'base ms':>9} {'this ms':>9} {'speed-up':>9} {'floor ms':>9} {'this / floor':>12}")
    table = []
    for n in args.rows:
        base_s = statistics.median(r["step_s"][str(n)] for r in per_round["base"])
        this_s = statistics.median(r["step_s"][str(n)] for r in per_round["this"])
        floor = (info["weight_bytes"] + n * info["kv_bytes_per_row"]) / bandwidth
        table.append({"rows": n, "base_ms": base_s * 1e3, "this_ms": this_s * 1e3, "floor_ms": floor * 1e3})
        print(f"{n:>5} {base_s * 1e3:>9.2f} {this_s * 1e3:>9.2f} {base_s / this_s:>8.2f}x {floor * 1e3:>9.2f} "
              f"{this_s / floor:>11.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "bandwidth": bandwidth, "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
