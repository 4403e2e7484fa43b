"""ref.attacks.softprompt: k input embeddings before every question, trained with the model frozen."""

from __future__ import annotations

import torch

from ref.attacks.softprompt import SoftPrompted, answer_nll, answer_pairs, initial_prompt, train_soft_prompt

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Rivers flow to the sea."]
QUESTIONS = {
    "q": [
        {"question": "Where do rivers flow?", "choices": ["sea", "sky", "cats", "gardens"], "answer": 0},
        {"question": "What jumps over the lazy dog?", "choices": ["river", "fox", "sea", "cat"], "answer": 1},
        {"question": "Who lives in gardens?", "choices": ["fox", "sea", "birds", "rivers"], "answer": 2},
    ]
}


def test_a_prompt_of_token_embeddings_equals_those_tokens_before_the_input(tiny_llama):
    _, model, tok = tiny_llama
    prompt_ids = tok.encode("Cats, dogs and birds", add_special_tokens=False)[:5]
    wrapped = SoftPrompted(model, model.model.embed_tokens.weight[prompt_ids].detach())
    ids, mask = tok.batch(TEXTS)
    assert not mask.all()  # the second row is left-padded: the prompt sits before its padding
    last = model.config.num_layers - 1
    out = wrapped(ids, mask, taps=[last])
    got = out.logits
    assert torch.equal(wrapped.read_out(out.taps[last]), got)  # the frozen final norm and head, as the model's
    for b, text in enumerate(TEXTS):
        alone = model(torch.tensor([prompt_ids + tok.encode(text)])).logits[0, len(prompt_ids) :]
        n = int(mask[b].sum())
        # the same tokens at the same positions; padding and batching change only fp32 rounding (~1e-7 of logits of
        # std ~0.1)
        torch.testing.assert_close(got[b, -n:], alone, rtol=0, atol=1e-5)
    assert wrapped.config.max_position_embeddings == model.config.max_position_embeddings - len(prompt_ids)


def test_training_raises_the_t_split_likelihood_and_changes_no_weight(tiny_llama):
    _, model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = answer_pairs(tok, QUESTIONS, "letter")
    with torch.no_grad():
        start = answer_nll(SoftPrompted(model, initial_prompt(model, 16, seed=0)), pairs).mean().item()
    model.requires_grad_(True)  # a gradient would reach the weights if the attack let one through
    try:
        prompt = train_soft_prompt(model, tok, QUESTIONS, "letter", tokens=16, steps=10, lr=0.05, batch_size=2, seed=0)
        assert all(p.grad is None for p in model.parameters())  # no weight gradients
    finally:
        model.requires_grad_(False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no weight changes
    with torch.no_grad():
        end = answer_nll(SoftPrompted(model, prompt), pairs).mean().item()
    print(f"answer NLL of the T split: {start:.3f} -> {end:.3f}")
    # the tiny random model's attention barely reads the prompt: measured 11.55 -> 10.66 nats per answer
    assert prompt.shape == (16, model.config.hidden_size) and end < start - 0.5
    again = train_soft_prompt(model, tok, QUESTIONS, "letter", tokens=16, steps=10, lr=0.05, batch_size=3, seed=0)
    torch.testing.assert_close(again, prompt, rtol=0, atol=1e-5)  # the chunking changes only the rounding
    other = train_soft_prompt(model, tok, QUESTIONS, "letter", tokens=16, steps=1, lr=0.05, seed=1)
    assert not torch.equal(other[:, :4], prompt[:, :4])


def test_answer_pairs_are_the_evaluations_prompt_and_right_answer(tiny_llama):
    _, _, tok = tiny_llama
    (ctx, answer), *_ = answer_pairs(tok, QUESTIONS, "letter")
    assert tok.tk.decode(ctx + answer).endswith("C. cats\nD. gardens\nAnswer: A")
    (ctx, answer), *_ = answer_pairs(tok, QUESTIONS, "cloze")
    assert tok.tk.decode(ctx + answer).endswith("Question: Where do rivers flow?\nAnswer: sea")
