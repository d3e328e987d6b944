"""A top-down cascade whose stages a Hugging Face ``transformers.Trainer`` trains (docs/trainers.md).

A tiny BERT classifier built from a config (nothing is downloaded) learns a synthetic task: does a
random sequence of tokens begin with one of the lower half of the vocabulary? Runs in seconds on a
CPU, as one process or data parallel under torchrun (the Trainer joins the process group; only rank 0
writes the run):

    python examples/hf_trainer.py --out runs/hf
    torchrun --nproc_per_node=2 examples/hf_trainer.py --out runs/hf-ddp
    python examples/hf_trainer.py --out runs/hf --resume    # continue an interrupted run

Needs ``pip install "topdown[hf]"`` (transformers and accelerate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import topdown

# from input to output; a stage of the cascade trains the blocks below a split under the frozen ones above
BLOCKS = [
    ("embeddings", ["bert.embeddings"]),
    ("layer0", ["bert.encoder.layer.0"]),
    ("layer1", ["bert.encoder.layer.1"]),
    ("head", ["bert.pooler", "classifier"]),
]


def build_model() -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


class Sequences(torch.utils.data.Dataset):
    """``n`` random sequences of 24 tokens; label 1 where the first token is below 8."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 16, (n, 24), generator=g)
        self.labels = (self.ids[:, 0] < 8).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def error(prediction: transformers.EvalPrediction) -> dict[str, float]:
    """``compute_metrics``: its keys come back from ``evaluate()`` as ``eval_<key>``."""
    return {"error": float((prediction.predictions.argmax(-1) != prediction.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    train, val, test = Sequences(512, 0), Sequences(128, 1), Sequences(128, 2)

    torch.manual_seed(0)
    plan = topdown.Cascade(
        build_model(), BLOCKS, build_model=build_model, metric="error", out=args.out, resume=args.resume
    )
    try:
        for stage in plan:
            training = transformers.TrainingArguments(
                output_dir=f"{args.out}-trainer",  # the Trainer's own directory; it saves nothing there
                num_train_epochs=args.epochs,
                learning_rate=5e-3,
                per_device_train_batch_size=32,
                per_device_eval_batch_size=64,
                seed=stage.seed % 2**32,  # numpy's seeds are 32-bit
                use_cpu=not torch.cuda.is_available(),
                save_strategy="no",
                eval_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                ddp_find_unused_parameters=False,  # under torchrun: the frozen blocks are no DDP parameters
            )
            # rule 1: an optimizer over exactly the stage's trainable parameters, built for this stage
            optimizer = torch.optim.AdamW(stage.trainable_parameters(), lr=training.learning_rate)
            trainer = transformers.Trainer(
                model=stage.model,
                args=training,
                train_dataset=train,
                eval_dataset=val,
                compute_metrics=error,
                optimizers=(optimizer, None),  # None: the Trainer's default learning-rate schedule
            )
            result = trainer.train()  # rule 2: the Trainer calls model.train()
            val_metrics = trainer.evaluate()  # rule 3: the final weights' validation metrics
            test_metrics = trainer.evaluate(test, metric_key_prefix="test")
            stage.finish(
                val={"error": val_metrics["eval_error"], "loss": val_metrics["eval_loss"]},
                test={"error": test_metrics["test_error"], "loss": test_metrics["test_loss"]},
                epochs=round(result.metrics["epoch"]),
            )
    except Exception:
        plan.fail()  # on record: the run stopped on an error (resume continues it)
        raise
    return plan.summary


if __name__ == "__main__":
    summary = main()
    if topdown.distributed.is_writer():
        print(f"chosen stage {summary['chosen_stage']}; test {summary['test']}")
