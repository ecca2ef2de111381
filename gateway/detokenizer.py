"""Incremental detokenization and stop strings.

:class:`IncrementalDetokenizer` turns token ids, fed one or a few at a time,
into text deltas. It decodes only a small window (vLLM's ``prefix_offset`` /
``read_offset``): the tokens already emitted that the next ones may merge with,
plus the new ones. A delta never ends in a partial UTF-8 character: while the
window's text ends with U+FFFD the new tokens are held back. At the end,
:meth:`~IncrementalDetokenizer.flush` emits what is held, so the concatenation of
all deltas equals ``decode(all ids)``.

:class:`StopMatcher` cuts the text at the earliest stop string and holds back
any tail that could still grow into one, so no stop-string text reaches the client.

:class:`TextStream` runs both: ids in, safe text deltas out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context of the first window (as vLLM does), so that
# tokenizers that strip a leading space at the start of a text decode the
# answer's first token as a continuation of the prompt.
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Token ids in, text deltas out.

    Without ``prompt_ids`` the deltas add up to ``decode(ids)``; with them, to the
    text the answer adds after the prompt, ``decode(ctx + ids)[len(decode(ctx)):]``
    for the last few prompt tokens ``ctx``."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        ctx = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        ctx_text = tokenizer.decode(ctx, skip_special_tokens=skip_special_tokens) if ctx else ""
        if REPLACEMENT_CHAR in ctx_text:
            # The prompt's tail is cut inside a character: an answer that completes it
            # would change the context's length under us, so do without context.
            ctx, ctx_text = [], ""
        self._ids: list[int] = ctx
        self._num_context = len(ctx)
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(ctx)  # tokens before this are emitted
        self._prefix_text = ctx_text
        self._parts: list[str] = []

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    @property
    def token_ids(self) -> list[int]:
        """The answer's ids fed so far (prompt context excluded)."""
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._parts)

    @property
    def pending_tokens(self) -> int:
        """Tokens fed but not yet turned into emitted text."""
        return len(self._ids) - self._read_offset

    def push(self, ids: Iterable[int]) -> str:
        """Feeds new ids; returns the text they complete ("" while a character is
        still partial)."""
        n = len(self._ids)
        self._ids.extend(ids)
        if len(self._ids) == n:
            return ""
        window = self._decode(self._prefix_offset)
        if window.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character: wait for the rest of its bytes
        if len(window) <= len(self._prefix_text):
            if window == self._prefix_text:
                self._read_offset = len(self._ids)  # nothing visible (e.g. skipped specials)
            return ""
        return self._emit(window)

    def flush(self) -> str:
        """The end of the stream: emits whatever is held back, partial characters
        (as U+FFFD) included."""
        if self._read_offset == len(self._ids):
            return ""
        window = self._decode(self._prefix_offset)
        if len(window) <= len(self._prefix_text):
            self._read_offset = len(self._ids)
            return ""
        return self._emit(window)

    def _emit(self, window: str) -> str:
        delta = window[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        if delta:
            self._parts.append(delta)
        return delta


class StopMatcher:
    """Cuts generated text at the earliest stop string.

    ``push(delta)`` returns ``(text safe to send, stopped)``: text up to (not
    including) a stop string, minus any tail that might be the start of one; once
    ``stopped`` everything after is dropped. ``flush()`` at the end of the stream
    releases the held-back tail (it turned out not to be a stop string)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)
        self._buf = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def held(self) -> str:
        """Text held back, waiting to see whether a stop string starts there."""
        return self._buf

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        buf = self._buf + delta
        best: int | None = None
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (best is None or i < best):
                best, self.matched = i, s
        if best is not None:
            self.stopped = True
            self._buf = ""
            return buf[:best], True
        hold = self._partial_suffix(buf)
        cut = len(buf) - hold
        self._buf = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        if self.stopped:
            return ""
        out, self._buf = self._buf, ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        last = buf[-1:]
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if s[k - 1] == last and buf.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """Ids in, client-safe text deltas out: detokenizes, then applies stop strings.

    ``push(ids) -> (delta, stopped)``; ``finish() -> delta`` at the end of the
    stream (when not stopped)."""

    def __init__(
        self,
        tokenizer: Decoder,
        stops: Sequence[str] = (),
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens
        )
        self.stop = StopMatcher(stops)
        self._parts: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    @property
    def text(self) -> str:
        """The text sent so far."""
        return "".join(self._parts)

    def push(self, ids: Iterable[int]) -> tuple[str, bool]:
        if self.stop.stopped:
            return "", True
        delta, stopped = self.stop.push(self.detokenizer.push(ids))
        if delta:
            self._parts.append(delta)
        return delta, stopped

    def push_until_stop(self, ids: list[int]) -> tuple[str, list[int]]:
        """Several ids at once, but cut as if they came one by one: (the delta, the ids
        up to and including the one that completes a stop string)."""
        if len(ids) < 2 or not self.stop.stops:
            return self.push(ids)[0], ids
        delta = ""
        for i, t in enumerate(ids):
            delta += self.push([t])[0]
            if self.stop.stopped:
                return delta, ids[: i + 1]
        return delta, ids

    def finish(self) -> str:
        if self.stop.stopped:
            return ""
        delta, stopped = self.stop.push(self.detokenizer.flush())
        if not stopped:
            delta += self.stop.flush()
        if delta:
            self._parts.append(delta)
        return delta
