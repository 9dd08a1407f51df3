"""Regressions from using the GPT as a user would: bad targets, caches and generate flags raise naming the argument
before any forward, and the checks leave the loss and generation as they were; the attention heatmaps of a long
sentence stay a bounded picture."""
import struct

import pytest
import torch

from transformer import GPT, GPTConfig, visualize
from transformer.model import KVCache


def tiny_model(**overrides) -> GPT:
    fields = dict(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    fields.update(overrides)
    return GPT(GPTConfig(**fields))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_transposed_targets_raise_instead_of_a_silently_wrong_loss(backend):
    """(T, B) targets for (B, T) ids flattened to the same B * T entries: cross_entropy paired each logit with
    another token's target and returned a loss without complaint."""
    model = tiny_model(backend=backend)
    idx = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(2, 5\), got \(5, 2\)"):
        model(idx, idx.T)
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(2, 5\), got \(10,\)"):
        model(idx, idx.reshape(-1))


@pytest.mark.parametrize("targets,error,message", [
    (torch.zeros(2, 5, dtype=torch.int32), TypeError, "targets must be an int64 tensor, got torch.int32"),
    (torch.zeros(2, 5), TypeError, "targets must be an int64 tensor, got torch.float32"),
    ([[0] * 5] * 2, TypeError, "targets must be an int64 tensor, got <class 'list'>"),  # was AttributeError
])
def test_targets_of_another_type_raise_naming_targets(targets, error, message):
    with pytest.raises(error, match=message):
        tiny_model()(torch.randint(0, 50, (2, 5)), targets)


@pytest.mark.parametrize("bad", [50, -100, -2])
def test_targets_outside_the_vocabulary_raise_naming_targets(monkeypatch, bad):
    """-100 (Hugging Face's ignore index) and vocab_size were cross_entropy's "Target -100 is out of bounds" on CPU
    and a device assert naming nothing on CUDA; now checked on the device with the ids, before the forward."""
    model = tiny_model()
    monkeypatch.setattr(model.transformer.wte, "forward", lambda *a: pytest.fail("ran the forward"))
    idx = torch.randint(0, 50, (2, 5))
    targets = idx.clone()
    targets[1, 3] = bad
    with pytest.raises(RuntimeError, match=r"targets: next-token ids \(-1: ignored\) must be in \[-1, 50\)"):
        model(idx, targets)


def test_ignored_targets_and_the_loss_are_unchanged_by_the_checks():
    """-1 stays the ignore index: the loss is the mean cross-entropy over the other positions."""
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 6))
    targets = torch.randint(0, 50, (2, 6))
    targets[0, :4] = -1
    logits, loss = model(idx, targets)
    kept = targets != -1
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("capacity,error,message", [
    (-1, ValueError, "capacity must be >= 1, got -1"),  # was accepted; the forward then said "capacity -1"
    (0, ValueError, "capacity must be >= 1, got 0"),
    ("8", TypeError, "capacity must be an int, got str"),  # was "'>' not supported" inside the forward
    (8.0, TypeError, "capacity must be an int, got float"),
])
def test_a_bad_cache_capacity_raises_naming_capacity(capacity, error, message):
    with pytest.raises(error, match=message):
        KVCache(capacity)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_cache_that_is_not_a_kvcache_raises_naming_cache(backend):
    """Were AttributeErrors ('dict' object has no attribute 'length', 'NoneType' object has no attribute
    'seqlens'); decode_step without a cache says it needs a filled one."""
    model = tiny_model(backend=backend)
    idx = torch.randint(0, 50, (1, 3))
    with pytest.raises(TypeError, match="cache must be a KVCache or None, got dict"):
        model(idx, cache={})
    if backend == "triton":
        with pytest.raises(TypeError, match="cache must be a KVCache or None, got list"):
            model.decode_step(idx[:, -1:], [])
        with pytest.raises(ValueError, match="decode_step needs a cache a forward has filled"):
            model.decode_step(idx[:, -1:], None)


@pytest.mark.parametrize("use_cache", [1, None, "yes"])
def test_generate_use_cache_must_be_a_bool(monkeypatch, use_cache):
    """None ran the uncached path silently (and 1 the cached one) where compile's flag was already checked."""
    model = tiny_model()
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran a forward"))
    with pytest.raises(TypeError, match=f"use_cache must be a bool, got {type(use_cache).__name__}"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, use_cache=use_cache)


def test_generate_still_matches_the_uncached_greedy_tokens_past_block_size():
    """The flag and cache checks change nothing in generation: cached greedy tokens past block_size (the cache
    rebuilt from the last block_size tokens) equal the uncached ones."""
    model = tiny_model(window=5).eval()
    prompt = torch.randint(0, 50, (2, 12))
    cached = model.generate(prompt, 7, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 7, temperature=0, use_cache=False))


@pytest.mark.parametrize("length,labelled", [(20, 20), (150, 38)])
def test_attention_heatmaps_stay_a_bounded_size_for_long_sentences(tmp_path, monkeypatch, length, labelled):
    """A heatmap was 0.25 inch a character: 150 characters over 2 heads made a 7900 x 3950 pixel PNG (200
    characters over 4 heads and 2 layers, 20700 x 10350: a minute, 2 GB; 650, matplotlib's too-large error after
    training). Now at most 12 inches a side, every character labelled up to 48 (every k-th beyond)."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
    probs = [torch.softmax(torch.randn(2, length, length), -1)]
    out = tmp_path / "maps.png"
    visualize.plot_attention(probs, list("my cat shat on a hat"[i % 20] for i in range(length)), str(out))
    width, height = struct.unpack(">II", out.read_bytes()[16:24])  # the PNG's IHDR
    assert width <= (2 * 13.5 + 1) * 100 and height <= 14 * 100
    if length == 20:  # a short sentence: as before, 0.25 inch a character
        assert (width, height) == ((2 * 6.5 + 1) * 100, 7 * 100)
    axes = figures[0].axes[:2]  # the two heatmaps (the colorbar's comes after)
    for ax in axes:
        assert len(ax.get_xticklabels()) == len(ax.get_yticklabels()) == labelled
    assert axes[0].get_xticklabels()[1].get_text() == ("y" if length == 20 else "a")
