"""Word-level tokenizer: the "word map" of Show, Attend and Tell, built with the `tokenizers` library."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
START_TOKEN = "<start>"
END_TOKEN = "<end>"
UNK_TOKEN = "<unk>"
# Their order gives the ids of a new word map: <pad> = 0 (what padding and the loss mask rely on).
SPECIAL_TOKENS = (PAD_TOKEN, START_TOKEN, END_TOKEN, UNK_TOKEN)

DEFAULT_MIN_FREQ = 5
DEFAULT_MAX_CAPTION_WORDS = 50


def _build_backend(vocab: Mapping[str, int]) -> Tokenizer:
    """A `tokenizers` pipeline: lower-case, punctuation to spaces, split on whitespace, word lookup."""
    tokenizer = Tokenizer(WordLevel(vocab=dict(vocab), unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            # Punctuation carries no caption word; "man's" becomes "man s" like "dog-shaped" becomes "dog shaped".
            normalizers.Replace(Regex(r"[^\w\s]|_"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START_TOKEN} $A {END_TOKEN}",
        special_tokens=[(START_TOKEN, vocab[START_TOKEN]), (END_TOKEN, vocab[END_TOKEN])],
    )
    return tokenizer


class ShowAttendTellTokenizer(PreTrainedTokenizerFast):
    """
    Word-level tokenizer for captions.

    Text is NFKC-normalised, lower-cased, stripped of punctuation and split on whitespace; each word is
    looked up in the word map (`<unk>` when absent). Encoding adds `<start>` and `<end>`; decoding with
    `skip_special_tokens=True` drops them and the padding.

    Build one with [`~ShowAttendTellTokenizer.train_from_captions`] (counts words in the *training*
    captions only) or [`~ShowAttendTellTokenizer.from_word_map`] (the classic `WORDMAP_*.json`), save it
    with `save_pretrained` (tokenizer.json), and load it with `AutoTokenizer.from_pretrained`.
    """

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], **kwargs) -> ShowAttendTellTokenizer:
        """A tokenizer over the given `{word: id}` map, which must contain the four special tokens."""
        missing = [token for token in SPECIAL_TOKENS if token not in vocab]
        if missing:
            raise ValueError(f"the word map lacks the special tokens {missing}")
        ids = sorted(vocab.values())
        if len(set(ids)) != len(ids):
            raise ValueError("the word map gives the same id to several words")
        if ids[0] != 0 or ids[-1] != len(ids) - 1:
            raise ValueError(
                f"word map ids must be 0..{len(ids) - 1} without gaps (found {ids[0]}..{ids[-1]})"
            )
        kwargs.setdefault("model_max_length", DEFAULT_MAX_CAPTION_WORDS + 2)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        return cls(
            tokenizer_object=_build_backend(vocab),
            pad_token=PAD_TOKEN,
            bos_token=START_TOKEN,
            eos_token=END_TOKEN,
            unk_token=UNK_TOKEN,
            **kwargs,
        )

    @classmethod
    def train_from_captions(
        cls,
        captions: Iterable[str],
        min_freq: int = DEFAULT_MIN_FREQ,
        max_vocab_size: int | None = None,
        **kwargs,
    ) -> ShowAttendTellTokenizer:
        """
        Builds the word map from `captions`: words seen at least `min_freq` times get an id (most frequent
        first), the others become `<unk>`. Pass the training split only: counting validation or test
        captions leaks them into the vocabulary.
        """
        counter = _build_backend(dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)), strict=True)))
        trainer = WordLevelTrainer(
            vocab_size=max_vocab_size if max_vocab_size is not None else 1 << 30,
            min_frequency=min_freq,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        counter.train_from_iterator(captions, trainer=trainer)
        return cls.from_vocab(counter.get_vocab(), **kwargs)

    @classmethod
    def from_word_map(
        cls, word_map: str | os.PathLike | Mapping[str, int], **kwargs
    ) -> ShowAttendTellTokenizer:
        """
        Imports a classic word map (`{"word": id, ..., "<unk>": .., "<start>": .., "<end>": .., "<pad>": 0}`)
        keeping its ids, so weights trained with it line up with this tokenizer.
        """
        if not isinstance(word_map, Mapping):
            path = os.fspath(word_map)
            try:
                with open(path, encoding="utf-8") as file:
                    word_map = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not a valid word-map JSON file: {error}") from error
        if not isinstance(word_map, Mapping) or not all(
            isinstance(word, str) and isinstance(index, int) and not isinstance(index, bool)
            for word, index in word_map.items()
        ):
            raise ValueError('a word map must be a JSON object of {"word": integer id}')
        return cls.from_vocab(word_map, **kwargs)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if skip_special_tokens:
            # A caption ends at its first <end>: generate() fills finished rows with <end> or <pad>
            # depending on the search. <unk> stays visible, as in the paper's implementation.
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            token_ids = list(token_ids)
            if token_ids and token_ids[0] == self.bos_token_id:
                token_ids = token_ids[1:]
            if self.eos_token_id in token_ids:
                token_ids = token_ids[: token_ids.index(self.eos_token_id)]
            hidden = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
            token_ids = [token for token in token_ids if token not in hidden]
        return super()._decode(token_ids, skip_special_tokens=False, **kwargs)

    def to_word_map(self) -> dict[str, int]:
        """The `{word: id}` map, in id order."""
        return dict(sorted(self.get_vocab().items(), key=lambda item: item[1]))

    def save_word_map(self, path: str | os.PathLike) -> str:
        """Writes the classic word-map JSON; returns its path."""
        with open(path, "w", encoding="utf-8") as file:
            json.dump(self.to_word_map(), file, ensure_ascii=False)
        return os.fspath(path)

    def normalize_caption(self, text: str) -> list[str]:
        """The words of `text` as the tokenizer sees them (lower-cased, without punctuation)."""
        backend = self.backend_tokenizer
        return [
            word for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
        ]


__all__ = ["SPECIAL_TOKENS", "ShowAttendTellTokenizer"]
