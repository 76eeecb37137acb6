"""Text -> token ids, with truncation to the model's limit and padding to the batch's longest.

Tokenizing and padding are separate steps so that a batcher can tokenize a whole request once,
sort by length, and pad each batch it cuts without tokenizing again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

IntArray = npt.NDArray[np.int64]


# Padded tokens (longest x count) per model call. Small calls keep activations in the CPU caches:
# on 2 cores INT8 ran 158 docs/s at 2048 vs 109 at 16384, queries 1529/s vs 1291 (bench/engine.py).
DEFAULT_TOKEN_BUDGET = 2048

# Padded tokens per model call by default. On the CPU, ONNX Runtime runs a call's operators one
# after another over all its tokens, so a smaller call keeps its activations (512 x 1536 floats
# for MiniLM's FFN, 3 MB) near the L2 cache: measured on an AVX2 EPYC, two single-threaded calls
# side by side, docs +14% (int8) and +11% (fp32) against 2048-token calls. Larger calls for CUDA,
# and for OpenVINO, whose BF16 vectors depend slightly on the padded length: its fleet test once
# found a cached copy past the 1e-5 drift floor with 512-token calls, never with 2048.
CPU_CALL_TOKENS = 512
LARGE_CALL_TOKENS = DEFAULT_TOKEN_BUDGET


def call_token_budget(setting: int, variant: str, device: str) -> int:
    """Padded tokens per model call: ``setting``, or where it is 0 (auto), ``CPU_CALL_TOKENS``
    for ONNX Runtime on the CPU and ``LARGE_CALL_TOKENS`` for openvino and CUDA."""
    if setting > 0:
        return setting
    return CPU_CALL_TOKENS if device == "cpu" and variant != "openvino" else LARGE_CALL_TOKENS


# Characters per token to read before tokenizing a long text: WordPiece averages ~4-5 characters
# per token in English; 8 leaves room, and _exact_head widens the cut when it was not enough.
CHARS_PER_TOKEN = 8


def _cut_after_last_kept_word(encoding: Encoding) -> bool:
    """True when the encoding of a cut text overflowed and its last word (the one the cut may
    have split) is not among the kept tokens: then the kept tokens are the whole text's."""
    if not encoding.overflowing:
        return False
    kept = [w for w in encoding.word_ids if w is not None]
    rest = [w for o in encoding.overflowing for w in o.word_ids if w is not None]
    return bool(kept) and bool(rest) and max(rest) > max(kept)


@dataclass(frozen=True, slots=True)
class TokenizedText:
    ids: list[int]
    truncated: bool


@dataclass(frozen=True, slots=True)
class Span:
    """A window of a long text: characters (Unicode code points) ``start`` to ``end``."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Encoded:
    """A padded batch ready for the model (right-padded, pad id in ``input_ids``)."""

    input_ids: IntArray  # [n, longest] int64
    attention_mask: IntArray  # [n, longest] int64, 1 for real tokens
    token_counts: list[int]  # real tokens per text, special tokens included
    truncated: list[bool]  # the text was cut to max_tokens
    texts: tuple[str, ...]  # the texts as given (before any prefix), for diagnostics

    def __len__(self) -> int:
        return len(self.token_counts)

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


class TextTokenizer:
    """A ``tokenizers`` tokenizer configured for the bundle: truncation at ``max_tokens``,
    no padding (padding is done here in numpy, to the longest text of each batch)."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, pad_id: int) -> None:
        tokenizer.no_padding()
        # The whole text's tokens and their offsets, for splitting a long text into windows.
        self._untruncated = Tokenizer.from_str(tokenizer.to_str())
        self._untruncated.no_truncation()
        tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.pad_id = pad_id
        self.special_tokens = len(self._untruncated.encode("", add_special_tokens=True).ids)

    @classmethod
    def from_file(cls, path: Path, max_tokens: int) -> TextTokenizer:
        tokenizer = Tokenizer.from_file(str(path))
        padding = tokenizer.padding
        pad_id = padding["pad_id"] if padding else tokenizer.token_to_id("[PAD]")
        return cls(tokenizer, max_tokens, int(pad_id or 0))

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Token ids per text, truncated at ``max_tokens``.

        A long text is cut to ``max_tokens * CHARS_PER_TOKEN`` characters before tokenizing (a
        64 KiB text took 40 ms and kept every overflow window; the model reads 256 tokens). The
        cut is exact: it can only change the tokens of the word it falls in, so the result is
        taken when that word comes after the last token kept; otherwise (long runs of spaces or
        unknown words) the cut is widened, up to the whole text."""
        cut_at = self.max_tokens * CHARS_PER_TOKEN
        heads = [t if len(t) <= cut_at else t[:cut_at] for t in texts]
        encodings = self._tokenizer.encode_batch(heads, add_special_tokens=True)
        tokenized: list[TokenizedText] = []
        for text, encoding in zip(texts, encodings, strict=True):
            if len(text) > cut_at:
                encoding = self._exact_head(text, encoding, cut_at)
            # With stride 0 the tokenizer keeps what was cut off in `overflowing`.
            tokenized.append(TokenizedText(encoding.ids, bool(encoding.overflowing)))
        return tokenized

    def _exact_head(self, text: str, encoding: Encoding, cut_at: int) -> Encoding:
        while not _cut_after_last_kept_word(encoding) and cut_at < len(text):
            cut_at *= 4
            encoding = self._tokenizer.encode(text[:cut_at], add_special_tokens=True)
        return encoding

    def content_tokens(self, text: str) -> int:
        """Tokens of ``text`` without the special tokens (a prompt prefix's share of a window)."""
        return len(self._untruncated.encode(text, add_special_tokens=False).ids)

    def windows(self, text: str, *, overlap: int, reserved: int = 0) -> list[Span]:
        """``text`` split into windows the model reads whole: at most ``max_tokens`` minus the
        special tokens and ``reserved`` (a prompt prefix) tokens each, consecutive windows sharing
        about ``overlap`` tokens. Windows end and start at word boundaries where one lies in the
        window's second half (a word cut in two would tokenize differently on its own), so each
        window's text, embedded alone, reads the tokens it had in the whole text. A text that fits
        is one window, the whole text."""
        size = self.max_tokens - self.special_tokens - reserved
        if size < 1:
            raise ValueError(f"a prompt of {reserved} tokens leaves no room in {self.max_tokens}")
        if not 0 <= overlap <= size // 4:
            raise ValueError(f"overlap must be 0 to {size // 4} tokens (a quarter of the window)")
        encoding = self._untruncated.encode(text, add_special_tokens=False)
        count = len(encoding.ids)
        if count <= size:
            return [Span(0, len(text))]
        words, offsets = encoding.word_ids, encoding.offsets

        def starts_word(index: int) -> bool:
            return index <= 0 or index >= count or words[index] is None or words[index] != words[index - 1]

        spans: list[Span] = []
        start = 0
        while True:
            end = start + size
            if end >= count:
                spans.append(Span(offsets[start][0], len(text)))
                return spans
            cut = end
            while cut > start + size // 2 and not starts_word(cut):
                cut -= 1
            if not starts_word(cut):
                cut = end  # one word longer than half a window: cut inside it
            spans.append(Span(0 if start == 0 else offsets[start][0], offsets[cut - 1][1]))
            following = cut - overlap
            while following > start + 1 and not starts_word(following):
                following -= 1
            start = following if following > start else cut

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.ids) for t in self.tokenize(texts)]

    def pad(self, tokenized: Sequence[TokenizedText], texts: Sequence[str]) -> Encoded:
        if len(tokenized) != len(texts):
            raise ValueError("tokenized and texts differ in length")
        counts = [len(t.ids) for t in tokenized]
        longest = max(counts, default=0)
        input_ids = np.full((len(tokenized), longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(tokenized), longest), dtype=np.int64)
        for row, (item, count) in enumerate(zip(tokenized, counts, strict=True)):
            input_ids[row, :count] = item.ids
            attention_mask[row, :count] = 1
        return Encoded(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_counts=counts,
            truncated=[t.truncated for t in tokenized],
            texts=tuple(texts),
        )

    def encode(self, texts: Sequence[str]) -> Encoded:
        return self.pad(self.tokenize(texts), texts)
