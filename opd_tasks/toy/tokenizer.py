"""The toy world's tokenizer: one token per character, built offline with `tokenizers`.

    tok = build_tokenizer()               # transformers PreTrainedTokenizerFast, left padding
    tok.save_pretrained(DIR)              # AutoTokenizer.from_pretrained(DIR) gives the same ids

Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then ALPHABET in order. Encoding a text with special
tokens prepends <bos> (so every prompt has a first token to predict from); answers are encoded
without it and followed by <eos>. The vocabulary is fixed (not learned from data) so that every
world, whatever its seed or size, shares one tokenizer fingerprint.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+= "
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level WordLevel tokenizer with <pad>/<bos>/<eos>/<unk>, padding on the left."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character alone
    tk.decoder = decoders.Fuse()  # join tokens without spaces
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])])
    tk.add_special_tokens(list(SPECIALS))
    # padding_side must go to the constructor: transformers saves it only then.
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left")
