"""LM training throughput: our loop vs pytorch/examples' word_language_model, and frozen stages vs full model.

Usage (1 thread, the same data for both sides):

    # pytorch/examples is NOT vendored: extract its word_language_model outside the repository, e.g.
    #   G=<git dir of github.com/pytorch/examples>; mkdir -p /tmp/wlm
    #   for f in main.py data.py model.py; do
    #     git --git-dir=$G show HEAD:word_language_model/$f > /tmp/wlm/$f
    #   done
    OMP_NUM_THREADS=1 python bench/lm_throughput.py --wlm /tmp/wlm --reps 2

What is measured:
1. peer: word_language_model's own main.py (LSTM, 2 layers, 200/200, dropout 0.2, untied,
   batch 20, bptt 35, lr 20, clip 0.25, manual SGD) for one epoch; tokens/s from its own
   "ms/batch" log lines (training time only; the first interval, a warm-up, is dropped).
   ours: `topdown.loop.fit` on `lm-awd` configured as the same plain LSTM (model.tie=none,
   locked dropout 0.2 on input/between layers/output, no embedding dropout, no weight-drop,
   no AR/TAR, fixed bptt 35, plain SGD lr 20, clip 0.25) for one epoch; training time = the
   epoch's seconds minus the validation time. Both read the same directory (WT2-small written
   as train/valid/test.txt, words unseen in training replaced by <unk> so that both build the
   same 13,777-word vocabulary). Runs alternate (peer, ours, peer, ours, ...), each in a fresh process.
2. frozen vs full: the `bench` preset's AWD-LSTM (tie=classifier), training tokens/s of one
   pass over the first 30 % of the training stream with all blocks trained and with the
   blocks above split k frozen (k = 4, 3, 2), as a cascade stage trains them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAIN = {
    "data": {"batch_size": 20, "eval_batch_size": 10, "bptt": 35, "variable_bptt": False},
    "model": {
        "emsize": 200,
        "hidden": 200,
        "layers": 2,
        "tie": "none",
        "dropoute": 0.0,
        "dropouti": 0.2,
        "dropouth": 0.2,
        "dropout": 0.2,
        "wdrop": 0.0,
    },
    "loss": {"alpha": 0.0, "beta": 0.0},
    "train": {
        "optimizer": "sgd",
        "lr": 20.0,
        "momentum": 0.0,
        "clip": 0.25,
        "weight_decay": 0.0,
        "epochs": 1,
        "early_stop": 0,
    },
}


def write_data(out: Path) -> None:
    from topdown.tasks.lm import corpus

    lines = corpus.load_wt2_small()
    vocab = set(corpus.build_vocab(lines["train"]))
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.txt"), ("val", "valid.txt"), ("test", "test.txt")):
        text = "".join(
            " ".join(w if w in vocab else "<unk>" for w in line.split()) + "\n" for line in lines[split]
        )
        (out / name).write_text(text)


def run_peer(wlm: Path, data: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(wlm / "main.py"),
        "--data",
        str(data),
        "--epochs",
        "1",
        "--log-interval",
        "50",
        "--save",
        "/tmp/wlm-bench-model.pt",
        "--emsize",
        "200",
        "--nhid",
        "200",
        "--nlayers",
        "2",
        "--dropout",
        "0.2",
        "--lr",
        "20",
        "--clip",
        "0.25",
        "--batch_size",
        "20",
        "--bptt",
        "35",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=str(wlm)).stdout
    ms = [float(m) for m in re.findall(r"ms/batch\s+([\d.]+)", out)][1:]
    return 20 * 35 / (statistics.mean(ms) / 1000)


def run_ours(data: Path) -> float:
    import torch

    torch.set_num_threads(1)
    from topdown.loop import fit
    from topdown.tasks import resolve_config
    from topdown.tasks.lm import awd

    cfg = resolve_config("lm-awd", "demo", PLAIN)
    task = awd.make(cfg.task, str(data))
    eval_seconds = []
    evaluate = task.evaluate

    def timed(model, split):
        t = time.perf_counter()
        out = evaluate(model, split)
        eval_seconds.append(time.perf_counter() - t)
        return out

    task.evaluate = timed
    torch.manual_seed(0)
    model = task.build_model()
    result = fit(model, task, cfg.train, seed=0, desc="ours")
    tokens = 20 * (task.info["tokens"]["train"] // 20 - 1)  # the epoch's windows cover all rows but the last
    return tokens / (result.seconds - sum(eval_seconds))


def run_frozen(fraction: float = 0.3) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    from topdown.blocks import Blocks
    from topdown.tasks import resolve_config
    from topdown.tasks.lm import awd

    cfg = resolve_config("lm-awd", "bench", {"data": {"variable_bptt": False}})
    task = awd.make(cfg.task)
    out = {}
    for k in (None, 4, 3, 2):
        torch.manual_seed(0)
        model = task.build_model()
        blocks = Blocks(model, task.blocks, task.shared)
        label = "full model"
        if k is not None:
            lower, upper = blocks.split(k)
            blocks.freeze(upper)
            label = f"split {k}: train {', '.join(lower)}"
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=30.0)
        model.train()
        tokens, started = 0, time.perf_counter()
        for batch in task.train_batches(torch.Generator().manual_seed(0), fraction):
            loss = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.25)
            opt.step()
            tokens += batch[0].numel()
        out[label] = tokens / (time.perf_counter() - started)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--wlm", type=Path, help="directory with word_language_model's main.py, data.py, model.py"
    )
    ap.add_argument("--data", type=Path, default=Path("/tmp/lm-throughput-data"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", choices=["peer", "ours", "frozen"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only == "peer":
        print(json.dumps(run_peer(args.wlm, args.data)))
        return
    if args.only == "ours":
        print(json.dumps(run_ours(args.data)))
        return
    if args.only == "frozen":
        print(json.dumps(run_frozen()))
        return
    if not (args.data / "train.txt").is_file():
        write_data(args.data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def child(which: str):
        cmd = [sys.executable, __file__, "--only", which, "--data", str(args.data)] + (
            ["--wlm", str(args.wlm)] if args.wlm else []
        )
        return json.loads(
            subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )

    results = {"peer": [], "ours": []}
    if args.wlm:
        for rep in range(args.reps):
            for which in ("peer", "ours"):
                results[which].append(child(which))
                print(f"rep {rep + 1} {which}: {results[which][-1]:.0f} tokens/s", flush=True)
        ratio = statistics.mean(results["ours"]) / statistics.mean(results["peer"])
        print(f"ours / word_language_model = {ratio:.3f}", flush=True)
    frozen = child("frozen")
    full = frozen["full model"]
    for label, tps in frozen.items():
        print(f"{label}: {tps:.0f} tokens/s ({tps / full:.2f} x full)", flush=True)
    print(json.dumps({"throughput": results, "frozen": frozen}))


if __name__ == "__main__":
    main()
