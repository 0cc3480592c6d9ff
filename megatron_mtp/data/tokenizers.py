"""Tokenizers for pretraining data: byte-level (needs no file) and a HuggingFace ``tokenizer.json``.

Both subclass Megatron-Core's ``MegatronTokenizerBase`` (the type of ``GPTDatasetConfig.tokenizer``) and
provide what core's dataset code reads from a tokenizer:

- ``vocab_size``: ``GPTDatasetConfig`` picks the on-disk token dtype from it;
- ``eod``: the end-of-document id, appended after every document by the preprocessor;
- ``pad``: ``MegatronDataset`` masks labels equal to it out of the loss. Without a pad token it is
  ``NO_PAD_ID`` (-1), the value core itself falls back to, which no real token id can equal;
- ``unique_identifiers``: a JSON-able dict that core hashes into the file names of its cached sample indices.
"""

import hashlib
import os
from abc import abstractmethod
from collections import OrderedDict
from typing import Dict, List, Optional

from megatron.core.tokenizers import MegatronTokenizerBase

TOKENIZER_TYPES = ("ByteLevel", "HuggingFaceTokenizer")  # Megatron-LM's name for the second
NO_PAD_ID = -1
DEFAULT_EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>")
DEFAULT_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")


class PretrainingTokenizer(MegatronTokenizerBase):
    """Base of both tokenizers: plain-text pretraining only (no chat template), a cache-key `name`."""

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is for plain-text pretraining and has no chat template")

    @property
    @abstractmethod
    def name(self) -> str:
        """Short file-name-safe identity, used to key caches of data tokenized with this tokenizer."""

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        return OrderedDict([("class", type(self).__name__), ("name", self.name), ("eod", str(self.eod))])


class ByteTokenizer(PretrainingTokenizer):
    """UTF-8 bytes: ids 0..255 are the bytes themselves, 256 is end-of-document; ``vocab_size`` = 257."""

    EOD_ID = 256
    VOCAB_SIZE = 257

    def __init__(self) -> None:
        super().__init__(path=None, config={})

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: List[int]) -> str:
        """Inverse of ``tokenize``; the eod id is dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if int(i) != self.EOD_ID).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> Dict[str, int]:
        vocab = {f"<0x{i:02X}>": i for i in range(256)}
        vocab["<|endoftext|>"] = self.EOD_ID
        return vocab

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    @property
    def eod(self) -> int:
        return self.EOD_ID

    @property
    def pad(self) -> int:
        return NO_PAD_ID

    @property
    def name(self) -> str:
        return "bytelevel"


class HuggingFaceTokenizer(PretrainingTokenizer):
    """A ``tokenizers`` library ``tokenizer.json``, encoded without the post-processor's special tokens.

    Args:
        path_to_tokenizer_json: the file written by ``tokenizers.Tokenizer.save``.
        eod_token: the token that ends a document; by default the first of ``DEFAULT_EOD_TOKENS`` present.
            The pad id is the first of ``DEFAULT_PAD_TOKENS`` present, else ``NO_PAD_ID``.
    """

    def __init__(self, path_to_tokenizer_json: str, eod_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer

        super().__init__(path=path_to_tokenizer_json, config={})
        try:
            self._tokenizer = Tokenizer.from_file(path_to_tokenizer_json)
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"cannot load tokenizer file {path_to_tokenizer_json}: {error}") from error
        eod_candidates = DEFAULT_EOD_TOKENS if eod_token is None else (eod_token,)
        self._eod = self._first_token_id(eod_candidates)
        if self._eod is None:
            raise ValueError(
                f"tokenizer file {path_to_tokenizer_json} has no end-of-document token "
                f"{' / '.join(map(repr, eod_candidates))}; name the token it uses (eod_token= / --eod-token)"
            )
        pad = self._first_token_id(DEFAULT_PAD_TOKENS)
        self._pad = NO_PAD_ID if pad is None else pad
        with open(path_to_tokenizer_json, "rb") as f:
            digest = hashlib.sha256(f.read() + f"\0{self._eod}".encode()).hexdigest()[:12]
        stem = os.path.basename(path_to_tokenizer_json).rsplit(".", 1)[0]
        self._name = f"hf-{stem}-{digest}"

    def _first_token_id(self, tokens) -> Optional[int]:
        for token in tokens:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: List[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def name(self) -> str:
        return self._name


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: Optional[str] = None, eod_token: Optional[str] = None
) -> PretrainingTokenizer:
    """The tokenizer named by ``--tokenizer-type`` (``ByteLevel`` or ``HuggingFaceTokenizer``) and ``--tokenizer-model``.

    Raises:
        ValueError: unknown type, a model file or eod token given to ``ByteLevel``, a missing/unreadable model
            file, or a ``tokenizer.json`` without the end-of-document token.
    """
    if tokenizer_type == "ByteLevel":
        if tokenizer_model is not None or eod_token is not None:
            raise ValueError(
                "--tokenizer-type ByteLevel takes no --tokenizer-model or --eod-token (its eod is id 256), got "
                f"{tokenizer_model!r}, {eod_token!r}"
            )
        return ByteTokenizer()
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH/TO/tokenizer.json")
        if not os.path.isfile(tokenizer_model):
            raise ValueError(f"--tokenizer-model {tokenizer_model}: no such file")
        try:
            return HuggingFaceTokenizer(tokenizer_model, eod_token=eod_token)
        except ValueError as error:
            raise ValueError(f"--tokenizer-model: {error}") from error
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
