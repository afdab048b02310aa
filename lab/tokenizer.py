"""The character-level tokenizer of the built-in tiny policy.

It is a plain Hugging Face fast tokenizer (a ``tokenizers`` WordLevel model
whose pre-tokenizer splits every character apart), not a custom class, so that
``AutoTokenizer.from_pretrained(dir)`` and TRL load it natively with no
``trust_remote_code``. The vocabulary is printable ASCII plus newline: task
prompts use a small subset, but anything a verifier or a user sends still
tokenizes (other characters map to ``<unk>``).

Encoding a text prepends ``<bos>`` (the causal LM needs a start position);
generation stops at ``<eos>``; batches pad on the left, as generation wants.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARS = (*(chr(c) for c in range(32, 127)), "\n")
MODEL_MAX_LENGTH = 64


def char_vocab() -> dict[str, int]:
    return {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}


def build_char_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Without Fuse, decode() would join characters with spaces.
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=model_max_length,
    )


def save_char_tokenizer(path: Path, model_max_length: int = MODEL_MAX_LENGTH) -> None:
    build_char_tokenizer(model_max_length).save_pretrained(str(path))


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))
