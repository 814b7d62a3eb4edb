"""A deterministic word/punctuation tokenizer for the emulator (no model files).

Why hashing: the emulator must turn any text into stable token ids with no vocabulary file, and
two workers (or two runs) must agree on the ids. A token's id is a keyed BLAKE2b hash of its
surface form, so the same word always gets the same id, and same-domain text shares ids simply
because it shares words. That sharing is what the `token-hash` routing source builds on.

Decoding: hashing is one-way, so each Tokenizer instance remembers the words it has encoded
(id -> first word seen with that id; at most `vocab_size` entries, so memory is bounded).
Ids it never saw (e.g. sent as `input_ids` by a client) decode to a pronounceable placeholder
word derived from the id, so output text is always plausible-looking and deterministic.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

# Words (letters/digits/underscore, any script) or single non-space symbols.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# Punctuation that attaches to the previous word when decoding ("word," not "word ,").
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%'\"")
_NO_SPACE_AFTER = frozenset("([{")

_CONSONANTS = "bdfgklmnprstvz"
# Words whose id encode() remembers (a keyed BLAKE2b per word was ~60% of encoding a prompt).
# Bounded so arbitrary client text cannot grow it without limit; beyond it words are hashed.
_ID_CACHE_SIZE = 1 << 17
_VOWELS = "aeiou"


class Tokenizer:
    """Stable text <-> id mapping; ids 0 and 1 are reserved for padding and end-of-sequence."""

    PAD_TOKEN_ID = 0
    EOS_TOKEN_ID = 1
    _NUM_SPECIAL = 2

    def __init__(self, vocab_size: int = 1 << 16, *, key: bytes = b"eldr-emulator") -> None:
        # 2^16 ids: with n distinct words about n^2 / 2^17 pairs share an id (birthday bound),
        # ~8 pairs for 1,000 words, ~190 for 5,000: collisions merge a few rare words, which
        # only makes them route alike.
        if not isinstance(vocab_size, int) or vocab_size <= self._NUM_SPECIAL:
            raise ValueError(
                f"vocab_size must be an integer > {self._NUM_SPECIAL}, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.eos_token_id = self.EOS_TOKEN_ID
        self._key = key[:64]
        self._words: dict[int, str] = {}
        self._ids: dict[str, int] = {}

    def token_id(self, word: str) -> int:
        """The id of one pre-split token (a word or a punctuation mark)."""
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8, key=self._key).digest()
        span = self.vocab_size - self._NUM_SPECIAL
        return self._NUM_SPECIAL + int.from_bytes(digest, "little") % span

    def split(self, text: str) -> list[str]:
        """Split text into word and punctuation tokens (whitespace is dropped)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return _TOKEN_RE.findall(text)

    def encode(self, text: str) -> list[int]:
        ids = []
        cache = self._ids
        for word in self.split(text):
            tid = cache.get(word)
            if tid is None:
                tid = self.token_id(word)
                self._words.setdefault(tid, word)
                if len(cache) < _ID_CACHE_SIZE:
                    cache[word] = tid
            ids.append(tid)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        parts: list[str] = []
        for raw in ids:
            tid = int(raw)
            if tid < 0 or tid >= self.vocab_size:
                raise ValueError(f"token id {tid} is outside [0, {self.vocab_size})")
            if tid < self._NUM_SPECIAL:
                continue  # special tokens have no text, as with skip_special_tokens=True
            word = self._words.get(tid) or placeholder_word(tid)
            if parts and not (word[0] in _NO_SPACE_BEFORE or parts[-1][-1] in _NO_SPACE_AFTER):
                parts.append(" ")
            parts.append(word)
        return "".join(parts)

    def known_words(self) -> int:
        """How many ids this instance can decode back to their original word."""
        return len(self._words)


def placeholder_word(token_id: int) -> str:
    """A pronounceable stand-in word for an id whose text is unknown (deterministic)."""
    n = int(token_id)
    letters = []
    for _ in range(3):
        letters.append(_CONSONANTS[n % len(_CONSONANTS)])
        n //= len(_CONSONANTS)
        letters.append(_VOWELS[n % len(_VOWELS)])
        n //= len(_VOWELS)
    return "".join(letters)
