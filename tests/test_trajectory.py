"""Training sequences keep the sampled ids verbatim and mask exactly the assistant tokens."""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
    """A tiny byte-level BPE trained here, with Llama-3-style special tokens; like Llama 3's, it adds BOS to what it
    encodes unless told not to (add_special_tokens=False)."""
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["you are a bot", "what is two plus two", "the answer is four", "try again please"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
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


def test_an_unknown_kind_or_objective_is_rejected_with_the_options():
    with pytest.raises(ValueError) as error:
        TrainingSample([1, 2], [0.0, 1.0], 1.0, "sft")
    assert str(error.value) == ("unknown sample kind 'sft'; known: base, distill, retry, reflection, refinement, "
                                "sft_reflect, sft_retry, sft_success")
    with pytest.raises(ValueError) as error:
        TrainingSample([1, 2], [0.0, 1.0], 1.0, "base", objective="rl")
    assert str(error.value) == "unknown objective 'rl'; use one of policy, sft, shaped"


def test_make_sample_defaults_and_the_fields_it_passes_on(tiny_chat):
    conv = tiny_chat.tokenize(_conversation(tiny_chat))
    sample = make_sample(conv, 1, "sft_success")
    assert (sample.group_id, sample.reward, sample.objective, sample.advantage) == ("", None, "sft", 1.0)
    assert isinstance(sample.advantage, float)
    sample = make_sample(conv, -0.5, "base", group_id="task-3/0", reward=0.25, objective="sft")
    assert (sample.group_id, sample.reward, sample.objective, sample.kind) == ("task-3/0", 0.25, "sft", "base")


def test_a_tokenizer_without_a_chat_template_is_rejected(tiny_tokenizer):
    class NoTemplate:  # not even the attribute
        pass

    message = ("tokenizer NoTemplate has no chat_template; set one (tokenizer.chat_template = ...) or use an "
               "instruct model")
    with pytest.raises(TemplateError) as error:
        ChatTokenizer(NoTemplate())
    assert str(error.value) == message
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(TemplateError, match=f"tokenizer {type(tok).__name__} has no chat_template"):
        ChatTokenizer(tok)


def test_end_of_turn_ids_are_the_tokenizers_eos_and_the_given_ones(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id  # <|im_end|>
    assert ChatTokenizer(tiny_tokenizer).eos_token_ids == [eos]
    assert ChatTokenizer(tiny_tokenizer, [7, eos, 5]).eos_token_ids == sorted({5, 7, eos})


def test_assistant_content_is_the_sampled_text_verbatim(tiny_tokenizer):
    # a special token inside the turn stays in the content, and so does the spacing before punctuation, even
    # for a tokenizer that cleans up tokenization spaces by default (transformers skips that for BPE unless
    # forced; WordPiece or Unigram tokenizers do it); only the final end-of-turn id is dropped
    tok = copy.deepcopy(tiny_tokenizer)
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    chat = ChatTokenizer(tok)
    ids = _sampled(tok, "four , five .<|im_start|>six")
    assert tok.decode(ids[:-1]) == "four, five.<|im_start|>six"  # what a clean-up would write
    message = chat.assistant_message(ids)
    assert message.content == "four , five .<|im_start|>six"
    assert message.token_ids == ids


def test_decode_drops_special_tokens_unless_asked(tiny_chat):
    ids = _sampled(tiny_chat.tokenizer, "four")  # ends with the end-of-turn id <|im_end|>
    assert tiny_chat.decode(ids) == "four"
    assert tiny_chat.decode(ids, skip_special_tokens=False) == "four<|im_end|>"


def test_rollout_logprobs_are_aligned_with_their_tokens(tiny_chat):
    tok = tiny_chat.tokenizer
    ids = _sampled(tok, "four")
    lps = [-0.1 * (i + 1) for i in range(len(ids))]
    msgs = [Message("user", "hi"), tiny_chat.assistant_message(ids, lps)]
    conv = tiny_chat.tokenize(msgs)
    sample = make_sample(conv, 1.0, "base")
    start, end = conv.turn_spans[0]
    assert sample.old_logprobs[start:end] == lps
    assert sample.old_logprobs[:start] == [0.0] * start  # the prompt's tokens: 0 (no logprob, not trained)
    # nothing trainable (the pivot past the only turn): no rollout logprobs either
    assert make_sample(conv, 1.0, "distill", first_trainable_turn=1).old_logprobs is None
    no_lp = make_sample(tiny_chat.tokenize([Message("user", "hi"), tiny_chat.assistant_message(ids)]), 1.0, "base")
    assert no_lp.old_logprobs is None
    # logprobs that do not match the ids one for one are not used
    short = tiny_chat.tokenize([Message("user", "hi"), tiny_chat.assistant_message(ids, lps[:-1])])
    assert short.logprobs == [None] * len(short.input_ids)
    assert make_sample(short, 1.0, "base").old_logprobs is None


def test_template_that_rewrites_assistant_text_is_rejected(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    chat = ChatTokenizer(tok)
    with pytest.raises(TemplateError) as error:
        chat.tokenize([Message("user", "x"), chat.assistant_message(_sampled(tok, "hi"))])
    assert str(error.value) == ("the chat template does not render assistant content verbatim (turn 0 not found); "
                                "R3L needs a template that keeps assistant text as is")


def test_an_assistant_message_without_sampled_ids_is_rejected(tiny_chat):
    with pytest.raises(ValueError) as error:
        tiny_chat.tokenize([Message("user", "hi"), Message("assistant", "four")])
    assert str(error.value) == "assistant message without token_ids: cannot build a training sequence"


def test_a_turn_at_the_very_start_of_the_text(tiny_tokenizer):
    # a bare template renders the first (assistant) message at position 0 of the text
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    chat = ChatTokenizer(tok)
    ids = _sampled(tok, "four", eos=False)
    conv = chat.tokenize([chat.assistant_message(ids), Message("user", "ok")])
    assert conv.turn_spans == [(0, len(ids))]
    assert conv.input_ids[: len(ids)] == ids
    assert tok.decode(conv.input_ids) == "four\nok\n"
