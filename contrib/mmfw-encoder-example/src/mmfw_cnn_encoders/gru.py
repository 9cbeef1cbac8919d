"""A GRU text encoder over a word vocabulary of the training captions (VSE++, Faghri et al.
2018). The vocabulary is fitted before training and saved in the run directory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import attrs
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmfw.spi import DataError, option

from .vocabulary import PAD, SPECIALS, Vocabulary


@attrs.frozen
class GRUTextOptions:
    vocab_size: int = option(10000, doc="words kept, most frequent in the train captions first "
                             "(specials included)", validator=attrs.validators.ge(len(SPECIALS)))
    min_count: int = option(1, doc="rarer words in the train captions become <unk>",
                            validator=attrs.validators.ge(1))
    max_length: int = option(32, doc="tokens per caption, <start> and <end> included",
                             validator=attrs.validators.ge(3))
    embed_dim: int = option(300, doc="word embedding width (VSE++: 300)",
                            validator=attrs.validators.ge(1))
    width: int = option(1024, doc="GRU hidden size (VSE++: 1024)",
                        validator=attrs.validators.ge(1))
    layers: int = option(1, doc="stacked GRU layers", validator=attrs.validators.ge(1))
    bidirectional: bool = option(False, doc="also read right to left (output dim 2 * width)")
    pooling: Literal["last", "mean"] = option("last", doc='"last": the final hidden state '
                                              '(VSE++); "mean": mean of the outputs')


class GRUText(nn.Module):
    """Word embeddings, a GRU over the words of each caption (packed: padding is never read),
    and the last hidden state (both directions concatenated) or the mean of the outputs."""

    Options = GRUTextOptions
    modality = "text"
    VOCAB_FILE = "vocab.json"

    def __init__(self, options: GRUTextOptions | None = None) -> None:
        super().__init__()
        o = self.options = options or GRUTextOptions()
        self.vocab: Vocabulary | None = None
        self.embed = nn.Embedding(o.vocab_size, o.embed_dim, padding_idx=PAD)
        self.gru = nn.GRU(o.embed_dim, o.width, o.layers, batch_first=True,
                          bidirectional=o.bidirectional)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # VSE++'s initialisation
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.dim = self.gru.hidden_size * (2 if self.gru.bidirectional else 1)

    # the vocabulary's lifecycle: fitted before training, saved in and loaded from the run ---
    def prepare(self, train_texts: Iterable[str]) -> None:
        self.vocab = Vocabulary.build(train_texts, self.options.vocab_size,
                                      self.options.min_count)

    def save_assets(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._require_vocab().save(Path(directory) / self.VOCAB_FILE)

    def load_assets(self, directory: str | Path) -> None:
        path = Path(directory) / self.VOCAB_FILE
        if not path.is_file():
            raise DataError(f"{path}: the gru-text vocabulary is missing from the run directory")
        vocab = Vocabulary.load(path)
        if len(vocab) > self.options.vocab_size:
            raise DataError(f"{path} has {len(vocab)} words, more than the recipe's "
                            f"vocab_size = {self.options.vocab_size}")
        self.vocab = vocab

    def _require_vocab(self) -> Vocabulary:
        if self.vocab is None:
            raise RuntimeError("gru-text has no vocabulary yet: call prepare(train_texts) to "
                               "build one, or load_assets(run_dir/'assets/text') to load a run's")
        return self.vocab

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        vocab, n = self._require_vocab(), self.options.max_length
        rows = [vocab.encode(str(t), n) for t in texts]
        ids = torch.full((len(rows), max(map(len, rows), default=2)), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": ids != PAD}

    # model ------------------------------------------------------------------------------------
    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
        lengths = mask.sum(1).cpu()  # pack_padded_sequence wants them on the CPU
        packed = pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, last = self.gru(packed)
        if self.options.pooling == "last":  # last: [layers * directions, B, width]
            last = last.view(self.gru.num_layers, -1, ids.shape[0], self.gru.hidden_size)[-1]
            return last.transpose(0, 1).reshape(ids.shape[0], self.dim)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp_min(1.0)

    def named_groups(self) -> dict[str, list[str]]:
        """The word embeddings, then one group per GRU layer (both directions)."""
        groups = {"embeddings": ["embed.weight"]}
        for k in range(self.gru.num_layers):
            groups[f"layers.{k}"] = [f"gru.{n}" for n, _ in self.gru.named_parameters()
                                     if n.split("_l")[-1].removesuffix("_reverse") == str(k)]
        return groups
