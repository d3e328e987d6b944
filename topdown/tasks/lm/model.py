"""AWD-LSTM (Merity, Keskar and Socher, "Regularizing and optimizing LSTM language models", 2017),
written for current PyTorch.

Ingredients: embedding dropout (whole word vectors dropped per batch), variational (locked)
dropout on the embedding output, between LSTM layers and on the last LSTM's output,
weight-drop (DropConnect) on each LSTM's hidden-to-hidden matrix, and tied embedding and
softmax weights. AR/TAR and variable-length BPTT are in the training loss (``awd.py``);
NT-ASGD is the training loop's ``train.optimizer: ntasgd``.

Weight-drop without breaking parameter registration: each ``LSTMLayer`` registers its own
raw parameters exactly once (``weight_ih``, ``weight_hh_raw``, ``bias_ih``, ``bias_hh``) and
calls the LSTM kernel that ``nn.LSTM`` uses (``torch.lstm``) with the dropped hidden-to-
hidden matrix computed afresh on every forward. Nothing is deleted from or re-assigned to a
module's ``_parameters`` (the original code's trick, which fails on recent PyTorch).

Tied weights, three modes (``model.tie``):
- ``classifier``: one matrix, ``encoder.weight`` and ``decoder.weight`` are the same
  ``Parameter``; the task gives it to the ``decoder`` block.
- ``untie``: two parameters and a buffer ``tied`` (1 at first). While ``tied`` is 1, the
  embedding and the softmax both use ``decoder.weight`` (``encoder.weight`` is ignored and
  is set equal to it whenever a state dict is loaded). The first training step of a stage
  that trains one of the two matrices but not the other sets ``tied`` to 0: from then on
  they are separate. So the baseline trains tied weights and later stages untie them.
- ``none``: never tied (separate matrices from the start, as pytorch/examples' default).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

TIE_MODES = ("classifier", "untie", "none")


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, the same at every time step. Input (T, B, H)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


class Embedding(nn.Module):
    """Word embedding with embedding dropout (drop whole words' vectors) and locked input dropout."""

    def __init__(self, vocab: int, dim: int, dropoute: float, dropouti: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim).uniform_(-0.1, 0.1))
        self.dropoute = dropoute
        self.lockdrop = LockedDropout(dropouti)

    def forward(self, tokens: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        emb = F.embedding(tokens, weight)
        if self.training and self.dropoute > 0:
            # a per-word mask over the whole vocabulary, applied to the looked-up rows: the same
            # as masking the matrix, without materialising a masked copy of it
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - self.dropoute) / (1 - self.dropoute)
            emb = emb * F.embedding(tokens, keep)
        return self.lockdrop(emb)


class LSTMLayer(nn.Module):
    """One unidirectional LSTM layer with weight-drop on ``weight_hh_raw`` and locked dropout on its
    output."""

    def __init__(self, inputs: int, hidden: int, wdrop: float, dropout: float):
        super().__init__()
        self.hidden = hidden
        self.wdrop = wdrop
        bound = 1 / math.sqrt(hidden)  # nn.LSTM's initialisation
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, inputs).uniform_(-bound, bound))
        self.weight_hh_raw = nn.Parameter(torch.empty(4 * hidden, hidden).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden).uniform_(-bound, bound))
        self.lockdrop = LockedDropout(dropout)

    def weight_hh(self) -> torch.Tensor:
        """The hidden-to-hidden matrix of this forward pass: DropConnect in training, the raw one in eval."""
        if self.training and self.wdrop > 0:
            return F.dropout(self.weight_hh_raw, self.wdrop, training=True)
        return self.weight_hh_raw

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (T, B, inputs) -> raw output (T, B, H), final (h, c), dropped output."""
        if state is None:
            zeros = x.new_zeros(1, x.shape[1], self.hidden)
            state = (zeros, zeros)
        weights = (self.weight_ih, self.weight_hh(), self.bias_ih, self.bias_hh)
        # cuDNN cannot backpropagate in eval mode (a frozen layer above a trained one); the native kernel can
        with torch.backends.cudnn.flags(enabled=self.training or not torch.is_grad_enabled()):
            out, h, c = torch.lstm(x, state, weights, True, 1, 0.0, self.training, False, False)
        return out, (h, c), self.lockdrop(out)


class AWDLSTM(nn.Module):
    def __init__(
        self,
        vocab: int,
        emsize: int,
        hidden: int,
        layers: int,
        *,
        tie: str = "classifier",
        dropoute: float = 0.1,
        dropouti: float = 0.65,
        dropouth: float = 0.3,
        dropout: float = 0.4,
        wdrop: float = 0.5,
    ):
        super().__init__()
        if tie not in TIE_MODES:
            raise ValueError(f"tie must be one of {TIE_MODES}, got {tie!r}")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.tie = tie
        last = emsize if tie != "none" else hidden  # tied weights need the last LSTM to output embeddings
        sizes = [emsize] + [hidden] * (layers - 1) + [last]
        self.encoder = Embedding(vocab, emsize, dropoute, dropouti)
        self.rnns = nn.ModuleList(
            LSTMLayer(a, b, wdrop, dropouth if i < layers - 1 else dropout)
            for i, (a, b) in enumerate(zip(sizes, sizes[1:]))
        )
        self.decoder = nn.Linear(last, vocab)
        nn.init.zeros_(self.decoder.bias)
        if tie == "classifier":
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if tie == "untie":
            self.register_buffer("tied", torch.ones((), dtype=torch.bool))
            self.register_load_state_dict_pre_hook(_sync_tied_embedding)

    def _untie_if_split(self) -> None:
        """``untie`` mode: a stage that trains exactly one of the two matrices unties them for good."""
        if self.tie == "untie" and bool(self.tied) and self.training and torch.is_grad_enabled():
            if self.encoder.weight.requires_grad != self.decoder.weight.requires_grad:
                self.tied.fill_(False)

    def forward(self, tokens: torch.Tensor, hidden: list | None = None):
        """tokens (T, B) -> logits (T, B, V), new hidden states, last layer's raw and dropped outputs."""
        self._untie_if_split()
        shared = self.decoder.weight if self.tie == "untie" and bool(self.tied) else None
        x = self.encoder(tokens, shared)
        new_hidden = []
        raw = x
        for i, rnn in enumerate(self.rnns):
            raw, state, x = rnn(x, None if hidden is None else hidden[i])
            new_hidden.append(state)
        weight = self.decoder.weight
        return F.linear(x, weight, self.decoder.bias), new_hidden, raw, x


def _sync_tied_embedding(module: AWDLSTM, state_dict, prefix, *args) -> None:
    """Loading a state whose ``tied`` is 1: the embedding is the decoder's matrix.

    A checkpoint of a ``classifier`` or ``none`` model has no ``tied``: it counts as tied when
    its two matrices are equal (a tied checkpoint holds the one matrix under both names).
    """
    enc, dec, key = prefix + "encoder.weight", prefix + "decoder.weight", prefix + "tied"
    if enc not in state_dict or dec not in state_dict:
        return
    if key not in state_dict:
        state_dict[key] = torch.tensor(bool(torch.equal(state_dict[enc], state_dict[dec])))
    if bool(state_dict[key]):
        state_dict[enc] = state_dict[dec].clone()


def detach(hidden: list) -> list:
    return [(h.detach(), c.detach()) for h, c in hidden]
