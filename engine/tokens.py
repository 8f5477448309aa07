"""Reg2RG's special tokens, prompt and training text (docs/reproduction.md §2), built from ids directly.

The reference expanded ``<image0>…`` placeholders by string replacement and re-tokenized the result,
so a report that happens to contain the text ``<image0>`` turned into a visual slot. Here the prompt
is assembled from token ids and every piece of free text is encoded with special-token matching
switched off, so report text always stays text.

Token layout for a text vocabulary of size V, L latents and R region slots::

    V <image>   V+1 </image>   V+2 <region>   V+3 </region>
    V+4 … V+4+L-1              <image0> … <image{L-1}>           (global image tokens)
    V+4+L+(L+1)j+k             <region{(L+1)j+k}>                (slot j, token k; k = L is the mask token)

For LLaMA (V=32000, L=32, R=10): <image0>=32004, <region0>=32036, last=32365.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

IMAGE_START, IMAGE_END = "<image>", "</image>"
REGION_START, REGION_END = "<region>", "</region>"

# The published prompt words (compatibility constants: the published weights were trained on them).
PROMPT_GLOBAL = "The global information is provided as the context: "
PROMPT_REGION = "The region {index} is "
PROMPT_SEPARATOR = ". "          # follows every </image> and </region>
PROMPT_INSTRUCTION = (
    "Given the provided global and regional information from this CT scan, please generate a "
    "comprehensive medical report for each region. First, identify the anatomical area corresponding "
    "to each region, then provide detailed information about these anatomical structures and any "
    "abnormalities that are essential. You can refer to the global information as the context and take "
    "it as a supplement when generating each region report."
)
TARGET_REGION = "The region {index} is {area}: {report} "

IGNORE_INDEX = -100
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class TokenizerError(ValueError):
    """The tokenizer does not have the layout Reg2RG needs (wrong ids, missing tokens)."""


@dataclass(frozen=True)
class SpecialIds:
    """Ids of Reg2RG's special tokens for a text vocabulary of ``vocab_size`` (V)."""

    vocab_size: int
    num_latents: int = 32
    num_regions: int = 10

    @property
    def image_start(self) -> int:
        return self.vocab_size

    @property
    def image_end(self) -> int:
        return self.vocab_size + 1

    @property
    def region_start(self) -> int:
        return self.vocab_size + 2

    @property
    def region_end(self) -> int:
        return self.vocab_size + 3

    @property
    def first_image_token(self) -> int:
        return self.vocab_size + 4

    @property
    def first_region_token(self) -> int:
        return self.vocab_size + 4 + self.num_latents

    @property
    def tokens_per_region(self) -> int:
        return self.num_latents + 1

    @property
    def end(self) -> int:
        """One past the last special id (= V + rows of the per-sample visual table)."""
        return self.first_region_token + self.num_regions * self.tokens_per_region

    def image_tokens(self) -> list[int]:
        return list(range(self.first_image_token, self.first_image_token + self.num_latents))

    def region_tokens(self, slot: int) -> list[int]:
        if not 0 <= slot < self.num_regions:
            raise IndexError(f"region slot {slot} is outside 0..{self.num_regions - 1}")
        start = self.first_region_token + slot * self.tokens_per_region
        return list(range(start, start + self.tokens_per_region))

    @classmethod
    def from_config(cls, config) -> "SpecialIds":
        if config.vocab_size is None:
            raise TokenizerError("the model config has no vocab_size yet; build the model from a tokenizer")
        return cls(config.vocab_size, config.num_latents, config.num_regions)


def special_token_strings(num_latents: int = 32, num_regions: int = 10) -> list[str]:
    """The special tokens in the published order (which fixes their ids)."""
    tokens = [IMAGE_START, IMAGE_END, REGION_START, REGION_END]
    tokens += [f"<image{k}>" for k in range(num_latents)]
    tokens += [f"<region{i}>" for i in range((num_latents + 1) * num_regions)]
    return tokens


def add_special_tokens(tokenizer, num_latents: int = 32, num_regions: int = 10) -> SpecialIds:
    """Add Reg2RG's special tokens after the text vocabulary (idempotent) and return their ids.

    Also sets pad/bos/eos ids to 0/1/2 as the reference does. A tokenizer that already has the tokens
    (e.g. one saved with a checkpoint) is checked, not changed.
    """
    from tokenizers import AddedToken

    strings = special_token_strings(num_latents, num_regions)
    vocab = tokenizer.get_vocab()
    if IMAGE_START in vocab:
        special = SpecialIds(vocab[IMAGE_START], num_latents, num_regions)
    else:
        special = SpecialIds(len(tokenizer), num_latents, num_regions)
        # Plain AddedTokens (no strip): free text never reaches them because we encode text with
        # special-token matching off; they exist so decoding and saving know their names.
        tokenizer.add_tokens([AddedToken(s, special=True, normalized=False) for s in strings],
                             special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(strings)
    expected = list(range(special.vocab_size, special.end))
    if ids != expected:
        bad = next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
        raise TokenizerError(f"special token {strings[bad]!r} has id {ids[bad]}, expected {expected[bad]} "
                             f"(the tokenizer's special tokens are not in the Reg2RG layout)")
    tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    return special


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of free text, never matching special tokens (``"<image0>"`` stays text)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _prompt_pieces(num_slots: int, special: SpecialIds) -> list[str | list[int]]:
    """The prompt as alternating text (str) and special-id runs (list[int])."""
    if not 0 <= num_slots <= special.num_regions:
        raise ValueError(f"num_slots must be in 0..{special.num_regions}, got {num_slots}")
    pieces: list[str | list[int]] = [PROMPT_GLOBAL, [special.image_start, *special.image_tokens(), special.image_end]]
    for j in range(num_slots):
        pieces.append(PROMPT_SEPARATOR + PROMPT_REGION.format(index=j))
        pieces.append([special.region_start, *special.region_tokens(j), special.region_end])
    pieces.append(PROMPT_SEPARATOR + PROMPT_INSTRUCTION)
    return pieces


def prompt_text(num_slots: int, special: SpecialIds) -> str:
    """The prompt as one string (for display/logging; never re-tokenized by this engine)."""
    names = {special.image_start: IMAGE_START, special.image_end: IMAGE_END,
             special.region_start: REGION_START, special.region_end: REGION_END}
    strings = special_token_strings(special.num_latents, special.num_regions)
    out = []
    for piece in _prompt_pieces(num_slots, special):
        if isinstance(piece, str):
            out.append(piece)
        else:
            out.append("".join(names.get(i, strings[i - special.vocab_size]) for i in piece))
    return "".join(out)


def _encode_pieces(tokenizer, pieces: Sequence[str | list[int]], add_bos: bool) -> list[int]:
    ids: list[int] = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else BOS_ID] if add_bos else []
    for piece in pieces:
        ids.extend(encode_text(tokenizer, piece) if isinstance(piece, str) else piece)
    return ids


def build_prompt_ids(tokenizer, num_slots: int, special: SpecialIds, add_bos: bool = True) -> list[int]:
    """Prompt ids for ``num_slots`` region slots: bos, global image block, one sentence per slot,
    the instruction. Text pieces between special runs are encoded separately, as the reference's
    tokenizer did when it split the string at its added tokens."""
    return _encode_pieces(tokenizer, _prompt_pieces(num_slots, special), add_bos)


def target_text(region_reports: Sequence[tuple[str, str]]) -> str:
    """``The region {i} is {area}: {report} `` for each slot i, concatenated (the training target)."""
    return "".join(TARGET_REGION.format(index=i, area=area, report=report)
                   for i, (area, report) in enumerate(region_reports))


def build_example(tokenizer, region_reports: Sequence[tuple[str, str]], max_length: int = 2048,
                  special: SpecialIds | None = None, pad: bool = True) -> dict[str, torch.Tensor]:
    """One training example: prompt + ' ' + target + eos, with labels for the target only.

    ``region_reports`` is (area, report) in slot order (slot i gets the i-th pair). Labels are -100
    on the prompt, on padding, on pad-id tokens and on every id >= V. When the text is longer than
    ``max_length`` it is cut so that eos still fits (the reference wrote eos out of range there).
    With ``pad`` the tensors are right-padded with the pad id to ``max_length``.
    """
    if special is None:
        special = add_special_tokens(tokenizer)
    pieces = _prompt_pieces(len(region_reports), special)
    prompt_ids = _encode_pieces(tokenizer, pieces, add_bos=True)
    # The last text piece and the target form one string in the reference, so encode them together.
    full_pieces = list(pieces[:-1]) + [pieces[-1] + " " + target_text(region_reports)]
    ids = _encode_pieces(tokenizer, full_pieces, add_bos=True)
    prompt_length = len(prompt_ids)
    if prompt_length >= max_length:
        raise ValueError(f"the prompt alone is {prompt_length} tokens, max_length is {max_length}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID
    ids = ids[: max_length - 1] + [eos]

    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[:prompt_length] = IGNORE_INDEX
    labels[input_ids >= special.vocab_size] = IGNORE_INDEX
    labels[input_ids == pad_id] = IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)
    if pad and len(ids) < max_length:
        n = max_length - len(ids)
        input_ids = torch.cat([input_ids, torch.full((n,), pad_id, dtype=torch.long)])
        labels = torch.cat([labels, torch.full((n,), IGNORE_INDEX, dtype=torch.long)])
        attention_mask = torch.cat([attention_mask, torch.zeros(n, dtype=torch.long)])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None):
    """Train a small LLaMA-like BPE tokenizer (``<unk>``=0 doubling as pad, ``<s>``=1, ``</s>``=2,
    SentencePiece-style ``▁`` word boundaries, bos prepended) and wrap it as a HF fast tokenizer.

    Used by tests and by the demo model, whose tiny LLM is trained from scratch. Saved to ``out_dir``
    when given. The Reg2RG special tokens are not added here: call `add_special_tokens`.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [c for c in string.printable if not c.isspace()] + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(list(texts), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    tokenizer.padding_side = "right"
    if out_dir is not None:
        from .fileio import atomic_folder

        with atomic_folder(out_dir) as tmp:
            tokenizer.save_pretrained(tmp)
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer folder offline (``local_files_only``)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: tokenizer folder not found")
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer.model")):
        raise TokenizerError(f"{path}: the tokenizer folder has no tokenizer.json (nor a SentencePiece "
                             "tokenizer.model); copy the complete tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a damaged folder
        first = (str(err).strip().splitlines() or [""])[0]
        raise TokenizerError(f"{path}: the tokenizer cannot be read ({type(err).__name__}: {first})") from err
