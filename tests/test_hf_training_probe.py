"""Training a ``patch()``-ed Hugging Face model as users do (tiny random-weight configs, no download): a Trainer-style
loop, gradient checkpointing, packed batches from ``DataCollatorWithFlattening``, attention dropout in training and
eval, and a save/load round trip, each against the unpatched model or transformers' own packing."""
import multiprocessing
import queue
import socket
import tempfile

import pytest
import torch

from transformer import patch

transformers = pytest.importorskip("transformers")

# transformers 5.24 renames it activation_checkpointing_enable; users (and 4.x) call it by this name
OLD_CHECKPOINTING_NAME = pytest.mark.filterwarnings(
    "ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")

SIZES = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def tiny_llama(**options):
    torch.manual_seed(0)  # the same weights on every call
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, **options))


def tiny_qwen2(**options):
    """A sliding-window layer (window 5, under the sequences' lengths) and a full-attention one."""
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SIZES, use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
        **options))


def padded_batch():
    """(2, 12) tokens, row 1 padded on the left; its padding and the first token after it (predicted from a
    padded position, whose output is meaningless) are left out of the loss."""
    ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def packed_features():
    generator = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(1, 50, (n,), generator=generator).tolist()} for n in (7, 11, 5)]


def weights(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def train_like_trainer(model, batches, accumulate=2, steps=2):
    """Trainer's loop (Trainer itself needs accelerate): train mode, summed token losses over
    ``num_items_in_batch`` across an accumulation of micro-batches, clipping, an optimizer step (SGD: Adam's step
    magnifies the last bits of near-zero gradients); ``steps`` times."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    items = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
    losses = []
    for _ in range(steps):
        for batch in batches[:accumulate]:
            loss = model(**batch, num_items_in_batch=items).loss
            loss.backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return losses


def test_trainer_style_steps_match_the_unpatched_model():
    """Padding, -100 labels, gradient accumulation and num_items_in_batch (which Trainer passes down to every
    attention call): the same losses and, after an optimizer step, weights as the unpatched model's."""
    full = padded_batch()
    batches = [{name: t[i:i + 1] for name, t in full.items()} for i in range(2)]
    reference = tiny_llama()
    expected_losses = train_like_trainer(reference, batches, steps=1)
    model = patch(tiny_llama())
    losses = train_like_trainer(model, batches, steps=1)
    assert model.config._attn_implementation == "fused_triton"
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    expected = weights(reference)
    for name, value in weights(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@OLD_CHECKPOINTING_NAME
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_the_kernels_dropout_mask(use_reentrant):
    """Attention dropout runs in the kernel, seeded from torch's generator: the checkpointed recomputation must draw
    the forward's mask again, so a step is the un-checkpointed step exactly."""
    batch = padded_batch()

    def step(model):
        model.train()
        torch.manual_seed(5)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters()}

    expected_loss, expected = step(patch(tiny_qwen2(attention_dropout=0.3)))
    model = patch(tiny_qwen2(attention_dropout=0.3))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    loss, grads = step(model)
    assert loss == expected_loss
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update, as PEFT's LoRA."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) * 0.1)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=generator) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.A.t() @ self.B.t()


class Adapted(torch.nn.Module):
    """A PEFT-style wrapper: the base model frozen, LoRA on q_proj and v_proj."""

    def __init__(self, model):
        super().__init__()
        self.base_model = model.requires_grad_(False)
        for layer in model.model.layers:
            layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj)
            layer.self_attn.v_proj = LoRALinear(layer.self_attn.v_proj)

    def forward(self, **inputs):
        return self.base_model(**inputs)


@OLD_CHECKPOINTING_NAME
def test_lora_style_adapter_with_reentrant_checkpointing_trains_as_unpatched():
    """patch() of a wrapper holding the frozen model (the norms' Parameters stay frozen), with reentrant
    checkpointing and enable_input_require_grads (what PEFT does for it): the adapters' gradients are the
    unpatched model's, the frozen weights get none."""
    batch = padded_batch()

    def adapter_grads(adapted):
        adapted.train()
        adapted(**batch).loss.backward()
        return {name: p.grad for name, p in adapted.named_parameters() if p.requires_grad}

    expected = adapter_grads(Adapted(tiny_llama()))
    adapted = patch(Adapted(tiny_llama()))
    adapted.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    adapted.base_model.enable_input_require_grads()
    grads = adapter_grads(adapted)
    assert adapted.base_model.config._attn_implementation == "fused_triton"
    assert sorted(grads) == sorted(expected) and len(grads) == 8
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)


def test_attention_dropout_in_training_only():
    """Training: every call draws a new mask (a seed reproduces it); eval: deterministic, the dropout-free model."""
    ids = padded_batch()["input_ids"]
    model = patch(tiny_qwen2(attention_dropout=0.5))
    with torch.no_grad():
        torch.manual_seed(3)
        first = model(ids).logits  # a fresh model is in training mode
        second = model(ids).logits
        torch.manual_seed(3)
        assert torch.equal(model(ids).logits, first)
        model.eval()
        evaluated = model(ids).logits
        without_dropout = patch(tiny_qwen2()).eval()(ids).logits
        model.train()
        trained_again = model(ids).logits
    assert not torch.allclose(first, second, atol=1e-3)
    torch.testing.assert_close(evaluated, without_dropout, rtol=0, atol=0)
    assert not torch.allclose(trained_again, evaluated, atol=1e-3)


def padded_reference(features, model):
    """The loss and gradients of the packed sequences run as a right-padded batch through ``model``."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, :len(f["input_ids"])] = 1
    return loss_and_grads(model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))


def loss_and_grads(model, batch, **options):
    model.train()
    loss = model(**batch, **options).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("collator,options", [
    (dict(return_flash_attn_kwargs=True), {}),               # cu_seq_lens beside use_cache's plain sliding mask
    (dict(return_flash_attn_kwargs=True, return_seq_idx=True), dict(use_cache=False)),
    ({}, dict(use_cache=False)),                              # position ids alone: transformers finds the packing
])
def test_packed_training_with_the_flattening_collator_matches_a_padded_batch(collator, options):
    features = packed_features()
    expected_loss, expected = padded_reference(features, tiny_qwen2(attn_implementation="eager"))
    batch = transformers.DataCollatorWithFlattening(**collator)(features)
    loss, grads = loss_and_grads(patch(tiny_qwen2()), batch, **options)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_float64_packed_batch_with_flash_kwargs_keeps_sequences_apart_in_sliding_layers():
    """A float64 model runs the torch-op attention. With the collator's cu_seq_lens and use_cache's default, a
    sliding-window layer's mask is the plain sliding causal pattern (transformers finds packing only without a
    cache): its dense mask spanned the packed sequences, so a token attended to the previous sequence's end
    (the float32 kernel path keeps them apart by the keywords)."""
    features = packed_features()
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    # transformers' own packing (position ids, no cache) in eager attention (padding a float64 batch gives NaN there)
    expected_loss, expected = loss_and_grads(tiny_qwen2(attn_implementation="eager").double(),
                                             {**batch, "cu_seq_lens_q": None, "cu_seq_lens_k": None}, use_cache=False)
    loss, grads = loss_and_grads(patch(tiny_qwen2()).double(), batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)  # eager: the softmax in float32
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_a_patched_model_saves_and_loads_back():
    """save_pretrained of a patched model writes the plain state dict (the norms' keys unchanged): it loads as the
    stock classes, or straight onto the kernel by name."""
    model = patch(tiny_llama())
    with torch.no_grad():
        for p in model.parameters():  # away from the seed's initial weights, which a load might reproduce
            p.add_(torch.randn_like(p), alpha=0.01)
    ids = padded_batch()["input_ids"]
    with torch.no_grad():
        expected = model.eval()(ids).logits
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            plain = transformers.AutoModelForCausalLM.from_pretrained(directory)
            on_kernel = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="fused_triton")
        assert plain.config._attn_implementation == "sdpa"
        assert on_kernel.config._attn_implementation == "fused_triton"
        torch.testing.assert_close(plain.eval()(ids).logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(on_kernel.eval()(ids).logits, expected, rtol=1e-5, atol=1e-6)


def _ddp_rank(rank: int, port: int, results) -> None:
    """One gloo rank: patch the DDP-wrapped model, train two steps on this rank's row, send back the weights."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ids = padded_batch()["input_ids"][rank:rank + 1]
        model = tiny_llama()
        ddp = patch(torch.nn.parallel.DistributedDataParallel(model))
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
        for _ in range(2):
            ddp(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        # numpy copies: a tensor sent through the queue would live in this process's shared memory
        results.put((rank, model.config._attn_implementation,
                     {name: t.numpy().copy() for name, t in weights(model).items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_over_gloo_trains_the_patched_model_as_one_process_on_the_whole_batch():
    """patch() of a DistributedDataParallel wrapper: two ranks, one row each, end with the weights of one process
    training on both rows (DDP averages the ranks' gradients; the rows have the same token count)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_ddp_rank, args=(r, port, results), daemon=True) for r in range(2)]
    for rank in ranks:
        rank.start()
    try:
        outcomes = dict((r, (name, state)) for r, name, state in (results.get(timeout=240) for _ in ranks))
    except queue.Empty:
        pytest.fail("the DDP ranks gave no answer within 240 s")
    finally:
        for rank in ranks:
            rank.join(timeout=30)
            if rank.is_alive():
                rank.terminate()
                rank.join(timeout=5)
    ids = padded_batch()["input_ids"]
    model = patch(tiny_llama())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = weights(model)
    for name, state in outcomes.values():
        assert name == "fused_triton"
        for key, value in state.items():
            torch.testing.assert_close(torch.from_numpy(value), expected[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_compiled_training_steps_match_eager(fresh_dynamo):
    """torch.compile of a patched model (padding, -100 labels): the eager steps' losses and weights."""
    batches = [padded_batch()]
    expected_model = patch(tiny_qwen2())
    expected_losses = train_like_trainer(expected_model, batches, accumulate=1)
    model = patch(tiny_qwen2())
    losses = train_like_trainer(torch.compile(model), batches, accumulate=1)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    expected = weights(expected_model)
    for name, value in weights(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
