"""Word-LM beam search on a finished ASR run: weight, word bonus and OOV penalty chosen on validation,
then test once.

Usage:

    python bench/asr_lm_decode.py RUN_DIR [--stage N] [--order 3] [--beam 16] [--weights 0.25 0.5 1 1.5]
                                  [--bonuses 0 1 2] [--oov-penalties 0]

RUN_DIR is a finished `topdown` run of `asr-rnn` or `asr-transformer` on the bundled AN4 (or
give --data-dir); ``--stage N`` decodes that stage's model instead of the chosen one, which a
run still in progress may already have. The model is decoded on the validation split with each
(LM weight, word bonus, OOV penalty) of the grid; the setting with the lowest validation
`wer_lm` is then used once on the test split, where greedy, plain beam and beam + LM are
reported side by side. The n-gram and its lexicon come from the training transcripts only
(``decode.lm_order``, ``decode.oov_penalty``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topdown.runs import RunDir  # noqa: E402
from topdown.tasks import task_module  # noqa: E402
from topdown.tasks.asr.common import forward_split  # noqa: E402
from topdown.tasks.asr.data import prepare  # noqa: E402
from topdown.tasks.asr.decoding import error_rates, transcribe, word_scorer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data-dir")
    parser.add_argument(
        "--stage", type=int, help="decode this stage's model (default: the chosen one, of a finished run)"
    )
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--beam", type=int, default=16)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5])
    parser.add_argument("--bonuses", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--oov-penalties", type=float, nargs="+", default=[0.0])
    parser.add_argument("--out", type=Path, help="write the grid and the test result here as JSON")
    args = parser.parse_args()

    run = RunDir(args.run)
    summary = run.read_summary()
    if summary is None or (args.stage is None and summary.get("status") != "complete"):
        sys.exit(
            f"asr_lm_decode: {args.run} holds no finished run (--stage N decodes one stage of a run in "
            "progress)"
        )
    stage = summary["chosen_stage"] if args.stage is None else args.stage
    config = {k: v for k, v in summary["config"].items() if k not in ("train", "cascade", "procedure")}
    module = task_module(summary["task"])
    data, info, vocab = prepare(config["data"], args.data_dir)
    model = module.build_model(config, inputs=info["features"]["dim"], vocab=len(vocab))
    model.load_state_dict(run.load_model(f"stage-{stage}"))
    model.eval()
    lm = word_scorer(data["train"], vocab, args.order, 0.0, 0.0)
    prune, batch_size = config["decode"]["prune"], config["data"]["batch_size"]

    # one forward pass, greedy and plain beam per split; only the LM-fused search depends on the grid
    outputs, fixed = {}, {}
    with torch.no_grad():
        for split in ("val", "test"):
            examples, outputs[split], _ = forward_split(model, data[split], batch_size)
            refs = [e.text for e in examples]
            fixed[split] = (
                refs,
                {
                    **error_rates(transcribe(outputs[split], vocab), refs),
                    **error_rates(transcribe(outputs[split], vocab, args.beam, prune), refs, "_beam"),
                },
            )

    def evaluate(split: str, weight: float, bonus: float, oov_penalty: float) -> dict[str, float]:
        refs, metrics = fixed[split]
        scorer = dataclasses.replace(lm, weight=weight, bonus=bonus, oov_penalty=oov_penalty)
        hyps = transcribe(outputs[split], vocab, args.beam, prune, scorer)
        return {**metrics, **error_rates(hyps, refs, "_lm")}

    grid = []
    for weight, bonus, penalty in itertools.product(args.weights, args.bonuses, args.oov_penalties):
        val = evaluate("val", weight, bonus, penalty)
        grid.append(
            {
                "weight": weight,
                "bonus": bonus,
                "oov_penalty": penalty,
                **{k: round(v, 4) for k, v in val.items()},
            }
        )
        print(
            f"val  weight {weight:<5g} bonus {bonus:<4g} oov penalty {penalty:<4g}  wer {val['wer']:.2%}  "
            f"beam {val['wer_beam']:.2%}  "
            f"beam+LM {val['wer_lm']:.2%}",
            flush=True,
        )
    best = min(grid, key=lambda g: (g["wer_lm"], g["weight"], g["oov_penalty"]))
    test = evaluate("test", best["weight"], best["bonus"], best["oov_penalty"])
    print(
        f"test weight {best['weight']:g} bonus {best['bonus']:g} oov penalty {best['oov_penalty']:g} "
        f"(chosen on validation): greedy wer {test['wer']:.2%}, "
        f"beam {test['wer_beam']:.2%}, beam+LM {test['wer_lm']:.2%} (cer {test['cer']:.2%} / "
        f"{test['cer_beam']:.2%} / {test['cer_lm']:.2%})"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "run": str(args.run),
                    "stage": stage,
                    "order": args.order,
                    "beam": args.beam,
                    "grid": grid,
                    "chosen": {k: best[k] for k in ("weight", "bonus", "oov_penalty")},
                    "test": {k: round(v, 4) for k, v in test.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
