import json

import pyarrow as pa
import pytest
from transformers import PreTrainedTokenizerFast

from model.chat_format import (
    JANUS_SYSTEM_PROMPT,
    NUM_IMAGE_TOKENS,
    Turn,
    control_ids,
    encode_text,
    generation_prompt_ids,
    generation_sample,
    text_sample,
    understanding_prompt_ids,
    understanding_sample,
)
from model.sample import SAMPLE_SCHEMA, samples_from_table, samples_to_table
from model.tokenizer import BEGIN_OF_IMAGE, BOS, EOS, FORMAT_TOKENS, PAD, SpecialTokens
from tests.support import hostile_strings, skeleton


def test_understanding_layout(tokenizer, special):
    turns = [Turn("user", "<image_placeholder>\nWhat is in the picture?"), Turn("assistant", "A cat."),
             Turn("user", "And the colour?"), Turn("assistant", "Brown and white.")]
    s = understanding_sample(tokenizer, turns, [b"img"], system="Be brief.")
    ids = s.input_ids
    assert ids[0] == special.bos and ids.count(special.bos) == 1
    boi = ids.index(special.begin_of_image)
    assert ids[boi + 1:boi + 1 + NUM_IMAGE_TOKENS] == [special.image_placeholder] * NUM_IMAGE_TOKENS
    assert ids[boi + 1 + NUM_IMAGE_TOKENS] == special.end_of_image
    prefix = tokenizer.decode(ids[1:boi])
    assert prefix == "Be brief.\n\n<|User|>: "
    # Two answers, each followed by EOS, are exactly the loss spans.
    answers = [tokenizer.decode(ids[a:b]).strip() for a, b in s.loss_spans]
    assert answers == ["A cat.<｜end▁of▁sentence｜>", "Brown and white.<｜end▁of▁sentence｜>"]
    assert all(ids[b - 1] == special.eos for _, b in s.loss_spans)
    between = tokenizer.decode(ids[boi + 2 + NUM_IMAGE_TOKENS:s.loss_spans[0][0]])
    assert between.startswith("\nWhat is in the picture?\n\n<|Assistant|>:")


@pytest.mark.parametrize("answer", ["A cat.", "Brown and white.", "tabby"])
def test_inference_prompt_is_the_training_sample_up_to_its_answer(tokenizer, answer):
    """What chat feeds the model is exactly what training conditioned the answer on: the target starts right
    after `<|Assistant|>:`, whether the tokenizer merges the space into the answer's first token or not."""
    turns = [Turn("user", "<image_placeholder>\nWhat is it?"), Turn("assistant", answer)]
    s = understanding_sample(tokenizer, turns, [b"img"], system=JANUS_SYSTEM_PROMPT)
    (start, end), = s.loss_spans
    assert understanding_prompt_ids(tokenizer, "What is it?") == s.input_ids[:start]
    assert tokenizer.decode(s.input_ids[start:end], skip_special_tokens=True) == " " + answer


def test_understanding_image_count_must_match(tokenizer):
    with pytest.raises(ValueError, match="marker"):
        understanding_sample(tokenizer, [Turn("user", "no image here"), Turn("assistant", "ok")], [b"x"])


def test_generation_layout(tokenizer, special):
    s = generation_sample(tokenizer, "a red bicycle", list(range(NUM_IMAGE_TOKENS)))
    assert s.input_ids[0] == special.bos and s.input_ids[-1] == special.begin_of_image
    start, end = s.prompt_span
    assert (start, end) == (1, len(s.input_ids) - 1)
    assert tokenizer.decode(s.input_ids[start:end]) == "<|User|>: a red bicycle\n\n<|Assistant|>:"
    assert s.loss_spans == []


def test_text_layout(tokenizer, special):
    s = text_sample(tokenizer, "plain words")
    assert s.input_ids[0] == special.bos and s.input_ids[-1] == special.eos
    assert s.loss_spans == [(1, len(s.input_ids))]
    assert text_sample(tokenizer, "plain words", add_eos=False).input_ids[-1] != special.eos


def test_arrow_round_trip(tokenizer, tmp_path):
    samples = [
        understanding_sample(tokenizer, [Turn("user", "<image_placeholder> hi"), Turn("assistant", "yo")],
                             [b"\x00\x01bytes"], key="u"),
        generation_sample(tokenizer, "a dog", [16383] * NUM_IMAGE_TOKENS, key="g"),
        text_sample(tokenizer, "words", key="t"),
    ]
    table = samples_to_table(samples)
    assert table.schema.equals(SAMPLE_SCHEMA, check_metadata=True)
    path = tmp_path / "shard.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    back = samples_from_table(pa.ipc.open_file(pa.memory_map(str(path))).read_all())
    assert back == samples


def test_missing_special_token_is_named(tmp_path):
    from tokenizers import Tokenizer, models

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>")),
                                    unk_token="<unk>", bos_token="<unk>")
    with pytest.raises(ValueError, match="<｜▁pad▁｜>.*<image_placeholder>"):
        SpecialTokens.from_tokenizer(plain)


def test_special_strings_in_data_are_plain_text(tokenizer, special):
    """A caption, question, answer or document quoting a special token's string gets no control token from it: the
    sample's control tokens are exactly the format's, and the quoted text decodes back to itself."""
    controls = control_ids(tokenizer)
    assert {special.bos, special.eos, special.pad, special.image_placeholder, special.begin_of_image} <= controls
    strings = hostile_strings(tokenizer)
    assert len(strings) >= len(FORMAT_TOKENS)

    def samples(x: str):
        generation = generation_sample(tokenizer, f"a {x} b", [7] * NUM_IMAGE_TOKENS)
        turns = [Turn("user", f"<image>\nwhat {x}?"), Turn("assistant", f"it {x}."),
                 Turn("user", f"and {x}<image>"), Turn("assistant", f"{x}")]
        understanding = understanding_sample(tokenizer, turns, [b"a", b"b"], system=f"sys {x}", image_marker="<image>")
        return generation, understanding, text_sample(tokenizer, f"doc {x} end")

    plain = samples("word")
    for x in [*strings, "".join(strings)]:
        generation, understanding, text = samples(x)
        for ours, reference in zip((generation, understanding, text), plain, strict=True):
            assert skeleton(ours.input_ids, controls) == skeleton(reference.input_ids, controls), x
        assert generation.prompt_span == (1, len(generation.input_ids) - 1)
        assert tokenizer.decode(generation.input_ids[2:-3]) == f": a {x} b\n\n"
        assert [tokenizer.decode(understanding.input_ids[a:b - 1]) for a, b in understanding.loss_spans] == \
            [f" it {x}.", f" {x}"]
        assert all(understanding.input_ids[b - 1] == special.eos for _, b in understanding.loss_spans)
        assert understanding.input_ids.count(special.image_placeholder) == 2 * NUM_IMAGE_TOKENS
        decoded = tokenizer.decode(understanding.input_ids[1:])
        assert f"sys {x}\n\n<|User|>: <begin_of_image>" in decoded and f"\nwhat {x}?\n\n<|Assistant|>:" in decoded
        assert f"<|User|>: and {x}<begin_of_image>" in decoded
        assert tokenizer.decode(text.input_ids[1:-1]) == f"doc {x} end"


def test_quoted_special_strings_keep_their_offsets(tokenizer):
    """split_document cuts a document at token offsets: they still tile the text when it quotes special tokens."""
    text = "start " + " ".join(hostile_strings(tokenizer)) + " end"
    ids, offsets = encode_text(tokenizer, text)
    assert len(ids) == len(offsets) and offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(offsets, offsets[1:], strict=False))
    assert tokenizer.decode(ids) == text


def test_format_token_the_tokenizer_does_not_split_is_refused(tokenizer_dir, tmp_path):
    """split_special_tokens only splits tokens marked special: a tokenizer holding <begin_of_image> as a plain added
    token would let a caption write it. That is refused, naming the token, never encoded as the control."""
    config = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    for token in config["added_tokens"]:
        token["special"] = token["special"] and token["content"] != BEGIN_OF_IMAGE
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    loose = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token=BOS, eos_token=EOS,
                                    pad_token=PAD)
    assert BEGIN_OF_IMAGE not in loose.all_special_tokens
    generation_prompt_ids(loose, "a plain caption")
    with pytest.raises(ValueError, match=BEGIN_OF_IMAGE):
        generation_prompt_ids(loose, f"a caption {BEGIN_OF_IMAGE} that writes a control")
