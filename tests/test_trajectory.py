"""Training sequences keep the sampled ids verbatim and mask exactly the assistant tokens."""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast

from r3l_lightning.trajectory import ChatTokenizer, Message, TemplateError, TrainingSample, make_sample

# A Qwen2-style ChatML template (default system prompt when none is given), written for this test.
QWEN_STYLE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Llama-3-style template (header tokens, <|eot_id|> end of turn, BOS in the template).
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained here, with Llama-3-style special tokens."""
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["you are a bot", "what is two plus two", "the answer is four", "try again please"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA_STYLE
    return fast


def _sampled(tokenizer, text: str, eos: bool = True) -> list[int]:
    """Ids as a sampler would return them: the response text, then the end-of-turn id."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if eos else [])


def _conversation(chat: ChatTokenizer, with_system: bool = True) -> list[Message]:
    tok = chat.tokenizer
    msgs = [Message("system", "You are a bot.")] if with_system else []
    msgs += [
        Message("user", "What is two plus two?"),
        chat.assistant_message(_sampled(tok, "The answer is four.")),
        Message("system", "Guidance: be brief.", guidance=True),
        Message("user", "Try again please."),
        chat.assistant_message(_sampled(tok, "four", eos=False)),  # truncated: no end-of-turn id
    ]
    return msgs


@pytest.fixture(params=["smollm2", "qwen_style", "llama_style"])
def chat(request, tiny_tokenizer):
    if request.param == "smollm2":
        return ChatTokenizer(tiny_tokenizer)
    if request.param == "qwen_style":
        tok = copy.deepcopy(tiny_tokenizer)
        tok.chat_template = QWEN_STYLE
        return ChatTokenizer(tok)
    return ChatTokenizer(_llama_style_tokenizer())


@pytest.mark.parametrize("with_system", [True, False])
def test_concatenated_ids_decode_to_the_template_text(chat, with_system):
    msgs = _conversation(chat, with_system)
    conv = chat.tokenize(msgs)
    text = chat.tokenizer.decode(conv.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert text == chat.render(msgs)


def test_sampled_ids_are_kept_verbatim_and_only_they_are_trainable(chat):
    msgs = _conversation(chat)
    conv = chat.tokenize(msgs)
    assistant = [m for m in msgs if m.role == "assistant"]
    assert len(conv.turn_spans) == 2
    for (start, end), m in zip(conv.turn_spans, assistant):
        assert conv.input_ids[start:end] == m.token_ids
    sample = make_sample(conv, advantage=1.5, kind="base")
    trainable = [t for t, v in enumerate(sample.loss_mask) if v]
    expected = [t for s, e in conv.turn_spans for t in range(s, e)]
    assert trainable == expected
    eos = chat.tokenizer.eos_token_id
    # the first turn's end-of-turn id is trained; nothing of system/user/guidance or headers is
    assert conv.input_ids[conv.turn_spans[0][1] - 1] == eos
    untrained = chat.tokenizer.decode([conv.input_ids[t] for t in range(len(conv.input_ids)) if not sample.loss_mask[t]])
    for text in ("You are a bot", "two plus two", "Guidance", "Try again"):
        assert text not in chat.tokenizer.decode([conv.input_ids[t] for t in trainable])
    assert "Guidance: be brief." in untrained
    assert sample.num_trainable_tokens == len(assistant[0].token_ids) + len(assistant[1].token_ids)
    assert sample.num_assistant_tokens == sample.num_trainable_tokens


def test_prompt_ids_are_the_prefix_the_sampler_continues(chat):
    msgs = _conversation(chat)
    conv = chat.tokenize(msgs)
    first_turn = msgs.index(next(m for m in msgs if m.role == "assistant"))
    prompt = chat.prompt_ids(msgs[:first_turn])
    assert prompt == conv.input_ids[: conv.turn_spans[0][0]]
    text = chat.tokenizer.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert text == chat.render(msgs[:first_turn], add_generation_prompt=True)


def test_pivot_masks_turns_before_it(tiny_chat):
    conv = tiny_chat.tokenize(_conversation(tiny_chat))
    sample = make_sample(conv, advantage=-0.5, kind="distill", first_trainable_turn=1)
    (s0, e0), (s1, e1) = conv.turn_spans
    assert all(v == 0 for v in sample.loss_mask[s0:e0])
    assert all(v == 1 for v in sample.loss_mask[s1:e1])
    assert sample.num_trainable_tokens == e1 - s1
    assert sample.num_assistant_tokens == (e0 - s0) + (e1 - s1)


def test_a_pivot_beyond_the_turns_or_a_short_mask_is_rejected(tiny_chat):
    conv = tiny_chat.tokenize(_conversation(tiny_chat))  # two assistant turns
    assert sum(make_sample(conv, 1.0, "distill", first_trainable_turn=2).loss_mask) == 0  # = K: nothing trainable
    for pivot in (-1, 3):
        with pytest.raises(ValueError, match=r"first_trainable_turn must be in \[0, 2\]"):
            make_sample(conv, 1.0, "distill", first_trainable_turn=pivot)
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 3 tokens"):
        TrainingSample([1, 2, 3], [1.0], 1.0, "base")  # would broadcast over the row when batched
    with pytest.raises(ValueError, match="old_logprobs has 2 entries for 3 tokens"):
        TrainingSample([1, 2, 3], [0.0, 1.0, 1.0], 1.0, "base", old_logprobs=[0.0, -1.0])


def test_rollout_logprobs_are_aligned_with_their_tokens(tiny_chat):
    tok = tiny_chat.tokenizer
    ids = _sampled(tok, "four")
    lps = [-0.1 * (i + 1) for i in range(len(ids))]
    msgs = [Message("user", "hi"), tiny_chat.assistant_message(ids, lps)]
    conv = tiny_chat.tokenize(msgs)
    sample = make_sample(conv, 1.0, "base")
    start, end = conv.turn_spans[0]
    assert sample.old_logprobs[start:end] == lps
    no_lp = make_sample(tiny_chat.tokenize([Message("user", "hi"), tiny_chat.assistant_message(ids)]), 1.0, "base")
    assert no_lp.old_logprobs is None


def test_template_that_rewrites_assistant_text_is_rejected(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    chat = ChatTokenizer(tok)
    with pytest.raises(TemplateError, match="verbatim"):
        chat.tokenize([Message("user", "x"), chat.assistant_message(_sampled(tok, "hi"))])
