"""The vocabulary as xgrammar sees it: each token's bytes, the stop ids, the logits width.

Gemma's tokenizer is SentencePiece-style: "▁" stands for a space, ``<0xNN>`` tokens are single
bytes (byte fallback), and no space is prepended to the text. xgrammar decodes such a vocabulary
itself (``VocabType.BYTE_FALLBACK``); a vocabulary without byte tokens (the character tokenizers
of tests) is taken literally (``RAW``).

Special tokens (``<start_of_turn>``, ``<unusedN>``, ``<eos>`` ...) are given the empty string, so
xgrammar treats them as special and never lets a grammar produce them: their text is not what
the detokenizer writes (it drops them), so a grammar that matched their literal spelling would
accept output whose visible text it never saw. The stop ids stay allowed where the grammar may
end. Ids past the tokenizer's vocabulary (a logits width padded beyond it) are empty too, so
the mask always forbids them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    import xgrammar as xgr

# Built once per (tokenizer, logits width): ~2 s for Gemma 3's 262144 tokens. Weak, so an info
# goes with its tokenizer.
_CACHE = WeakIdKeyDictionary()
_LOCK = threading.Lock()


def tokenizer_info(tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's TokenizerInfo for a GemmaTokenizer and the model's logits width."""
    with _LOCK:
        per_width = _CACHE.get(tokenizer)
        if per_width is None:
            per_width = _CACHE[tokenizer] = {}
        info = per_width.get(vocab_size)
        if info is None:
            info = per_width[vocab_size] = _build(tokenizer, vocab_size)
        return info


def _build(tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    import xgrammar as xgr

    encoded = [""] * vocab_size
    special = tokenizer.special_ids
    for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and i not in special:
            encoded[i] = token
    byte_fallback = len(tokenizer.byte_ids) == 256
    stop = sorted(t for t in tokenizer.stop_token_ids if t < vocab_size)
    return xgr.TokenizerInfo(
        encoded,
        xgr.VocabType.BYTE_FALLBACK if byte_fallback else xgr.VocabType.RAW,
        vocab_size=vocab_size,
        stop_token_ids=stop,
        add_prefix_space=False,  # Gemma: "hello" -> "hello", no dummy "▁" prefix
    )
