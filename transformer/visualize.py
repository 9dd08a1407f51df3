"""Attention maps as a picture: ``python -m transformer.visualize "my cat shat on a hat" --out attention.png``.

Trains a small character-level GPT briefly on the shipped text (``--steps 0`` keeps the random initialisation), runs
the sentence through the reference attention path, and draws one heatmap per layer and head: row i shows how much
character i attends to each earlier character (the probabilities of each row sum to 1; the causal mask leaves the
upper triangle empty).
"""
import argparse
import os
from typing import List, Sequence

import torch

from transformer.model import BACKENDS
from transformer.train import int_at_least, load_text, seed_value, tokenizer_for_flags, train

N_EMBD = 64
MAX_PANEL_INCHES = 12.0  # a heatmap's side: a long sentence gets smaller cells, not a figure of 10^8+ pixels
MAX_TICKS = 48  # labels a side: 7-point characters need about 0.25 inch each


def plot_attention(probs: Sequence[torch.Tensor], labels: List[str], out: str, title: str = "") -> None:
    """Write a PNG grid of heatmaps, one row per layer and one column per head. probs: per layer (H, T, T).

    A heatmap is 0.25 inch a character up to MAX_PANEL_INCHES a side, with every character labelled up to
    MAX_TICKS of them (every k-th beyond), so a long sentence still gives a PNG of bounded size."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    n_layer, n_head = len(probs), probs[0].shape[0]
    size = min(0.25 * len(labels), MAX_PANEL_INCHES) + 1.5
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head + 1, size * n_layer + 0.5), squeeze=False,
                             layout="constrained")
    shown = [repr(c)[1:-1] if c != " " else "␣" for c in labels]
    ticks = range(0, len(labels), max(1, -(-len(labels) // MAX_TICKS)))
    for layer, layer_probs in enumerate(probs):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(layer_probs[head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=9)
            ax.set_xticks(ticks, [shown[i] for i in ticks], fontsize=7)
            ax.set_yticks(ticks, [shown[i] for i in ticks], fontsize=7)
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def figure_path(text: str) -> str:
    """An argparse ``type`` for ``--out``: the path matplotlib will write (".png" appended where it has no
    extension, as savefig does), in an existing writable folder, with an extension matplotlib can write; else
    argparse's usage error before training (savefig's FileNotFoundError or unknown format came after it, and
    "wrote v3" named a file matplotlib had called v3.png). A name ending in "." or a folder is refused (savefig
    would write b.png for "b." and a hidden ".png" in the folder)."""
    from matplotlib.backend_bases import FigureCanvasBase

    if text.endswith((".", "/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a file name, such as attention.png")
    extension = os.path.splitext(text)[1][1:]
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension and extension.lower() not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: matplotlib cannot write .{extension} files (it writes "
                                         f"{', '.join(sorted(formats))})")
    path = text if extension else text + ".png"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {folder!r} is not an existing writable folder")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentence")
    parser.add_argument("--out", type=figure_path, default="attention.png",
                        help="the figure's file (.png unless another extension matplotlib knows is given)")
    parser.add_argument("--steps", type=int_at_least(0), default=150, help="training steps first (0: random weights)")
    parser.add_argument("--backend", choices=BACKENDS, default="reference", help="backend used for training")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--n-layer", type=int_at_least(1), default=2, help="layers (at least one: it draws each)")
    parser.add_argument("--n-head", type=int, default=4)
    args = parser.parse_args(argv)
    block_size = max(64, len(args.sentence))
    shipped = len(load_text())
    if block_size >= shipped:  # the model's window (the sentence) must fit a window of the training text
        parser.error(f"sentence: {len(args.sentence)} characters; at most {shipped - 1} (the shipped training text "
                     f"has {shipped})")
    tokenizer = tokenizer_for_flags(parser, None, block_size=block_size, n_layer=args.n_layer, n_head=args.n_head,
                                    n_embd=N_EMBD)
    if not args.sentence:
        parser.error("sentence: needs at least one character")
    try:
        ids = tokenizer.encode(args.sentence)
    except ValueError as error:
        parser.error(f"sentence: {error}")
    model, _, losses = train(args.backend, steps=args.steps, seed=args.seed, n_layer=args.n_layer,
                             n_head=args.n_head, n_embd=N_EMBD, block_size=block_size, progress=args.steps > 0)
    model.eval()
    probs = model.attention_maps(ids.view(1, -1))
    trained = f"after {args.steps} training steps (loss {losses[-1]:.2f})" if losses else "random weights"
    plot_attention([p[0] for p in probs], list(args.sentence), args.out, f'"{args.sentence}", {trained}')
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
