"""The runnable examples: character-level training (same loss curve on every backend) and the attention picture."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer import visualize
from transformer.train import CharTokenizer, get_batch, load_text, train

ROOT = Path(__file__).resolve().parents[1]


def test_reference_and_triton_backends_give_the_same_loss_curve(device):
    settings = dict(steps=3, batch_size=2, seed=3, device=str(device), block_size=16, n_layer=2, n_head=3,
                    n_kv_head=1, n_embd=48, progress=False)
    _, _, expected = train("reference", **settings)
    _, _, fused = train("triton", **settings)
    assert expected[-1] < expected[0]  # it learns
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(expected), rtol=1e-4, atol=0)


def test_shipped_text_tokenizer_and_batches():
    text = load_text()
    assert len(text) > 4000
    tokenizer = CharTokenizer(text)
    assert tokenizer.decode(tokenizer.encode("my cat shat on a hat").tolist()) == "my cat shat on a hat"
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer.encode("emoji \u2603")
    data = tokenizer.encode(text)
    x, y = get_batch(data, 16, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character


def test_train_command_prints_the_loss_and_a_sample():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "transformer.train", "--steps", "2", "--batch-size", "2",
                           "--block-size", "16", "--sample", "12"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "loss: first step" in done.stdout
    assert "2/2" in done.stderr  # the progress bar reached the end
    assert "\nThe " in done.stdout  # the sample, prompted with "The "


def test_visualize_writes_a_png(tmp_path):
    out = tmp_path / "attention.png"
    visualize.main(["my cat shat on a hat", "--out", str(out), "--steps", "0", "--n-layer", "1", "--n-head", "2"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000  # a picture, not an empty canvas
