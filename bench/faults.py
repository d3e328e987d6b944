"""Fault campaign: random SIGKILLs with --resume, and torn or corrupt files, on a digits cascade.

    python bench/faults.py --kills 20            # the campaign recorded in bench/RESULTS.md
                                                 # (run it from a checkout nobody edits meanwhile)
    (tests/test_faults.py runs one kill trial and every corruption case)

Each kill trial starts a cascade, kills it with SIGKILL at a random moment (half of the trials
kill the resume too), resumes with --resume until it completes, and compares summary, metrics
and checkpoints with an uninterrupted run. Each corruption case damages one file of a run and
checks that the next command either recovers (restarting only unfinished work) or ends in one
line naming what is damaged and what is intact, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from topdown.files import file_digest

ROOT = Path(__file__).resolve().parents[1]
JOB = ["cascade", "digits", "--preset", "tiny", "--set", "cascade.candidates=2"]


def topdown(*args: str, background: bool = False):
    cmd = [sys.executable, "-m", "topdown.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def record(run: Path) -> dict:
    """What must match an uninterrupted run: the summary and metrics without wall-clock fields, the
    checkpoints, and which files the run directory holds (a report written, no debris left)."""
    from safetensors.torch import load_file

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("seconds", "resumed_on", "provenance")}
        return [strip(v) for v in o] if isinstance(o, list) else o

    ckpts = {
        f.name: {k: v.tolist() for k, v in load_file(str(f)).items()}
        for f in sorted((run / "checkpoints").glob("*.safetensors"))
    }
    metrics = [strip(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "summary": strip(json.loads((run / "summary.json").read_text())),
        "metrics": metrics,
        "checkpoints": ckpts,
        "files": sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()),
    }


def kill_after(args: list[str], seconds: float) -> bool:
    """Start ``topdown args`` and SIGKILL it after ``seconds``; False if it finished first."""
    proc = topdown(*args, background=True)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def debris(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*.tmp")] + [
        str(p.relative_to(run)) for p in (run / "state").glob("*")
    ]


def uninterrupted(out: Path) -> tuple[Path, float]:
    """The reference run, and how long it took."""
    reference = out / "reference"
    started = time.perf_counter()
    assert topdown(*JOB, "--out", str(reference)).returncode == 0
    return reference, time.perf_counter() - started


def kill_campaign(out: Path, reference: Path, duration: float, kills: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    # resumed: trials that a kill left with a run on disk, finished by --resume (the others started afresh)
    counts = {
        "trials": kills,
        "identical": 0,
        "resumed": 0,
        "killed_twice": 0,
        "debris_left": 0,
        "failures": [],
    }
    want = record(reference)
    for i in range(kills):
        run = out / f"kill-{i}"
        kill_after([*JOB, "--out", str(run)], rng.uniform(0.5, duration))
        if rng.random() < 0.5 and (run / "summary.json").is_file():
            counts["killed_twice"] += kill_after(
                [*JOB, "--out", str(run), "--resume"], rng.uniform(0.5, duration / 2)
            )
        resume = ["--resume"] if (run / "summary.json").is_file() else []
        counts["resumed"] += bool(resume)
        proc = topdown(*JOB, "--out", str(run), *resume)
        if proc.returncode != 0:
            counts["failures"].append(f"trial {i}: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        counts["identical"] += record(run) == want
        counts["debris_left"] += bool(debris(run))
    return counts


def one_line_error(proc: subprocess.CompletedProcess) -> bool:
    lines = proc.stderr.strip().splitlines()
    return (
        proc.returncode != 0
        and "Traceback" not in proc.stderr
        and bool(lines)
        and lines[-1].startswith("topdown: error:")
    )


def corruption_cases(out: Path, reference: Path, duration: float) -> dict[str, bool]:
    """Each case: damage one file, run the natural next command, check the outcome."""
    want = record(reference)
    rng = random.Random(1)
    results = {}

    def interrupted() -> Path:
        """One run killed during stage 1 or later, so that a finished stage and a resume point exist."""
        run, length = out / "interrupted", duration
        for _ in range(50):
            if run.exists():
                subprocess.run(["rm", "-rf", str(run)])
            kill_after([*JOB, "--out", str(run)], rng.uniform(0.5, 0.95) * length)
            summary = (
                json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
            )
            if (
                summary.get("stages")
                and summary.get("status") == "running"
                and list((run / "state").glob("*.safetensors"))
            ):
                return run
            length *= (
                0.8 if summary.get("status") == "complete" else 1.2
            )  # the machine's speed changes under other load
        raise RuntimeError("could not interrupt a run between its first stage and its end")

    killed = interrupted()

    def unfinished(name: str) -> Path:
        """A copy of the interrupted run for one case to damage (one kill serves every case)."""
        run = out / name
        subprocess.run(["cp", "-r", str(killed), str(run)], check=True)
        return run

    run = unfinished("killed-mid-stage")  # the plain case: a SIGKILL during a stage, nothing damaged
    proc = topdown(*JOB, "--out", str(run), "--resume")
    results["killed during a stage: --resume ends as if uninterrupted"] = (
        proc.returncode == 0 and not debris(run) and record(run) == want
    )

    run = unfinished(
        "truncated-resume-point"
    )  # a torn resume point: the stage restarts, the run ends as if uninterrupted
    for f in (run / "state").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = topdown(*JOB, "--out", str(run), "--resume")
    results["truncated resume point: stage restarts, result identical"] = (
        proc.returncode == 0 and record(run) == want
    )

    run = unfinished("tmp-debris")  # a kill mid-write leaves a temporary file: resume removes it
    (run / "checkpoints" / ".stage-1.safetensors.abc123.tmp").write_bytes(b"half a file")
    proc = topdown(*JOB, "--out", str(run), "--resume")
    results["temporary-file debris: removed on resume"] = (
        proc.returncode == 0 and not debris(run) and record(run) == want
    )

    run = unfinished(
        "best-ahead-of-record"
    )  # killed after writing the next accepted stage's best, before the record
    best = run / "checkpoints" / "best.safetensors"
    newer = next(
        f
        for f in sorted((reference / "checkpoints").glob("stage-*.safetensors"))
        if file_digest(f) != file_digest(best)
    )
    best.write_bytes(newer.read_bytes())
    proc = topdown(*JOB, "--out", str(run), "--resume")
    results["best ahead of the record: restored from the chosen stage, result identical"] = (
        proc.returncode == 0 and record(run) == want
    )

    run = unfinished(
        "torn-metrics-line"
    )  # an append to metrics.jsonl cut short: resume drops it, logs that epoch again
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": 1, "candidate": 0, "ep')
    proc = topdown(*JOB, "--out", str(run), "--resume")
    results["torn last metrics line: dropped on resume, result identical"] = (
        proc.returncode == 0 and record(run) == want
    )

    run = (
        out / "killed-in-first-write"
    )  # killed while writing its first summary: the same command starts the run
    run.mkdir()
    (run / ".summary.json.abc123.tmp").write_bytes(b"")
    proc = topdown(*JOB, "--out", str(run))
    results["killed in its first write: the same command starts it"] = (
        proc.returncode == 0 and not debris(run) and record(run) == want
    )

    run = unfinished(
        "corrupt-finished-checkpoint"
    )  # a finished stage's checkpoint damaged: named, not silently used
    ckpt = run / "checkpoints" / "stage-0.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-8:] = b"\x00" * 8
    ckpt.write_bytes(bytes(data))
    proc = topdown(*JOB, "--out", str(run), "--resume")
    results["corrupt finished checkpoint: one line naming it and the intact ones"] = (
        one_line_error(proc) and "stage-0" in proc.stderr and "intact" in proc.stderr
    )
    proc = topdown(
        "cascade", "digits", "--preset", "tiny", "--out", str(out / "from-corrupt"), "--from", str(ckpt)
    )
    results["corrupt checkpoint given to --from: one line"] = (
        one_line_error(proc) and "corrupt" in proc.stderr
    )

    run = out / "corrupt-summary"  # a few corrupted bytes in summary.json
    subprocess.run(["cp", "-r", str(reference), str(run)])
    data = bytearray((run / "summary.json").read_bytes())
    data[10:14] = b"\xff\xfe\x00\x01"
    (run / "summary.json").write_bytes(bytes(data))
    results["corrupt summary.json: --resume is one line"] = one_line_error(
        topdown(*JOB, "--out", str(run), "--resume")
    )
    results["corrupt summary.json: report is one line"] = one_line_error(topdown("report", str(run)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="topdown-faults-"))
    reference, duration = uninterrupted(out)
    kills = kill_campaign(out, reference, duration, args.kills, args.seed)
    cases = corruption_cases(out, reference, duration)
    print(json.dumps({"kills": kills, "corruption": cases}, indent=2))


if __name__ == "__main__":
    main()
