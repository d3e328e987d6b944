"""The command line as a user meets it: help, list, report, bad input, kill-and-resume."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PYTHONPATH, ROOT, cli, read_summary, without_seconds
from safetensors.torch import load_file

TINY_DIGITS = ["digits", "--preset", "tiny"]


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("topdown: error:"), proc.stderr[-2000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "Traceback" not in proc.stderr


def test_help_and_list():
    out = cli("--help", check=True).stdout
    commands = re.findall(
        r"^    ([a-z-]+)", out, re.M
    )  # argparse's subcommand lines, each a command's name first
    assert set(commands) == {
        "baseline",
        "cascade",
        "retrain-classifier",
        "transfer-classifier",
        "forget",
        "run",
        "compare",
        "sweep",
        "analyse",
        "report",
        "list",
    }
    assert "--split" in cli("transfer-classifier", "--help", check=True).stdout
    assert "--forgetting" in cli("compare", "--help", check=True).stdout
    assert "alias of `topdown run forgetting`" in " ".join(out.split())
    listing = cli("list", check=True).stdout
    assert "asr-rnn" in listing and "lstm1" in listing and "digits" in listing and "layer3" in listing
    assert "lr_patience" in cli("list", "--config", "asr-rnn", check=True).stdout
    paper = cli(
        "list", "--preset", "paper", check=True
    ).stdout  # digits has no paper preset: said, not an error
    assert "(no paper preset)" in paper and "lstm4" in paper


def test_a_closed_output_pipe_is_not_a_traceback():
    """`topdown list | head -1`: the reader leaves before we write; no Python traceback follows."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    proc = subprocess.Popen(
        [sys.executable, "-m", "topdown.cli", "list", "--config", "asr-rnn"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before anything is written
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 1 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch advises huge pages on Linux only")
@pytest.mark.parametrize("setting, page_aligned", [(None, True), ("0", False)])
def test_large_cpu_tensors_get_huge_pages_unless_the_user_says_otherwise(setting, page_aligned):
    """PyTorch aligns a large tensor to a page only when it advises huge pages for it (THP_MEM_ALLOC_ENABLE),
    and reads that setting once: the command line must set it before its first tensor."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update({"PYTHONPATH": PYTHONPATH, **({"THP_MEM_ALLOC_ENABLE": setting} if setting else {})})
    probe = (
        "import contextlib, io, torch; from topdown.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['list'])\n"
        "print(torch.empty(1 << 22).data_ptr() % 4096)"
    )
    offset = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert (int(offset) == 0) == page_aligned


def test_forget_runs_from_the_command_line_and_refuses_a_split_out_of_range(tmp_path):
    cli(
        "forget",
        *TINY_DIGITS,
        "--split",
        "2",
        "--set",
        "procedure.rounds=1",
        "--out",
        str(tmp_path / "f"),
        check=True,
    )
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert [s["reinit_blocks"] for s in summary["stages"][1:]] == [["layer3", "output"]]
    assert_one_line_error(
        cli("forget", *TINY_DIGITS, "--split", "9", "--out", str(tmp_path / "g")), "split 9 is out of range"
    )


def test_run_names_any_plan_and_a_procedures_own_command_is_the_same_run(tmp_path):
    """``topdown run cascade`` is ``topdown cascade``; ``topdown run module:Class`` runs a plan of the
    user's own from the working directory; a name that does not import, or a class that is not a plan,
    is one line."""
    cli("cascade", *TINY_DIGITS, "--out", str(tmp_path / "own"), check=True)
    cli("run", "cascade", *TINY_DIGITS, "--out", str(tmp_path / "run"), check=True)
    own, run = read_summary(tmp_path / "own"), read_summary(tmp_path / "run")
    assert run["procedure"] == own["procedure"] == "cascade"
    assert without_seconds(run["stages"]) == without_seconds(own["stages"])
    (tmp_path / "myplans.py").write_text(
        "import topdown\n\n\nclass Twice(topdown.Plan):\n    procedure = 'twice'\n\n"
        "    def stages(self):\n        yield self.stage_zero()\n"
        "        yield topdown.StageSpec('again', self.all_blocks(), start=0)\n\n\nNotAPlan = dict\n"
    )
    done = cli("run", "myplans:Twice", *TINY_DIGITS, "--out", "mine", cwd=tmp_path, check=True)
    mine = read_summary(tmp_path / "mine")
    assert mine["procedure"] == "twice" and [st["role"] for st in mine["stages"]] == ["baseline", "again"]
    assert "report: mine/report.md" in done.stdout
    for plan, pattern in [
        ("nomodule:Plan", r"plan nomodule:Plan: cannot import nomodule \(ModuleNotFoundError"),
        ("myplans:NotAPlan", "plan myplans:NotAPlan: NotAPlan is not a subclass of topdown.Plan"),
        ("myplans:Thrice", "module myplans has no Thrice"),
        ("cascades", r"unknown plan 'cascades': a built-in plan \(baseline, cascade, .*forgetting"),
    ]:
        assert_one_line_error(cli("run", plan, *TINY_DIGITS, "--out", "bad", cwd=tmp_path), pattern)
    assert not (tmp_path / "bad").exists()


def test_unknown_set_key_is_an_error(tmp_path):
    proc = cli("baseline", *TINY_DIGITS, "--out", str(tmp_path / "r"), "--set", "train.lrr=0.1")
    assert_one_line_error(proc, "unknown config key 'train.lrr'")
    proc = cli("baseline", *TINY_DIGITS, "--out", str(tmp_path / "r"), "--set", "train.epochs=many")
    assert_one_line_error(proc, "expects a int")
    assert not (tmp_path / "r").exists()


def test_nan_loss_fails_the_stage_and_keeps_earlier_results(tmp_path):
    run = tmp_path / "r"
    proc = cli(
        "cascade", *TINY_DIGITS, "--out", str(run), "--set", "cascade.lr=1e30", "--set", "train.optimizer=sgd"
    )
    assert_one_line_error(proc, r"stage 1 .*loss is nan")
    summary = read_summary(run)
    assert summary["status"] == "failed" and len(summary["stages"]) == 1 and summary["chosen_stage"] == 0
    assert load_file(str(run / "checkpoints" / "best.safetensors"))


def test_report_rerenders(tmp_path):
    run = tmp_path / "r"
    cli("baseline", *TINY_DIGITS, "--out", str(run), check=True)
    (run / "report.md").unlink()
    cli("report", str(run), check=True)
    assert "| 0 (chosen) | baseline |" in (run / "report.md").read_text()
    assert_one_line_error(cli("report", str(tmp_path / "nothing")), "holds no run")


def write_mfc(path: Path, frames: int, corrupt: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = [0.1 * (i % 13) for i in range(frames * 13)]
    count = len(values) + (5 if corrupt else 0)
    path.write_bytes(struct.pack(">i", count) + struct.pack(f">{len(values)}f", *values))


def sphinx_layout(root: Path, texts: dict[str, list[str]]) -> Path:
    """A miniature AN4-style corpus: 4 speakers in train, 1 in test."""
    (root / "etc").mkdir(parents=True)
    for split, lines in texts.items():
        folder = "an4_clstk" if split == "train" else "an4test_clstk"
        ids, trans = [], []
        for i, text in enumerate(lines):
            spk = f"spk{i % 4}" if split == "train" else "tst0"
            uid = f"u{i}-{spk}-{split}"
            ids.append(f"{folder}/{spk}/{uid}")
            trans.append(f"{text} ({uid})")
            write_mfc(root / "feat" / folder / spk / f"{uid}.mfc", 120)
        (root / "etc" / f"an4_{split}.fileids").write_text("\n".join(ids) + "\n")
        (root / "etc" / f"an4_{split}.transcription").write_text("\n".join(trans) + "\n")
    return root


ASR_TINY = ["asr-rnn", "--preset", "tiny", "--set", "data.val_speakers=1"]


def test_asr_reads_a_sphinx_layout(tmp_path):
    data = sphinx_layout(tmp_path / "an4", {"train": ["YES", "NO", "GO", "STOP"] * 2, "test": ["YES", "NO"]})
    run = tmp_path / "r"
    cli("baseline", *ASR_TINY, "--data-dir", str(data), "--out", str(run), check=True)
    assert set(read_summary(run)["test"]) == {"wer", "cer", "loss"}


@pytest.mark.parametrize(
    "damage, pattern",
    [
        ("missing", r"u1-spk1-train\.mfc.*(missing|not found|does not exist)"),
        ("corrupt", r"u1-spk1-train\.mfc: header says"),
        ("character", r"character '7'"),
        ("empty", r"split 'test' is empty"),
    ],
)
def test_bad_asr_data_is_a_one_line_error(tmp_path, damage, pattern):
    texts = {"train": ["YES", "NO", "GO", "STOP"] * 2, "test": ["YES", "NO"]}
    if damage == "character":
        texts["train"][2] = "GO 7"
    if damage == "empty":
        texts["test"] = []
    data = sphinx_layout(tmp_path / "an4", texts)
    mfc = data / "feat" / "an4_clstk" / "spk1" / "u1-spk1-train.mfc"
    if damage == "missing":
        mfc.unlink()
    if damage == "corrupt":
        write_mfc(mfc, 120, corrupt=True)
    run = tmp_path / "r"
    assert_one_line_error(cli("baseline", *ASR_TINY, "--data-dir", str(data), "--out", str(run)), pattern)
    assert not run.exists()


def test_bad_from_checkpoint(tmp_path):
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    assert_one_line_error(
        cli("cascade", *TINY_DIGITS, "--out", str(tmp_path / "r"), "--from", str(bogus)),
        "not a readable safetensors",
    )
    run = tmp_path / "asr"
    data = sphinx_layout(tmp_path / "an4", {"train": ["YES", "NO", "GO", "STOP"] * 2, "test": ["YES", "NO"]})
    cli("baseline", *ASR_TINY, "--data-dir", str(data), "--out", str(run), check=True)
    proc = cli(
        "cascade",
        *TINY_DIGITS,
        "--out",
        str(tmp_path / "r2"),
        "--from",
        str(run / "checkpoints" / "best.safetensors"),
    )
    assert_one_line_error(proc, "does not fit the model")


def test_cascade_from_checkpoint(tmp_path):
    base = tmp_path / "base"
    cli("baseline", *TINY_DIGITS, "--out", str(base), check=True)
    run = tmp_path / "cascade"
    cli(
        "cascade",
        *TINY_DIGITS,
        "--out",
        str(run),
        "--from",
        str(base / "checkpoints" / "best.safetensors"),
        check=True,
    )
    stages = read_summary(run)["stages"]
    assert stages[0]["role"] == "loaded" and stages[0]["epochs"] == 0
    assert stages[0]["val"] == read_summary(base)["stages"][0]["val"]


# A digits cascade slow enough to be killed mid-way: small batches, several epochs per stage.
KILLABLE = [*TINY_DIGITS, "--set", "data.batch_size=4", "--set", "train.epochs=3"]


def run_until(args: list[str], lines: int) -> None:
    """Start the CLI and SIGKILL it once metrics.jsonl has ``lines`` lines."""
    out = Path(args[args.index("--out") + 1])
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "topdown.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    cli("cascade", *KILLABLE, "--out", str(reference), check=True)
    for kill_after in (2, 7):
        run = tmp_path / f"killed-{kill_after}"
        run_until(["cascade", *KILLABLE, "--out", str(run)], kill_after)
        summary = read_summary(run)
        assert summary["status"] == "running"
        for f in run.rglob("*.safetensors"):
            load_file(str(f))  # every checkpoint on disk is whole
        before = (run / "metrics.jsonl").read_text().splitlines()
        cli("cascade", *KILLABLE, "--out", str(run), "--resume", check=True)
        # the epochs finished before the kill are not trained again: their lines, wall-clock seconds
        # included, stay as they were (the last one may be logged again if its resume point was not yet saved)
        assert (run / "metrics.jsonl").read_text().splitlines()[: len(before) - 1] == before[:-1]
        assert without_seconds(read_summary(run)) == without_seconds(read_summary(reference))
        ours = [without_seconds(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]
        theirs = [
            without_seconds(json.loads(x)) for x in (reference / "metrics.jsonl").read_text().splitlines()
        ]
        assert ours == theirs
        for f in (reference / "checkpoints").glob("*.safetensors"):
            a, b = load_file(str(f)), load_file(str(run / "checkpoints" / f.name))
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_readme_example_runs(tmp_path):
    """The README's bring-your-own-model example is real code that runs."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "topdown.Task(" in b]
    assert len(blocks) == 1, "README has no bring-your-own-model example"
    subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        env={"PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"},
    )
    assert (tmp_path / "runs" / "toy" / "summary.json").is_file()


def test_nothing_unpickles():
    """Checkpoints are safetensors; no project code loads pickles."""
    sources = "\n".join(p.read_text() for p in (ROOT / "topdown").rglob("*.py"))
    for forbidden in (
        r"torch\.load\(",
        r"import (c?pickle|dill|joblib)",
        r"pickle\.loads?\(",
        r"allow_pickle\s*=\s*True",
    ):
        assert not re.search(forbidden, sources), forbidden


def test_a_comparison_rebuilds_from_its_runs_archive_without_training(tmp_path):
    """What bench/results keeps of a comparison (compare.* and runs.tar.xz) rebuilds it: `compare
    --runs-from` restores the finished runs and trains none; `--only` trains a part of one alone."""
    compare = ["compare", *TINY_DIGITS, "--seeds", "1"]
    made, archive = tmp_path / "made", tmp_path / "runs.tar.xz"
    cli(*compare, "--out", str(made), "--only", "baseline-seed0-extra1", check=True)
    assert [p.name for p in (made / "runs").iterdir()] == ["baseline-seed0-extra1"]
    assert not (made / "compare.json").exists()
    cli(*compare, "--out", str(made), check=True)
    pack = [sys.executable, str(ROOT / "bench" / "pack_runs.py"), str(made / "runs"), str(archive)]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    subprocess.run([*pack, "--prefix", "runs/"], env=env, check=True, capture_output=True)
    rebuilt = cli(*compare, "--out", str(tmp_path / "rebuilt"), "--runs-from", str(archive), check=True)
    assert "starting" not in rebuilt.stdout + rebuilt.stderr
    assert not list((tmp_path / "rebuilt" / "runs").glob("*/checkpoints"))
    assert json.loads((tmp_path / "rebuilt" / "compare.json").read_text()) == json.loads(
        (made / "compare.json").read_text()
    )
    for source, pattern in [
        (tmp_path / "none.tar.xz", "no such archive or directory"),
        (made / "compare.json", "not a readable runs archive"),
    ]:
        assert_one_line_error(
            cli(*compare, "--out", str(tmp_path / "x"), "--runs-from", str(source)), pattern
        )
    assert_one_line_error(
        cli(*compare, "--out", str(made), "--only", "cascade-seed3"),
        r"--only cascade-seed3: not a run of this comparison "
        r"\(cascade-seed0, equal-epochs-seed0, baseline-seed0-extra1",
    )
