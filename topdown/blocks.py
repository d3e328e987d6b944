"""Ordered blocks over a plain ``nn.Module``: the unit the method freezes and re-initialises.

A block is a named group of entries, each a submodule (by its name in ``model.named_modules()``)
or a single parameter (by its name in ``model.named_parameters()``): the latter for a parameter that
sits directly on a container module (a learnt embedding on the top-level model, say), which no
submodule of its own holds. A module's name keeps meaning the module, though it begins its
parameters' names. Blocks are listed from input to output; split ``k`` puts blocks ``1..k`` in the
feature extractor and ``k+1..L`` in the classifier. Every parameter must belong to exactly one
block, and a parameter reachable from two blocks (tied weights) needs an explicit owner:
all of this is checked when the blocks are declared, before any training starts. The order
itself is checked on the first forward pass (``watch_call_order``). ``propose_blocks`` proposes a
spec for a model built around a stack of repeated layers (a hub transformer, say).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from typing import NamedTuple

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


def covering(entries: Mapping[str, Sequence[str]], qualified_name: str) -> set[str]:
    """The blocks (block name -> entries) with an entry that is this parameter or buffer, or a module
    above it."""
    return {
        block
        for block, names in entries.items()
        for e in names
        if qualified_name == e or qualified_name.startswith(e + ".")
    }


def _resolve(model: nn.Module, entry: str) -> nn.Module | nn.Parameter:
    """What a block entry names in ``model``: a submodule, else a parameter (PyTorch lets no name be
    both), else a BlockError that lists close names. The model itself ("") is no entry."""
    modules = dict(model.named_modules())
    if entry and entry in modules:
        return modules[entry]
    parameters = dict(model.named_parameters(remove_duplicate=False))
    if entry in parameters:
        return parameters[entry]
    close = difflib.get_close_matches(entry, [*filter(None, modules), *parameters], n=3)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise BlockError(f"no module named {entry!r} in the model, and no parameter either{hint}")


def entry_parameters(model: nn.Module, entry: str) -> list[nn.Parameter]:
    """Every parameter a block entry reaches: a module's (tied ones too) or the one it names."""
    target = _resolve(model, entry)
    return [target] if isinstance(target, nn.Parameter) else list(target.parameters())


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

    ``spec`` is a list of entries (each its own block, named after it), a list of
    ``(block_name, [entries])`` pairs, or a mapping from block name to entries; an entry is a module
    name or a parameter name (see the module's docstring). ``shared`` maps a tied parameter (by any
    of its names) to the block that owns it.
    """

    def __init__(self, model: nn.Module, spec: BlockSpec, shared: Mapping[str, str] | None = None):
        self.model = model
        items = spec.items() if isinstance(spec, Mapping) else spec
        self.entries: dict[str, tuple[str, ...]] = {}
        for item in items:
            name, entries = (item, (item,)) if isinstance(item, str) else (item[0], tuple(item[1]))
            if name in self.entries:
                raise BlockError(f"block {name!r} is declared twice")
            if not entries:
                raise BlockError(f"block {name!r} names no module or parameter")
            self.entries[name] = entries
        if len(self.entries) < 2:
            raise BlockError("a model needs at least two blocks to be split")
        for name, entries in self.entries.items():
            for entry in entries:
                try:
                    _resolve(model, entry)
                except BlockError as e:
                    raise BlockError(f"block {name!r}: {e}") from None
        self.owner = self._assign_parameters(dict(shared or {}))

    # -- construction -------------------------------------------------------------------

    def _modules_of(self, block: str) -> list[nn.Module]:
        """The submodules ``block``'s entries name; a parameter entry names none."""
        targets = (_resolve(self.model, e) for e in self.entries[block])
        return [t for t in targets if isinstance(t, nn.Module)]

    def _assign_parameters(self, shared: dict[str, str]) -> dict[str, str]:
        """Map each parameter's canonical name to its owning block, or raise BlockError."""
        names_of: dict[int, list[str]] = {}
        tensor_of: dict[int, nn.Parameter] = {}
        for qname, p in self.model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(qname)
            tensor_of[id(p)] = p
        for key, block in shared.items():
            if block not in self.entries:
                raise BlockError(f"shared parameter {key!r} is given to unknown block {block!r}")
            if not any(key in names for names in names_of.values()):
                raise BlockError(f"shared parameter {key!r} is not a parameter of the model")
        owner: dict[str, str] = {}
        for pid, names in names_of.items():
            per_name = {n: covering(self.entries, n) for n in names}
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
        are removed and the order judged. A parameter entry has no forward hook and takes no part:
        a block of parameter entries alone is left out. Exactly reversed: an error. Otherwise out
        of order: a warning, since a model may call a later block early on purpose (an output layer shared
        with an intermediate layer, as in intermediate CTC).
        """
        seen: list[str] = []
        handles = []
        watched = {block: self._modules_of(block) for block in self.entries}
        watched = {block: modules for block, modules in watched.items() if modules}

        def judge(*_: object) -> None:
            if not handles:  # judged already (a copy of the model still carries the hooks)
                return
            for handle in handles:
                handle.remove()
            handles.clear()
            self._judge_call_order(seen, len(watched))

        def called(block: str):
            def hook(*_: object) -> None:
                if handles and block not in seen:
                    seen.append(block)
                    if len(seen) == len(watched):
                        judge()

            return hook

        for block, modules in watched.items():
            for module in modules:
                for sub in module.modules():  # a ModuleList's members run, not the list
                    handles.append(sub.register_forward_pre_hook(called(block)))
        handles.append(self.model.register_forward_hook(judge))

    def _judge_call_order(self, seen: list[str], watched: int) -> None:
        declared = [b for b in self.names if b in seen]
        if seen == declared:
            return
        if len(seen) == watched and seen == declared[::-1]:
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
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

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
        out: dict[str, list[str]] = {b: [] for b in self.entries}
        for qname, block in self.owner.items():
            out[block].append(qname)
        return out

    def check_known(self, blocks: Sequence[str]) -> None:
        """A misspelt block name is an error, never a silent no-op."""
        if unknown := set(blocks) - set(self.entries):
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
            elif covering(self.entries, key) & wanted:
                keys.append(key)
        return keys

    # -- actions --------------------------------------------------------------------------

    def freeze(self, frozen: Sequence[str], frozen_dropout: bool = False) -> None:
        """Train only the blocks not in ``frozen``; frozen blocks get no gradients and stay in eval mode.

        With ``frozen_dropout`` the frozen blocks keep their dropout active in training;
        their normalisation layers are pinned to eval mode either way. A parameter entry has no
        module to pin: its parameter gets no gradients and nothing else changes (the container
        holding it follows ``model.train()``, and the normalisation inside that container belongs
        to the blocks of its submodules).
        """
        self.check_known(frozen)
        self.unfreeze()
        for qname, p in self.model.named_parameters():
            trainable = self.owner[qname] not in frozen
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None
        for block in frozen:
            for module in self._modules_of(block):
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


class ProposedBlocks(NamedTuple):
    """A block spec, input to output, and the owners of its tied parameters (``propose_blocks``):
    ``Blocks(model, *proposal)``, ``Cascade(model, proposal.spec, shared=proposal.shared, ...)`` or
    ``Task(blocks=proposal.spec, shared=proposal.shared, ...)``."""

    spec: list[tuple[str, list[str]]]
    shared: dict[str, str]


def _is_stack(module: nn.Module) -> bool:
    """A ``ModuleList`` or ``Sequential`` of two or more modules of one type: repeated layers."""
    layers = list(module.children())
    return (
        isinstance(module, (nn.ModuleList, nn.Sequential))
        and len(layers) >= 2
        and len({type(layer) for layer in layers}) == 1
    )


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def propose_blocks(model: nn.Module, layers_per_block: int = 1, stack: str | None = None) -> ProposedBlocks:
    """Blocks for a model built around a stack of repeated layers (a transformer's encoder layers, a
    network's residual blocks), from its module tree alone: no forward pass, no knowledge of the
    architecture. Check the proposal (``proposal.spec``) before a long run; edit it as any spec.

    The stack is the module named ``stack`` or, by default, the ``nn.ModuleList`` or
    ``nn.Sequential`` of two or more modules of one type that holds the most parameters
    (``bert.encoder.layer``, ``transformer.h``, ``wav2vec2.encoder.layers``). The blocks are:

    - ``input``: every module registered before the stack in a container of it (embeddings, a
      convolutional feature extractor, the stack's positional convolution), and the parameters that
      sit directly on those containers (``wav2vec2.masked_spec_embed``);
    - one block per ``layers_per_block`` consecutive layers of the stack, named after the stack and
      its first and last layer (``h.0``, or ``h.0-1`` with two a block); the last may have fewer;
    - ``output``: every module registered after the stack (final norm, pooler, dropout, head).

    "Before" and "after" are the order in which the containers register their modules, which in
    the usual model follows the forward pass; a module registered before the stack but run after it
    (a final norm declared first) lands in ``input``, so read the proposal. An ``input`` or
    ``output`` with nothing in it is left out. A parameter reached from two blocks (an output
    layer tied to the input embedding, as in GPT-2) is owned by the higher one: it is then frozen
    with the classifier in every cascade stage and re-initialised only where the top block is, as
    ``lm-awd``'s default tie does (``shared``; give your own to choose otherwise). The proposal is
    checked as ``Blocks`` checks any spec: every parameter in exactly one block.
    """
    if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int) or layers_per_block < 1:
        raise BlockError(f"layers_per_block must be a positive int, got {layers_per_block!r}")
    modules = dict(model.named_modules())
    if stack is None:
        stacks = [name for name, module in modules.items() if _is_stack(module)]
        if not stacks:
            raise BlockError(
                "the model has no stack of repeated layers (a ModuleList or Sequential of two or more "
                "modules of one type): declare its blocks yourself"
            )
        stack = max(stacks, key=lambda name: _size(modules[name]))  # the first of the largest
    elif stack not in modules or not list(modules[stack].children()):
        raise BlockError(f"stack {stack!r} is no module with layers in the model")
    below: list[str] = []
    above: list[str] = []
    path = stack.split(".") if stack else []
    for depth, step in enumerate(path):  # each container of the stack, outermost first
        prefix = ".".join(path[:depth])
        container = modules[prefix]
        children = [name for name, _ in container.named_children()]
        at = children.index(step)
        below += [_qualified(prefix, name) for name, _ in container.named_parameters(recurse=False)]
        below += [_qualified(prefix, name) for name in children[:at]]
        above[:0] = [_qualified(prefix, name) for name in children[at + 1 :]]  # innermost first
    layers = [name for name, _ in modules[stack].named_children()]
    base = path[-1] if path else "layers"
    spec = [("input", below)] if below else []
    for i in range(0, len(layers), layers_per_block):
        group = layers[i : i + layers_per_block]
        name = f"{base}.{group[0]}" + (f"-{group[-1]}" if len(group) > 1 else "")
        spec.append((name, [_qualified(stack, layer) for layer in group]))
    if above:
        spec.append(("output", above))
    entries, order = dict(spec), [name for name, _ in spec]
    names_of: dict[int, list[str]] = {}
    for qname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(qname)
    shared = {}
    for names in names_of.values():
        if len(reached := set().union(*(covering(entries, n) for n in names))) > 1:
            shared[names[0]] = max(reached, key=order.index)
    Blocks(model, spec, shared)  # every parameter in exactly one block
    return ProposedBlocks(spec, shared)
