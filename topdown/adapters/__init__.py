"""Executors of topdown plans for other people's trainers.

Each adapter drives a ``topdown.Plan`` with one framework's trainer, keeping the user's model,
callbacks and loggers. They import their framework, which is an optional dependency, so they
are not imported here: ``from topdown.adapters.lightning import fit_plan``
(``pip install "topdown[lightning]"``). The Hugging Face ``transformers.Trainer`` needs no
adapter: see the recipe in docs/trainers.md.
"""
