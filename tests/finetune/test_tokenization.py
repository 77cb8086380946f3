"""T5 tokenizer loading (finetune.tokenization)."""

import pytest

transformers = pytest.importorskip("transformers")

from finetune.tokenization import TokenizerError, check_vocab, load_tokenizer  # noqa: E402

POPE = "Pope Benedict XVI is the new leader."
POPE_IDS = [17384, 28808, 3, 4, 7765, 19, 8, 126, 2488, 5, 1]
TEXTS = [POPE, "premise: A man is playing a guitar. hypothesis: Nobody plays.", "  ÄÖ 123 <x>  "]


@pytest.fixture(scope="module")
def tok(t5_tokenizer_dir):
    return load_tokenizer(t5_tokenizer_dir)


def test_pope_sentence(tok):
    assert tok(POPE)["input_ids"] == POPE_IDS


def test_matches_sentencepiece_directly(tok, t5_tokenizer_dir):
    spm = pytest.importorskip("sentencepiece")
    proc = spm.SentencePieceProcessor(model_file=str(t5_tokenizer_dir / "spiece.model"))
    for text in TEXTS:
        assert tok(text)["input_ids"] == proc.encode(text) + [1], text


def test_spiece_model_path_equals_directory(tok, t5_tokenizer_dir):
    by_file = load_tokenizer(t5_tokenizer_dir / "spiece.model")
    for text in TEXTS:
        assert by_file(text)["input_ids"] == tok(text)["input_ids"]
    assert len(by_file) == len(tok)


def test_tokenizer_json_directory(tiny_t5_dir):
    tok = load_tokenizer(tiny_t5_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_t5_dir))
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref(text)["input_ids"]


def test_bad_paths(tmp_path):
    with pytest.raises(TokenizerError, match="neither spiece.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    other = tmp_path / "vocab.txt"
    other.write_text("x")
    with pytest.raises(TokenizerError, match="not a SentencePiece"):
        load_tokenizer(other)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_check_vocab(tok):
    check_vocab(tok, transformers.T5Config(vocab_size=32128))
    with pytest.raises(TokenizerError, match="vocab_size=1302"):
        check_vocab(tok, transformers.T5Config(vocab_size=1302))
