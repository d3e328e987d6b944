"""The regime axes (topdown.tasks.regime): data.fraction, data.label_noise, data.augment, data.seed on
every task; validation and test untouched; the default regime is the data as it was."""

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import cli
from test_cli import assert_one_line_error

from topdown.config import parse_overrides
from topdown.errors import ConfigError
from topdown.identity import recorded_mismatch, run_identity
from topdown.metrics import Metric
from topdown.tasks import digits, make_task, resolve_config
from topdown.tasks.asr.data import load_corpus, prepare
from topdown.tasks.lm import awd
from topdown.tasks.regime import class_subset, classification_set, group_subset, noisy_labels, span


def config(task, *pairs, preset="tiny"):
    return resolve_config(task, preset, parse_overrides(list(pairs)))


def batches(task, seed=7):
    return list(task.train_batches(torch.Generator().manual_seed(seed), 1.0))


def same_evaluation(a, b):
    """The two tasks evaluate one model identically on validation and test."""
    torch.manual_seed(0)
    model = a.build_model().eval()
    return all(a.evaluate(model, split) == b.evaluate(model, split) for split in ("val", "test"))


DIGIT_LABELS = digits.load_splits(digits.Data())["train"][1].numpy()


# -- data.fraction ----------------------------------------------------------------------------


def test_class_subset_is_stratified_seeded_and_nested():
    counts = Counter(DIGIT_LABELS.tolist())
    subsets = {f: class_subset(DIGIT_LABELS, f, 0) for f in (0.05, 0.1, 0.25, 0.5)}
    for f, keep in subsets.items():
        assert np.array_equal(keep, np.unique(keep))  # ascending, no repeats
        kept = Counter(DIGIT_LABELS[keep].tolist())
        assert set(kept) == set(counts)  # every class
        assert all(abs(kept[c] - f * n) <= 1 for c, n in counts.items()), (f, kept)
    assert np.array_equal(subsets[0.1], class_subset(DIGIT_LABELS, 0.1, 0))  # same seed, same subset
    assert not np.array_equal(subsets[0.1], class_subset(DIGIT_LABELS, 0.1, 1))
    fractions = sorted(subsets)
    for small, large in zip(fractions, fractions[1:]):  # nested
        assert set(subsets[small]) < set(subsets[large])
    assert len(class_subset(DIGIT_LABELS, 1e-4, 0)) == len(counts)  # at least one example per class


def test_fraction_trains_on_the_subset_and_leaves_validation_test_and_statistics_alone():
    for name in ("digits", "image"):
        whole, part = (
            make_task(name, config(name).task, None),
            make_task(name, config(name, "data.fraction=0.25").task, None),
        )
        labels = torch.cat([y for _, y in batches(part)])
        expected = len(class_subset(DIGIT_LABELS, 0.25, 0))
        assert len(labels) == expected == part.info["regime"]["examples"]  # batch 64: no lone last example
        assert Counter(labels.tolist()) == Counter(DIGIT_LABELS[class_subset(DIGIT_LABELS, 0.25, 0)].tolist())
        assert same_evaluation(whole, part), name
        assert "regime" not in whole.info
    image_whole, image_part = (
        make_task("image", config("image", *p).task, None) for p in ((), ("data.fraction=0.25",))
    )
    assert (image_part.info["mean"], image_part.info["std"]) == (
        image_whole.info["mean"],
        image_whole.info["std"],
    )
    assert image_part.info["images"]["train"] == image_part.info["regime"]["examples"]


def test_speech_subset_is_whole_speakers_and_validation_and_test_are_unchanged():
    cfg = config("asr-rnn", "data.limit=300").task
    speakers = [u.speaker for u in load_corpus(cfg.data, None).splits["train"]]
    per_speaker = Counter(speakers)
    subsets = {f: group_subset(speakers, f, 0) for f in (0.1, 0.3, 0.6)}
    for f, keep in subsets.items():
        chosen = Counter(speakers[i] for i in keep)
        assert chosen == {s: per_speaker[s] for s in chosen}  # every utterance of each chosen speaker
        assert 0 < len(chosen) < len(per_speaker)
        assert abs(len(keep) - f * len(speakers)) <= max(per_speaker.values())
    assert set(subsets[0.1]) <= set(subsets[0.3]) <= set(subsets[0.6])
    assert not np.array_equal(subsets[0.3], group_subset(speakers, 0.3, 1))
    whole, _, _ = prepare(cfg.data, None)
    part, info, _ = prepare(cfg.data.replace(fraction=0.3), None)
    assert [e.uid for e in part["train"]] == [whole["train"][i].uid for i in subsets[0.3]]
    assert info["regime"]["utterances"] == len(subsets[0.3]) == info["utterances"]["train"]
    for split in ("val", "test"):  # the same examples, with the whole training split's normalisation
        assert [e.uid for e in part[split]] == [e.uid for e in whole[split]]
        assert all(torch.equal(a.feats, b.feats) for a, b in zip(part[split], whole[split]))


def test_text_subset_is_a_nested_contiguous_span_and_validation_and_test_are_unchanged():
    spans = {f: span(1000, f, 3) for f in (0.05, 0.1, 0.3, 0.7, 1.0)}
    assert all(
        s.stop - s.start == round(1000 * f) and 0 <= s.start < s.stop <= 1000 for f, s in spans.items()
    )
    fractions = sorted(spans)
    for small, large in zip(fractions, fractions[1:]):
        assert spans[large].start <= spans[small].start and spans[small].stop <= spans[large].stop
    assert {span(1000, 0.1, s).start for s in range(5)} != {spans[0.1].start}  # the seed moves it
    whole = make_task("lm-awd", config("lm-awd").task, None)
    part = make_task("lm-awd", config("lm-awd", "data.fraction=0.5").task, None)
    assert part.info["vocab"] == whole.info["vocab"]  # the whole training split's vocabulary
    assert part.info["regime"]["tokens"] == 600 == part.info["tokens"]["train"]
    assert part.info["regime"]["of"] == 1200
    assert same_evaluation(whole, part)
    # what the model reads: the span's tokens, in batch_size (4) contiguous streams side by side
    start = part.info["regime"]["start"]
    ids = awd.load_corpus(config("lm-awd").task.data, None)[1]["train"][start : start + 600]
    read = batches(part)
    stream = torch.cat([x for x, *_ in read] + [read[-1][1][-1:]])  # (150, 4)
    assert torch.equal(stream.t().reshape(-1), ids)


# -- data.label_noise -------------------------------------------------------------------------


def test_label_noise_flips_about_p_to_a_uniformly_drawn_other_class_and_nests():
    y = torch.from_numpy(DIGIT_LABELS)
    for p in (0.2, 0.9):  # 0.9: were the true class drawable, 0.81 would be wrong
        wrong = noisy_labels(y, 10, p, 0) != y
        assert abs(wrong.float().mean().item() - p) < 3 * (p * (1 - p) / len(y)) ** 0.5, p
    noisy = noisy_labels(y, 10, 0.9, 0)
    off = Counter(((noisy - y) % 10)[noisy != y].tolist())  # the shift to the wrong class: 1..9, uniform
    assert set(off) == set(range(1, 10)) and max(off.values()) < 1.5 * min(off.values())
    low, high = noisy_labels(y, 10, 0.2, 0), noisy
    assert torch.equal(high[low != y], low[low != y])  # wrong at 0.2: wrong, and the same, at 0.9
    assert torch.equal(noisy_labels(y, 10, 0.2, 0), low) and not torch.equal(noisy_labels(y, 10, 0.2, 1), low)
    assert torch.equal(noisy_labels(y, 10, 0.0, 0), y)


def test_label_noise_reaches_the_training_batches_only():
    for name in ("digits", "image"):
        clean = make_task(name, config(name).task, None)
        noisy = make_task(name, config(name, "data.label_noise=0.3").task, None)
        y_clean = torch.cat([y for _, y in batches(clean)])
        y_noisy = torch.cat([y for _, y in batches(noisy)])  # the same order: same examples, same generator
        share = (y_clean != y_noisy).float().mean().item()
        assert abs(share - 0.3) < 0.05 and noisy.info["regime"]["wrong_labels"] == int(
            (y_clean != y_noisy).sum()
        )
        assert same_evaluation(clean, noisy), name
    both = make_task("digits", config("digits", "data.label_noise=0.3", "data.fraction=0.5").task, None)
    assert both.info["regime"]["examples"] == len(
        class_subset(DIGIT_LABELS, 0.5, 0)
    )  # drawn by the true labels


# -- data.augment -----------------------------------------------------------------------------


def test_augment_off_gives_the_batches_of_no_augmentation():
    on = make_task("image", config("image", "data.crop_padding=2", "data.flip=true").task, None)
    off = make_task(
        "image", config("image", "data.crop_padding=2", "data.flip=true", "data.augment=false").task, None
    )
    none = make_task("image", config("image", "data.crop_padding=0").task, None)
    b_on, b_off, b_none = batches(on), batches(off), batches(none)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(b_off, b_none, strict=True)
    )
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(b_on, b_off))

    masks = "data.spec_augment={freq_masks: 2, freq_width: 4, time_masks: 2, time_width: 5}"
    asr = {
        kind: make_task("asr-rnn", config("asr-rnn", *pairs).task, None)
        for kind, pairs in {"on": (masks,), "off": (masks, "data.augment=false"), "none": ()}.items()
    }
    torch.manual_seed(0)
    model = asr["none"].build_model()
    batch = batches(asr["none"])[0]
    losses = {}
    for kind, task in asr.items():
        torch.manual_seed(1)
        losses[kind] = task.loss(model, batch).item()
        losses[kind + " rng"] = torch.rand(()).item()  # what the masks drew from the global RNG
    assert losses["off"] == losses["none"] and losses["off rng"] == losses["none rng"]
    assert losses["on"] != losses["off"]


# -- bad values, defaults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, pair, pattern",
    [
        ("digits", "data.fraction=0", r"data\.fraction is 0\.0; allowed: .*> 0 and <= 1"),
        ("image", "data.label_noise=1", r"data\.label_noise is 1\.0; allowed: .*< 1"),
        ("asr-rnn", "data.label_noise=0.1", r"trains on transcripts, not class labels"),
        ("lm-awd", "data.augment=true", r"no augmentation to switch on"),
    ],
)
def test_bad_values_are_refused_in_one_line(tmp_path, task, pair, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config(task, pair)
    if task == "digits":  # and on the command line, before anything is written
        proc = cli("baseline", task, "--preset", "tiny", "--set", pair, "--out", str(tmp_path / "run"))
        assert_one_line_error(proc, pattern)
        assert not (tmp_path / "run").exists()


def test_default_regime_is_the_data_as_it_was_and_matches_runs_recorded_before_it():
    x, y = digits.load_splits(digits.Data())["train"]
    same = classification_set(x, y, 10, digits.Data())
    assert same[0] is x and same[1] is y and same[2] == {}
    for name in ("digits", "image", "asr-rnn", "lm-awd"):
        cfg = config(name)
        wanted = run_identity("cascade", name, "tiny", 0, cfg, Metric.named("error", True), {})
        older = {**wanted, "config": {**wanted["config"], "data": dict(wanted["config"]["data"])}}
        for key in ("fraction", "seed", "label_noise", "augment"):  # recorded before the keys existed
            del older["config"]["data"][key]
        assert recorded_mismatch(older, wanted, cfg.option_defaults, None) is None, name
        changed = config(name, "data.fraction=0.5")
        wanted = run_identity("cascade", name, "tiny", 0, changed, Metric.named("error", True), {})
        assert "data.fraction" in recorded_mismatch(older, wanted, changed.option_defaults, None)
