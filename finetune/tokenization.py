"""T5 tokenizer loading through ``transformers`` (SentencePiece vocabulary).

Pitfall pinned by a test: in transformers 5.x, ``T5Tokenizer(vocab_file=...)`` silently ignores
the file and maps every word to <unk>. Always go through ``from_pretrained(<directory>)``; for a
bare ``spiece.model`` path this module passes its directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["load_tokenizer", "check_vocab", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the model."""


def load_tokenizer(path_or_name: str | os.PathLike):
    """A ``transformers.T5TokenizerFast``.

    Args:
        path_or_name: a directory holding ``spiece.model`` and/or ``tokenizer.json``, a path to a
            ``spiece.model`` file (its directory is used), or a hub name (needs a network).

    Returns:
        ``transformers.T5TokenizerFast``.

    Raises:
        TokenizerError: the path holds no tokenizer files or an unparsable spiece.model, or
            the hub name cannot be fetched.
    """
    from transformers import T5TokenizerFast

    path = Path(path_or_name).expanduser()
    if path.is_file():
        if path.suffix != ".model":
            raise TokenizerError(
                f"{path} is not a SentencePiece .model file; pass a directory holding "
                "spiece.model or tokenizer.json, or the spiece.model path"
            )
        if path.name != "spiece.model":
            raise TokenizerError(
                f"{path}: transformers looks for the vocabulary under the name spiece.model; "
                "rename or copy it to spiece.model in its own directory"
            )
        path = path.parent
    if path.is_dir():
        files = ("spiece.model", "tokenizer.json")
        if not any((path / f).is_file() for f in files):
            raise TokenizerError(
                f"{path} holds neither spiece.model nor tokenizer.json; pass the tokenizer "
                "directory of a T5 checkpoint"
            )
        if not (path / "tokenizer.json").is_file():
            _check_sentencepiece(path / "spiece.model")
        return T5TokenizerFast.from_pretrained(str(path))
    name = str(path_or_name)
    if name.startswith((".", "/", "~")):
        raise TokenizerError(f"tokenizer path {name} does not exist")
    try:
        return T5TokenizerFast.from_pretrained(name)
    except Exception as err:  # offline or unknown repo
        raise TokenizerError(
            f"tokenizer {name!r} is not a local path and could not be fetched from the hub "
            f"({type(err).__name__}: {err}); pass a local directory holding spiece.model"
        ) from err


def _check_sentencepiece(path: Path) -> None:
    """Raise unless `path` parses as a SentencePiece model.

    transformers falls back to other formats on an unparsable spiece.model, logs a line and ends
    advising to install tiktoken; sentencepiece itself names the problem.
    """
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise TokenizerError(
            f"{path}: not a SentencePiece model ({' '.join(str(err).split())}); pass the "
            "spiece.model of a T5 checkpoint (or the directory holding it)"
        ) from err


def check_vocab(tokenizer, config) -> None:
    """Raise unless every token id of ``tokenizer`` indexes the model's embedding.

    Args:
        tokenizer: a transformers tokenizer.
        config: the model's ``T5Config``, or its vocab_size (rows of the embedding).

    Raises:
        TokenizerError: ``len(tokenizer) > config.vocab_size``.
    """
    n = len(tokenizer)
    vocab_size = config if isinstance(config, int) else config.vocab_size
    if n > vocab_size:
        raise TokenizerError(
            f"tokenizer has {n} tokens but the model's embedding has vocab_size="
            f"{vocab_size}; use the tokenizer that belongs to this checkpoint"
        )
