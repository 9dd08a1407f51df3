"""Regressions found by auditing the GPT, patch() and the examples as a user would."""
import pytest
import torch

from transformer import GPT, GPTConfig


@pytest.mark.parametrize("dtype,temperature", [(torch.float16, 1e-4), (torch.float32, 1e-300)])
def test_a_small_temperature_samples_the_most_likely_token(dtype, temperature):
    """logits / temperature overflowed float16 (and a temperature below float32's range divided by 0): softmax
    gave NaN and torch.multinomial raised. A tiny temperature is all but greedy."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=9, n_layer=1, n_head=2, n_embd=16)).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits of about +-16: / 1e-4 is past float16's 65504
    prompt = torch.randint(0, 11, (2, 3))
    greedy = model.generate(prompt, max_new_tokens=3, temperature=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=3, temperature=temperature), greedy)
