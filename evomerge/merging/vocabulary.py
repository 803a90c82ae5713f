"""`tokenizer_source` in a merge config: the output vocabulary decides the embedding rows.

mergekit treats a given `tokenizer_source` (a model, or `base`) as the output vocabulary: every
token-indexed tensor (input embeddings, LM head) is rebuilt with one row per token of that
tokenizer, and config.json's `vocab_size` becomes that count. Rows past the tokenizer, the padding
many checkpoints carry, are dropped. Without `tokenizer_source` the tensors are merged as stored.

Here only the common case is supported: every model's tokenizer gives each output token the same
id, below its `vocab_size` (fine-tunes of one base). Then rebuilding is keeping the first
len(vocabulary) rows. Models whose vocabularies differ would need mergekit's row permutation and
per-token fallbacks; they are refused with a ConfigError instead of merged row by row wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from evomerge.errors import ConfigError

VOCABULARY_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # token-indexed along dim 0 (Llama family)


def is_vocabulary_tensor(name: str) -> bool:
    return name.endswith(VOCABULARY_TENSORS)


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as exc:  # noqa: BLE001 - any loader failure means the same thing here
        raise ConfigError(f"tokenizer_source: cannot load the tokenizer of {folder} ({exc})") from None


def _vocab_size(folder: Path) -> Optional[int]:
    path = folder / "config.json"
    if not path.is_file():
        return None
    size = json.loads(path.read_text()).get("vocab_size")
    return int(size) if isinstance(size, int) else None


def output_rows(tokenizer_source: Path, models: Sequence[Path]) -> int:
    """How many vocabulary rows the merge keeps: the output tokenizer's size.

    Raises ConfigError where a model's tokenizer numbers the output tokens otherwise, or lacks
    rows for them, because keeping the first rows would then mix different tokens.
    """
    out = _vocab(tokenizer_source)
    if sorted(out.values()) != list(range(len(out))):
        raise ConfigError(f"tokenizer_source: the tokenizer of {tokenizer_source} does not number its tokens "
                          "0..n-1; such vocabularies are not supported")
    for folder in models:
        size = _vocab_size(folder)
        if size is not None and size < len(out):
            raise ConfigError(f"tokenizer_source: {folder} has {size} embedding rows but the output tokenizer "
                              f"has {len(out)} tokens; merging models with other vocabularies is not supported")
        if folder == tokenizer_source or not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            continue  # no tokenizer of its own: like mergekit, assume the source's
        theirs = _vocab(folder)
        moved = [tok for tok, i in out.items() if theirs.get(tok) != i]
        if moved:
            raise ConfigError(f"tokenizer_source: {folder}'s tokenizer numbers {len(moved)} tokens unlike the output "
                              f"tokenizer (e.g. {moved[0]!r}); merging models with other vocabularies is not supported "
                              "(drop tokenizer_source to merge the embedding rows as stored)")
    return len(out)


def keep_rows(tensor: torch.Tensor, rows: Optional[int]) -> torch.Tensor:
    """The first `rows` token rows (all when None)."""
    return tensor if rows is None or tensor.shape[0] <= rows else tensor[:rows]


def set_vocab_size(folder: Path, rows: int) -> None:
    """config.json's vocab_size, matching the rows written."""
    path = folder / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config["vocab_size"] = rows
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
