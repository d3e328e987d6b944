"""One training epoch of each task's ``paper`` preset on an accelerator: step time and throughput.

Usage (on a machine with a GPU; the bundled data stand in for the real corpora, so the sizes
of an epoch are the bundled ones, the models and batch sizes are the ``paper`` presets'):

    python bench/gpu_epoch.py --device cuda --out gpu-epoch.json [--tasks asr-rnn image]

Per task: one full epoch through the loop's own ``_train_epoch`` (autocast, the sync-free
loss sum, pinned copies, all as ``topdown baseline`` trains), timed with the device
synchronised at both ends, after a few warm-up steps (kernel choice, allocation); then one
validation pass. Reported: steps, seconds, ms per step,
examples per second (utterances, images, or tokens for the language model), peak memory.
Then the same first steps of an epoch twice, alternately with and without reading the loss after
every step (``.item()``, a host-device sync), which shows what the sync-free loop saves.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topdown import loop  # noqa: E402
from topdown.optim import make_optimizer  # noqa: E402
from topdown.resume_point import LoopState  # noqa: E402
from topdown.tasks import make_task, resolve_config  # noqa: E402

TASKS = ("asr-rnn", "asr-transformer", "lm-awd", "image")


def examples_in(batch) -> int:
    """Utterances or images: the leading size of the batch's first tensor; tokens for the LM."""
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return first.numel() if first.dtype == torch.long else first.shape[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(model, task, cfg, opt, params, device, n: int, *, read_loss: bool) -> int:
    """Up to ``n`` plain training steps over the first batches of an epoch; ``read_loss`` reads
    each step's loss on the host. Returns the steps taken."""
    model.train()
    taken = 0
    for batch in task.train_batches(torch.Generator().manual_seed(1), 1.0):
        if taken == n:
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            loss = task.loss(model, loop.move_to(batch, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        if read_loss:
            loss.item()
        taken += 1
    return taken


def measure(name: str, device: torch.device, sync_steps: int, warmup_steps: int = 5) -> dict:
    config = resolve_config(name, "paper", {"train": {"epochs": 1}})
    task = make_task(name, config.task, None)
    torch.manual_seed(0)
    model = task.build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = config.train
    opt = make_optimizer(params, cfg)
    state = LoopState(lr=cfg.lr, total_steps=10**9)
    counted = {"steps": 0, "examples": 0}
    original = task.train_batches

    def counting(generator, subset):
        for batch in original(generator, subset):
            counted["steps"] += 1
            counted["examples"] += examples_in(batch)
            yield batch

    _steps(
        model, task, cfg, opt, params, device, warmup_steps, read_loss=False
    )  # kernels chosen, memory allocated
    task.train_batches = counting
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    train_loss = loop._train_epoch(
        model, task, cfg, opt, params, state, seed=0, subset=1.0, device=device, desc=name
    )
    sync(device)
    seconds = time.perf_counter() - started
    task.train_batches = original
    started = time.perf_counter()
    val = loop.evaluate(model, task, "val")
    val_seconds = time.perf_counter() - started

    # The same number of steps with the loss read after each one, as the loop did before (a sync per step).
    sync(device)
    started = time.perf_counter()
    timed = _steps(model, task, cfg, opt, params, device, sync_steps, read_loss=True)
    sync(device)
    synced_ms = 1000 * (time.perf_counter() - started) / max(timed, 1)
    started = time.perf_counter()
    timed_free = _steps(model, task, cfg, opt, params, device, sync_steps, read_loss=False)
    sync(device)
    free_ms = 1000 * (time.perf_counter() - started) / max(timed_free, 1)
    return {
        "task": name,
        "amp": cfg.amp,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": counted["steps"],
        "train_seconds": round(seconds, 2),
        "ms_per_step": round(1000 * seconds / counted["steps"], 2),
        "examples_per_second": round(counted["examples"] / seconds, 1),
        "unit": "tokens" if name == "lm-awd" else ("images" if name == "image" else "utterances"),
        "ms_per_step_item_each_step": round(synced_ms, 2),
        "ms_per_step_no_item": round(free_ms, 2),
        "steps_compared": timed,
        "val_seconds": round(val_seconds, 2),
        "train_loss": round(train_loss, 4),
        "val": {k: round(v, 4) for k, v in val.items()},
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)
        if device.type == "cuda"
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--sync-steps", type=int, default=50, help="steps of the per-step-sync comparison")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    results = []
    for name in args.tasks:
        results.append(measure(name, device, args.sync_steps))
        print(json.dumps(results[-1]), flush=True)
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
