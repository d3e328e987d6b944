"""Ordered blocks over a plain ``nn.Module``: the unit the method freezes and re-initialises.

A block is a named group of submodules (by their names in ``model.named_modules()``).
Blocks are listed from input to output; split ``k`` puts blocks ``1..k`` in the feature
extractor and ``k+1..L`` in the classifier. Every parameter must belong to exactly one
block, and a parameter reachable from two blocks (tied weights) needs an explicit owner:
all of this is checked when the blocks are declared, before any training starts. The order
itself is checked on the first forward pass (``watch_call_order``).
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from topdown.console import warn
from topdown.errors import BlockError

BlockSpec = Sequence[str | tuple[str, Sequence[str]]] | Mapping[str, Sequence[str]]


def empty_side(owned: Mapping[str, Sequence[str]], k: int) -> tuple[str, list[str]] | None:
    """Which side of split ``k`` owns no parameter, if one does: ("feature extractor", its blocks) or
    ("classifier", its blocks). ``owned`` maps each block, input to output, to the parameters it owns
    (``Blocks.parameter_names()``, or a run record's ``blocks``). With either side empty, no
    procedure of the method is what it claims: a cascade stage under a parameterless "classifier"
    trains a whole new model, and one with a parameterless feature extractor trains nothing."""
    names = list(owned)
    for side, blocks in (("feature extractor", names[:k]), ("classifier", names[k:])):
        if not any(owned[b] for b in blocks):
            return side, blocks
    return None


def usable_splits(owned: Mapping[str, Sequence[str]]) -> list[int]:
    """The splits, highest first, whose two sides each own a parameter (see ``empty_side``)."""
    return [k for k in range(len(owned) - 1, 0, -1) if empty_side(owned, k) is None]


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement ``train`` for a frozen module: whatever the caller asks, stay in eval mode.

    ``nn.Module.train`` recurses through children by calling their ``train``, so pinning
    the block's modules keeps them in eval mode across every later ``model.train()``.
    """
    return nn.Module.train(self, False)


def _is_normalisation(module: nn.Module) -> bool:
    """Modules whose training mode changes their statistics (BatchNorm, InstanceNorm)."""
    return isinstance(module, nn.modules.batchnorm._NormBase)


class Blocks:
    """A partition of ``model``'s parameters into ordered, named blocks.

    ``spec`` is a list of module names (each its own block), a list of
    ``(block_name, [module names])`` pairs, or a mapping from block name to module names.
    ``shared`` maps a tied parameter (by any of its names) to the block that owns it.
    """

    def __init__(self, model: nn.Module, spec: BlockSpec, shared: Mapping[str, str] | None = None):
        self.model = model
        items = spec.items() if isinstance(spec, Mapping) else spec
        self.modules: dict[str, tuple[str, ...]] = {}
        for item in items:
            name, module_names = (item, (item,)) if isinstance(item, str) else (item[0], tuple(item[1]))
            if name in self.modules:
                raise BlockError(f"block {name!r} is declared twice")
            if not module_names:
                raise BlockError(f"block {name!r} names no module")
            self.modules[name] = module_names
        if len(self.modules) < 2:
            raise BlockError("a model needs at least two blocks to be split")
        known = dict(model.named_modules())
        for name, module_names in self.modules.items():
            for m in module_names:
                if m == "" or m not in known:
                    raise BlockError(f"block {name!r}: no module named {m!r} in the model")
        self.owner = self._assign_parameters(dict(shared or {}))

    # -- construction -------------------------------------------------------------------

    def _blocks_of(self, qualified_name: str) -> set[str]:
        return {
            block
            for block, module_names in self.modules.items()
            for m in module_names
            if qualified_name == m or qualified_name.startswith(m + ".")
        }

    def _assign_parameters(self, shared: dict[str, str]) -> dict[str, str]:
        """Map each parameter's canonical name to its owning block, or raise BlockError."""
        names_of: dict[int, list[str]] = {}
        tensor_of: dict[int, nn.Parameter] = {}
        for qname, p in self.model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(qname)
            tensor_of[id(p)] = p
        for key, block in shared.items():
            if block not in self.modules:
                raise BlockError(f"shared parameter {key!r} is given to unknown block {block!r}")
            if not any(key in names for names in names_of.values()):
                raise BlockError(f"shared parameter {key!r} is not a parameter of the model")
        owner: dict[str, str] = {}
        for pid, names in names_of.items():
            per_name = {n: self._blocks_of(n) for n in names}
            for n, blocks in per_name.items():
                if not blocks:
                    raise BlockError(f"parameter {n!r} is covered by no block")
                if len(blocks) > 1:
                    raise BlockError(f"parameter {n!r} is covered by two blocks: {sorted(blocks)}")
            blocks = set().union(*per_name.values())
            given = [shared[n] for n in names if n in shared]
            if len(blocks) > 1 and not given:
                raise BlockError(
                    f"parameter {' = '.join(names)} is shared by blocks {sorted(blocks)}; "
                    f"say which block owns it (shared={{{names[0]!r}: BLOCK}}) or untie it"
                )
            owner[names[0]] = given[0] if given else blocks.pop()
        return owner

    def watch_call_order(self) -> None:
        """Check the declared order against the model's first forward pass, whoever runs it.

        Blocks listed output to input (the easy mistake) partition the parameters just as well,
        so the declaration cannot tell; but the cascade would then train the input block first,
        as if it were the classifier. The forward pass can tell: each block's first call is
        recorded, and once every block has run (or the model's forward has returned) the hooks
        are removed and the order judged. Exactly reversed: an error. Otherwise out of order: a
        warning, since a model may call a later block early on purpose (an output layer shared
        with an intermediate layer, as in intermediate CTC).
        """
        seen: list[str] = []
        handles = []

        def judge(*_: object) -> None:
            if not handles:  # judged already (a copy of the model still carries the hooks)
                return
            for handle in handles:
                handle.remove()
            handles.clear()
            self._judge_call_order(seen)

        def called(block: str):
            def hook(*_: object) -> None:
                if handles and block not in seen:
                    seen.append(block)
                    if len(seen) == len(self.modules):
                        judge()

            return hook

        for block, module_names in self.modules.items():
            for m in module_names:
                for sub in self.model.get_submodule(m).modules():  # a ModuleList's members run, not the list
                    handles.append(sub.register_forward_pre_hook(called(block)))
        handles.append(self.model.register_forward_hook(judge))

    def _judge_call_order(self, seen: list[str]) -> None:
        declared = [b for b in self.names if b in seen]
        if seen == declared:
            return
        if len(seen) == len(self) and seen == declared[::-1]:
            raise BlockError(
                f"the blocks are declared output to input: the model's forward pass runs them in the order "
                f"{', '.join(seen)}; declare them input to output"
            )
        warn(
            f"the model's forward pass runs the blocks in the order {', '.join(seen)}, not as declared "
            f"({', '.join(declared)}); the method takes the declared order as input to output"
        )

    # -- queries ------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def out_of_range(self, k: int) -> str | None:
        """Why ``k`` is no split of these blocks (a feature extractor and a classifier of one block
        or more), or None."""
        return (
            None
            if 1 <= k < len(self)
            else f"split {k} is out of range: the model has {len(self)} blocks, so 1..{len(self) - 1}"
        )

    def split(self, k: int) -> tuple[list[str], list[str]]:
        """Feature extractor (blocks 1..k) and classifier (blocks k+1..L) of split ``k``."""
        if reason := self.out_of_range(k):
            raise BlockError(reason)
        return self.names[:k], self.names[k:]

    def parameter_names(self) -> dict[str, list[str]]:
        """Block name -> canonical names of the parameters it owns (for run records)."""
        out: dict[str, list[str]] = {b: [] for b in self.modules}
        for qname, block in self.owner.items():
            out[block].append(qname)
        return out

    def check_known(self, blocks: Sequence[str]) -> None:
        """A misspelt block name is an error, never a silent no-op."""
        if unknown := set(blocks) - set(self.modules):
            raise BlockError(f"unknown block(s) {sorted(unknown)}; blocks are {self.names}")

    def state_keys(self, blocks: Sequence[str]) -> list[str]:
        """State-dict keys (parameters and buffers) that belong to ``blocks``.

        Parameters follow their owner; buffers follow the block whose modules hold them.
        """
        self.check_known(blocks)
        wanted = set(blocks)
        params = {id(p): n for n, p in self.model.named_parameters()}
        keys = []
        for key, value in self.model.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter):
                canonical = params[id(value)]
                if canonical == key and self.owner[canonical] in wanted:
                    keys.append(key)
            elif self._blocks_of(key) & wanted:
                keys.append(key)
        return keys

    # -- actions --------------------------------------------------------------------------

    def freeze(self, frozen: Sequence[str], frozen_dropout: bool = False) -> None:
        """Train only the blocks not in ``frozen``; frozen blocks get no gradients and stay in eval mode.

        With ``frozen_dropout`` the frozen blocks keep their dropout active in training;
        their normalisation layers are pinned to eval mode either way.
        """
        self.check_known(frozen)
        self.unfreeze()
        for qname, p in self.model.named_parameters():
            trainable = self.owner[qname] not in frozen
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None
        for block in frozen:
            for m in self.modules[block]:
                module = self.model.get_submodule(m)
                pinned = [x for x in module.modules() if _is_normalisation(x)] if frozen_dropout else [module]
                for x in pinned:
                    x.train = types.MethodType(_eval_only_train, x)
                    x.train(False)

    def unfreeze(self) -> None:
        """Undo ``freeze``: every parameter trainable, no module pinned to eval mode."""
        for p in self.model.parameters():
            p.requires_grad_(True)
        for x in self.model.modules():
            x.__dict__.pop("train", None)

    def copy_blocks(self, source: nn.Module, blocks: Sequence[str]) -> None:
        """Overwrite ``blocks`` (parameters and buffers) with those of ``source``, a model of the same shape.

        Re-initialising a block is copying it from a freshly built model: that keeps the
        model's own initialisation scheme exactly, whatever it is.
        """
        source_state = source.state_dict()
        target = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key in self.state_keys(blocks):
                target[key].copy_(source_state[key])
