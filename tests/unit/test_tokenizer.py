"""Tokenizer: chat template, EOS ids, incremental detokenization of multi-byte and byte-fallback
tokens, and stop strings held back until they cannot match."""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from pdpipe.messages import EngineOutput, SamplingParams
from pdpipe.output import RequestTextState
from pdpipe.tokenizer import ChatTemplateError, Tokenizer

TEXT = "Zürich, 你好世界! 🎉🤖 こんにちは — naïve café"


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir("llama"))


def stream(tokenizer, prompt, ids):
    detok = tokenizer.detokenizer(prompt)
    return [detok.step(t) for t in ids]


def test_incremental_detokenization_of_multibyte_text(tok):
    ids = tok.encode(TEXT)
    pieces = stream(tok, [], ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert "" in pieces, "some token ends inside a UTF-8 character and must wait for the next"
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenization_after_a_prompt(tok):
    prompt, rest = tok.encode("Hello world"), tok.encode(" and café 你好")
    assert "".join(stream(tok, prompt, rest)) == tok.decode(prompt + rest)[len(tok.decode(prompt)):]


def byte_fallback_tokenizer(path):
    """A sentencepiece-style tokenizer: ASCII pieces, and <0xNN> byte tokens for everything else."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyzHW,!":
        vocab.setdefault(ch, len(vocab))
    vocab["▁w"] = len(vocab)
    merges = [("▁", "w")]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<s>", "</s>"])
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return Tokenizer(path)


def test_byte_fallback_tokens_decode_incrementally(tmp_path):
    tok = byte_fallback_tokenizer(tmp_path / "bf")
    ids = tok.encode("Hello wörld 你好!")
    assert any(tok.hf.id_to_token(i).startswith("<0x") for i in ids)
    pieces = stream(tok, [], ids)
    assert "".join(pieces) == tok.decode(ids) == "Hello wörld 你好!"
    assert pieces.count("") >= 3  # 'ö' waits one byte, each CJK character two
    assert tok.eos_token_ids == {2}


def test_chat_template_renders_messages_and_parts(tok):
    text = tok.apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.hf.token_to_id("<|im_start|>")
    assert tok.eos_token_ids >= {tok.hf.token_to_id("<|im_end|>")}


@pytest.mark.parametrize("messages,field", [
    ([], "messages"), ([{"content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\].content\[0\]"),
])
def test_bad_messages_name_the_field(tok, messages, field):
    with pytest.raises(ChatTemplateError, match=field):
        tok.apply_chat_template(messages)


def feed(tok, text, stops, finish_at_end=True, include=False):
    """Feeds `text` token by token; returns each delta's text and the final output."""
    ids = tok.encode(text)
    state = RequestTextState(tok, "r", [], SamplingParams(stop=stops, include_stop_str_in_output=include))
    deltas = []
    for i, t in enumerate(ids):
        last = finish_at_end and i == len(ids) - 1
        delta = state.update(EngineOutput(request_id="r", token_ids=[t],
                                          finish_reason="length" if last else None))
        deltas.append(delta.text)
        if state.out.finished:
            break
    return deltas, state


def test_stop_string_is_held_back_until_it_cannot_match(tok):
    deltas, state = feed(tok, "the cache is hot and the cache is cold", ["is cold"])
    assert state.out.text == "the cache is hot and the cache "
    assert state.out.finish_reason == "stop" and state.out.stop_reason == "is cold"
    assert state.stopped_by_text
    assert "".join(deltas) == state.out.text
    shown = ""
    for d in deltas:  # nothing shown may later turn out to belong to the stop string
        shown += d
        assert state.out.text.startswith(shown)


def test_unmatched_prefix_is_released_at_finish(tok):
    deltas, state = feed(tok, "the cache is", ["is cold"])
    assert state.out.text == "the cache is" and "".join(deltas) == "the cache is"
    assert state.out.finish_reason == "length"


def test_stop_string_spanning_tokens_with_include(tok):
    _, state = feed(tok, "abc 你好世界 xyz", ["好世"], include=True)
    assert state.out.text == "abc 你好世"


def test_vocab_size_is_read_once_not_per_request(model_dir):
    """The front-end checks every prompt's ids against the vocabulary; `tokenizers` rebuilds the
    vocabulary (~7 ms at 128k entries) each time it is asked for its size."""
    tok = Tokenizer(model_dir("llama"))
    calls = []
    real = tok.hf

    class Counting:
        def get_vocab_size(self, *args, **kwargs):
            calls.append(1)
            return real.get_vocab_size(*args, **kwargs)

    tok.hf = Counting()
    sizes = {tok.vocab_size for _ in range(5)}
    assert sizes == {real.get_vocab_size()} and len(calls) == 1
