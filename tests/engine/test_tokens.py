"""Special-token layout, prompt ids and training examples (docs/reproduction.md §2)."""

import random

import pytest
import torch

from reg2rg.engine.tokens import (IGNORE_INDEX, PROMPT_INSTRUCTION, SpecialIds, TokenizerError,
                                  add_special_tokens, build_example, build_prompt_ids, encode_text,
                                  load_tokenizer, special_token_strings, train_tokenizer)

WORDS = ("the lung is clear no nodule heart normal size pleural effusion absent trachea and bronchie patent "
         "bone lesion mediastinum lymph node thyroid esophagus breast abdomen liver region global information "
         "provided context given scan report each area").split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(n)] + [PROMPT_INSTRUCTION]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(), 400, out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_published_layout_for_llama_vocab():
    s = SpecialIds(32000, 32, 10)
    assert (s.image_start, s.image_end, s.region_start, s.region_end) == (32000, 32001, 32002, 32003)
    assert s.image_tokens() == list(range(32004, 32036))
    assert s.region_tokens(0) == list(range(32036, 32069))
    assert s.region_tokens(9)[-1] == 32365 and s.end == 32366
    # slot j token k -> 32036 + 33 j + k
    assert s.region_tokens(3)[5] == 32036 + 33 * 3 + 5
    strings = special_token_strings(32, 10)
    assert strings[:4] == ["<image>", "</image>", "<region>", "</region>"]
    assert strings[4] == "<image0>" and strings[35] == "<image31>"
    assert strings[36] == "<region0>" and strings[-1] == "<region329>" and len(strings) == 366


def test_add_special_tokens_small_vocab(tokenizer):
    V = len(tokenizer)
    s = add_special_tokens(tokenizer, num_latents=4, num_regions=10)
    assert s.vocab_size == V
    assert tokenizer.convert_tokens_to_ids("<image>") == V
    assert tokenizer.convert_tokens_to_ids("</region>") == V + 3
    assert tokenizer.convert_tokens_to_ids("<image3>") == V + 7
    # slot 2, token 4 (the mask token of slot 2) = V + 4 + 4 + 5*2 + 4
    assert tokenizer.convert_tokens_to_ids("<region14>") == V + 8 + 14 == s.region_tokens(2)[4]
    assert len(tokenizer) == s.end
    # idempotent
    assert add_special_tokens(tokenizer, 4, 10) == s and len(tokenizer) == s.end
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    with pytest.raises(TokenizerError):
        add_special_tokens(tokenizer, 5, 10)   # saved layout differs from the requested one


def test_prompt_ids_built_from_ids(tokenizer):
    s = add_special_tokens(tokenizer, 4, 10)
    ids = build_prompt_ids(tokenizer, 3, s)
    assert ids[0] == 1
    # the image block and each region block appear verbatim, in order
    img = [s.image_start, *s.image_tokens(), s.image_end]
    pos = next(i for i in range(len(ids)) if ids[i:i + len(img)] == img)
    for j in range(3):
        blk = [s.region_start, *s.region_tokens(j), s.region_end]
        nxt = next(i for i in range(len(ids)) if ids[i:i + len(blk)] == blk)
        assert nxt > pos
        pos = nxt
    assert s.region_tokens(3)[0] not in ids
    assert sum(1 for i in ids if i >= s.vocab_size) == 6 + 3 * 7
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "The region 2 is" in text and text.rstrip().endswith("each region report.")


def test_example_labels_and_literal_special_text(tokenizer):
    s = add_special_tokens(tokenizer, 4, 10)
    reports = [("lung", "clear <image0> lung."), ("heart", "normal <region5> heart.")]
    ex = build_example(tokenizer, reports, max_length=600, special=s)
    ids, labels, mask = ex["input_ids"], ex["labels"], ex["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (600,)
    prompt = build_prompt_ids(tokenizer, 2, s)
    n = int(mask.sum())
    # the literal "<image0>" / "<region5>" of the reports stayed text: only the prompt's special ids
    assert int((ids >= s.vocab_size).sum()) == sum(1 for i in prompt if i >= s.vocab_size)
    assert ids[n - 1] == 2 and labels[n - 1] == 2                     # eos, supervised
    assert (labels[:len(prompt)] == IGNORE_INDEX).all()
    assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == 0).all()
    target = ids[len(prompt):n - 1]
    assert (labels[len(prompt):n - 1] == target).all()
    decoded = tokenizer.decode(target)
    assert "The region 0 is lung: clear <image0> lung." in decoded
    assert "The region 1 is heart: normal <region5> heart." in decoded
    assert torch.equal(ids[:len(prompt)], torch.tensor(prompt))


def test_eos_fits_at_max_length(tokenizer):
    s = add_special_tokens(tokenizer, 4, 10)
    long_report = " ".join(["the lung is clear"] * 200)
    n_prompt = len(build_prompt_ids(tokenizer, 1, s))
    ex = build_example(tokenizer, [("lung", long_report)], max_length=n_prompt + 20, special=s)
    assert ex["input_ids"].shape == (n_prompt + 20,)
    assert ex["input_ids"][-1] == 2 and ex["labels"][-1] == 2 and ex["attention_mask"].all()
    with pytest.raises(ValueError, match="prompt alone"):
        build_example(tokenizer, [("lung", "x")], max_length=n_prompt - 5, special=s)


def test_encode_text_never_matches_special(tokenizer):
    add_special_tokens(tokenizer, 4, 10)
    V = tokenizer.convert_tokens_to_ids("<image>")
    ids = encode_text(tokenizer, "a <image> b </region> <image0>")
    assert all(i < V for i in ids)
