"""A word-level tokenizer for the zoo, built with ``tokenizers`` and saved for ``AutoTokenizer``.

Words split on spaces (the space is kept as a leading ``▁``, so decoding restores the text);
every digit is its own token and a number starts with a lone ``▁``: ``" 47"`` -> ``▁ 4 7``. Encoding
prepends ``<bos>``; ``<eos>`` ends documents and answers, ``<pad>`` pads batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from splice.zoo.world import PUNCT, World

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
SPACE = "▁"


def vocabulary(world: World) -> list[str]:
    """Token strings in id order: specials, the lone space, digits, punctuation, words."""
    words = [SPACE + w for w in [*PUNCT, *world.words()]]
    return [*SPECIALS, SPACE, *"0123456789", *words]


def make_tokenizer(world: World) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` for ``world`` (WordLevel, unknown words -> ``<unk>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(vocabulary(world))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex("[0-9]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def save_tokenizer(world: World, folder: str | os.PathLike[str]) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` so ``AutoTokenizer`` loads offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(world).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "padding_side": "right",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
