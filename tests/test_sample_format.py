import pyarrow as pa
import pytest
from transformers import PreTrainedTokenizerFast

from model.chat_format import (
    JANUS_SYSTEM_PROMPT,
    NUM_IMAGE_TOKENS,
    Turn,
    generation_sample,
    text_sample,
    understanding_prompt_ids,
    understanding_sample,
)
from model.sample import SAMPLE_SCHEMA, samples_from_table, samples_to_table
from model.tokenizer import SpecialTokens


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
