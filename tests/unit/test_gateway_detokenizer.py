"""Incremental detokenization and stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from gateway.detokenizer import IncrementalDetokenizer, StopMatcher, TextStream
from gateway.tokenizer import Tokenizer
from services.engine import byte_tokenizer as bt

TEXT = "héllo wörld 日本語 🙂 — naïve café, 東京タワー 🙂🙂 end"


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    """A byte-level BPE whose merges cross character boundaries: some tokens end
    inside a UTF-8 character, others start inside one."""
    b2u = bt._byte_to_unicode()
    vocab = {ch: b for b, ch in b2u.items()}
    merges = []

    def merge(a: bytes, b: bytes) -> None:
        left, right = "".join(b2u[x] for x in a), "".join(b2u[x] for x in b)
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))

    ni, hon = "日".encode(), "本".encode()
    merge(ni[2:], hon[:1])  # end of 日 + start of 本
    merge(b"h", "é".encode()[:1])  # h + first byte of é
    merge(ni[:1], ni[1:2])  # two thirds of 日
    merge("🙂".encode()[:2], "🙂".encode()[2:3])
    merge("🙂".encode()[:1], "🙂".encode()[1:2])
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf)


def chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(ids[i : i + n])
        i += n
    return out


def assert_utf8_safe(delta: str) -> None:
    assert "\ufffd" not in delta
    delta.encode("utf-8")  # no lone surrogates either


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_byte_tokens_one_or_few_at_a_time(byte_tok: Tokenizer, step: int) -> None:
    ids = byte_tok.encode(TEXT)
    d = IncrementalDetokenizer(byte_tok)
    deltas = [d.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(d.flush())
    for delta in deltas:
        assert_utf8_safe(delta)
    assert "".join(deltas) == TEXT == byte_tok.decode(ids) == d.text
    assert d.token_ids == ids
    # Multi-byte characters are held until complete: fewer non-empty deltas than tokens.
    assert sum(1 for x in deltas if x) < len(ids)


def test_random_chunking_with_merges(bpe_tok: Tokenizer) -> None:
    ids = bpe_tok.encode(TEXT)
    assert bpe_tok.decode(ids) == TEXT
    # The trained merges really produce tokens that end inside a character.
    assert len(ids) < len(TEXT.encode())
    assert sum("\ufffd" in bpe_tok.decode([i]) for i in ids) >= 4
    rng = random.Random(0)
    for _ in range(20):
        d = IncrementalDetokenizer(bpe_tok)
        deltas = [d.push(c) for c in chunks(ids, rng)] + [d.flush()]
        for delta in deltas:
            assert_utf8_safe(delta)
        assert "".join(deltas) == TEXT


def test_random_ids_concatenation_equals_full_decode(byte_tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(259) for _ in range(rng.randint(0, 40))]
        d = IncrementalDetokenizer(byte_tok)
        deltas = [d.push(c) for c in chunks(ids, rng)] + [d.flush()]
        assert "".join(deltas) == byte_tok.decode(ids)
        # Only flush may carry U+FFFD at the very end (a character cut off by the end).
        for delta in deltas[:-1]:
            assert not delta.endswith("\ufffd")


def test_truncated_character_is_flushed(byte_tok: Tokenizer) -> None:
    ids = list("a日".encode())[:-1]
    d = IncrementalDetokenizer(byte_tok)
    assert d.push(ids) == ""  # "a" + two bytes of 日: held as a whole window
    assert d.flush() == "a\ufffd" == byte_tok.decode(ids)
    assert d.flush() == ""


def test_special_tokens_skipped_window_stays_small(byte_tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(byte_tok)
    assert d.push([257] * 100) == ""
    assert d.pending_tokens == 0  # invisible tokens do not pile up in the window
    assert d.push([104, 105]) == "hi"


def test_decodes_only_a_window(byte_tok: Tokenizer) -> None:
    calls: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001
            calls.append(len(ids))
            return byte_tok.decode(ids, skip_special_tokens)

    d = IncrementalDetokenizer(Counting())
    for t in byte_tok.encode("x" * 500):
        d.push([t])
    assert max(calls) <= 4


def test_prompt_context(byte_tok: Tokenizer) -> None:
    prompt = byte_tok.encode("prompt 日")
    d = IncrementalDetokenizer(byte_tok, prompt_ids=prompt)
    out = "".join(d.push([t]) for t in byte_tok.encode(" answer 🙂")) + d.flush()
    assert out == " answer 🙂"
    assert d.token_ids == byte_tok.encode(" answer 🙂")
    # A prompt cut inside a character is not used as context.
    cut = byte_tok.encode("x日")[:-1]
    d = IncrementalDetokenizer(byte_tok, prompt_ids=cut)
    assert d.push(byte_tok.encode("ok")) + d.flush() == "ok"


# -- stop strings -----------------------------------------------------------------------


def run_stop(stops: list[str], deltas: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    sent = []
    stopped = False
    for delta in deltas:
        out, stopped = m.push(delta)
        sent.append(out)
        if stopped:
            break
    if not stopped:
        sent.append(m.flush())
    return "".join(sent), stopped, sent


def test_stop_within_one_delta() -> None:
    text, stopped, _ = run_stop(["STOP"], ["hello STOP world"])
    assert (text, stopped) == ("hello ", True)


def test_stop_across_delta_boundaries_is_never_sent() -> None:
    text, stopped, sent = run_stop(["</answer>"], ["The ans", "wer is 42<", "/ans", "wer> more"])
    assert (text, stopped) == ("The answer is 42", True)
    assert all("<" not in x for x in sent)  # the held-back "<" never went out


def test_partial_stop_held_then_released() -> None:
    m = StopMatcher(["abc"])
    assert m.push("xxab") == ("xx", False)
    assert m.held == "ab"
    assert m.push("d") == ("abd", False)
    assert m.push("a") == ("", False)
    assert m.flush() == "a"


def test_earliest_of_several_stops_wins() -> None:
    text, stopped, _ = run_stop(["world", "lo w", "zzz"], ["hel", "lo wor", "ld"])
    assert (text, stopped) == ("hel", True)
    m = StopMatcher(["bb", "abbb"])
    assert m.push("xabbb") == ("x", True) and m.matched == "abbb"


def test_no_stops_passes_through_and_after_stop_nothing() -> None:
    assert run_stop([], ["a", "b"])[0] == "ab"
    m = StopMatcher(["x"])
    assert m.push("ax") == ("a", True)
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_overlapping_partial_prefix() -> None:
    # "aab" must still be found when the text is "aaab" split as "aa" + "ab".
    assert run_stop(["aab"], ["a", "a", "a", "b", "c"])[:2] == ("a", True)


def test_random_stop_fuzz() -> None:
    rng = random.Random(2)
    for _ in range(300):
        text = "".join(rng.choice("ab日c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab日") for _ in range(rng.randint(1, 4)))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(4, len(text) + 1)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, stopped, _ = run_stop(stops, pieces)
        i = text.find(stops[0])
        assert out == (text[:i] if i >= 0 else text)
        assert stopped == (i >= 0)


def test_text_stream_end_to_end(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("日本語 is fun. STOP after")
    s = TextStream(byte_tok, stops=["STOP"])
    sent = []
    for t in ids:
        delta, stopped = s.push([t])
        assert_utf8_safe(delta)
        sent.append(delta)
        if stopped:
            break
    assert stopped and "".join(sent) == "日本語 is fun. " == s.text
    assert s.finish() == ""

    s = TextStream(byte_tok, stops=["zz"])
    out = "".join(s.push([t])[0] for t in byte_tok.encode("ends with z")) + s.finish()
    assert out == "ends with z" and not s.stopped


def test_a_chunk_of_ids_is_cut_where_one_by_one_would_stop(byte_tok: Tokenizer) -> None:
    """A worker catching up sends several tokens in one message: the ids after the one
    that completes a stop string are not sent, exactly as if they had come singly."""
    ids = byte_tok.encode("say hello world and more")
    singly, sent = TextStream(byte_tok, ["world"]), []
    for t in ids:
        sent.append(t)
        singly.push([t])
        if singly.stopped:
            break
    chunked = TextStream(byte_tok, ["world"])
    delta, kept = chunked.push_until_stop(ids[:3])
    rest_delta, rest = chunked.push_until_stop(ids[3:])
    assert kept + rest == sent and chunked.stopped
    assert delta + rest_delta == singly.text == "say hello "
    free = TextStream(byte_tok)
    assert free.push_until_stop(ids) == ("say hello world and more", ids)
