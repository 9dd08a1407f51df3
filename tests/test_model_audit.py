"""Regressions found by auditing the GPT, patch() and the examples as a user would."""
import pytest
import torch

import kernels
from transformer import GPT, GPTConfig, patch, train, visualize
from transformer.model import KVCache


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


TRAIN_USAGE_ERRORS = [
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),  # was torch.stack's RuntimeError
    (["--steps", "-3"], "--steps: must be >= 0, got -3"),  # was zero steps, silently
    (["--sample", "-5"], "--sample: must be >= 0, got -5"),
    (["--lr", "nan"], "--lr: must be finite and > 0"),
    (["--n-head", "3"], "n_embd (64) must be a multiple of n_head (3)"),
    (["--block-size", "100000000"], "a training window takes block_size + 1"),  # was a 25 GB allocation
    (["--text", "/nonexistent/text.txt"], "--text: [Errno 2]"),
    (["--device", "nonsense"], "--device: "),
    (["--device", "meta"], "--device meta: tensors there hold no data"),  # was .item()'s error after building
    (["--context-parallel"], "--context-parallel: run under torchrun"),  # was torch.distributed's ValueError
    (["--seed", "99999999999999999999"], "--seed: must be in [-2**63, 2**64 - 1]"),  # was torch's overflow
]


@pytest.mark.parametrize("flags,message", TRAIN_USAGE_ERRORS)
def test_train_command_rejects_bad_flags_with_a_usage_error(capsys, monkeypatch, flags, message):
    """Each was a traceback from deep inside training (or nothing at all); now argparse's usage error, exit 2."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # not one of torchrun's ranks
    with pytest.raises(SystemExit) as exited:
        train.main(flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    ([""], "sentence: needs at least one character"),
    (["caf\u00e9"], "not in the training text's vocabulary"),
    (["hi", "--n-head", "3"], "must be a multiple of n_head (3)"),
    (["hi", "--steps", "-2"], "--steps: must be >= 0, got -2"),
    (["hi", "--n-layer", "0"], "--n-layer: must be >= 1, got 0"),  # was an IndexError: no map to draw
    (["hi", "--out", "/nonexistent/x.png"], "--out: '/nonexistent/x.png': '/nonexistent' is not an existing"),
    (["hi", "--out", "run.v2"], "--out: 'run.v2': matplotlib cannot write .v2 files (it writes"),  # after training
    (["hi", "--out", "b."], "--out: 'b.': give a file name"),  # "wrote b." where matplotlib wrote b.png
    (["hi", "--out", "results/"], "--out: 'results/': give a file name"),  # a hidden results/.png
    (["hi", "--seed", "-99999999999999999999"], "--seed: must be in [-2**63, 2**64 - 1]"),
    (["the cat " * 1000], "sentence: 8000 characters; at most"),  # named --text, a flag visualize lacks
])
def test_visualize_command_rejects_bad_arguments_with_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        visualize.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_train_samples_from_a_text_without_the_default_prompts_characters(tmp_path, capsys, monkeypatch):
    """The sample started at "The ", so a --text without those characters crashed after training; it starts at
    the text's first non-space character instead."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    text = tmp_path / "ab.txt"
    text.write_text("ab" * 20)
    train.main(["--text", str(text), "--steps", "1", "--block-size", "8", "--n-layer", "1", "--n-embd", "16",
                "--sample", "5"])
    sample = capsys.readouterr().out.splitlines()[-1]
    assert sample.startswith("a") and len(sample) == 6 and set(sample) <= {"a", "b"}


def test_visualize_writes_the_file_it_names(tmp_path, capsys):
    """--out without an extension said "wrote v3" where matplotlib wrote v3.png."""
    visualize.main(["hi", "--steps", "0", "--out", str(tmp_path / "v3")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'v3.png'}"
    assert (tmp_path / "v3.png").stat().st_size > 0


def test_patch_switches_a_gpt_inside_another_module_to_the_triton_backend():
    """patch(torch.compile(gpt)) or patch(a user's module holding a GPT) left the GPT on its backend, silently."""
    gpt = GPT(GPTConfig(vocab_size=11, block_size=9, n_layer=1, n_head=2, n_embd=16))
    holder = torch.nn.ModuleDict({"gpt": gpt, "norm": torch.nn.LayerNorm(16)})
    assert patch(holder) is holder
    assert gpt.config.backend == "triton" and gpt.transformer.h[0].attn.backend == "triton"
    assert isinstance(holder["norm"], kernels.LayerNorm)
    gpt.set_backend("reference")
    compiled = torch.compile(gpt)
    assert patch(compiled) is compiled and gpt.transformer.ln_f.backend == "triton"


def test_two_gpts_built_from_one_config_keep_their_own_backend():
    """set_backend wrote the shared GPTConfig: the other model's config then named a backend its modules did not
    run, and its decode_step (triton only) ran on the reference modules instead of raising."""
    config = GPTConfig(vocab_size=11, block_size=9, n_layer=1, n_head=2, n_embd=16)
    fused, plain = GPT(config).set_backend("triton"), GPT(config)
    assert fused.config.backend == "triton" and plain.config.backend == config.backend == "reference"
    cache = KVCache(9)
    plain(torch.randint(0, 11, (1, 3)), cache=cache)
    with pytest.raises(ValueError, match="not 'reference'"):
        plain.decode_step(torch.randint(0, 11, (1, 1)), cache)
