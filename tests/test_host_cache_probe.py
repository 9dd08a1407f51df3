"""The host launch path's caches and seams, probed as a user would meet them: a forced config seen by the backward
wherever the autograd engine runs it, TF32 read through either of torch's APIs, and memoised plans that never hand
one call's plan to another (strides, offsets, dtypes, variants, GQA ratios and lengths interleaved)."""
import contextvars
import threading

import pytest
import torch

import kernels
from kernels import _runtime, reference
from kernels.attention import configs
from kernels.registry import forced_config, use_config


def _in_engine_thread(context: contextvars.Context, fn):
    """``fn()`` on a fresh thread as the autograd engine's device threads run a GPU graph's backward: an empty
    context of their own, and the context ``backward()`` was called in stashed in torch's TLS under "context" (what
    ``torch.autograd.graph._engine_run_backward`` stashes and the engine hands its workers)."""
    result = []

    def run():
        torch._C._stash_obj_in_tls("context", context)
        try:
            result.append(fn())
        finally:
            torch._C._remove_obj_from_tls("context")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def test_a_forced_config_reaches_a_backward_run_on_the_engines_device_thread():
    """gpu_check forces each dK/dV and dQ tile around a backward; on a GPU the engine runs that backward on its
    device thread, whose empty context used to hide the config (the autotuner's tile ran instead, unseen)."""
    if not hasattr(torch._C, "_stash_obj_in_tls"):
        pytest.skip("a torch whose engine hands its device threads no context")
    with use_config("attention_dkdv", BLOCK_M=16, BLOCK_N=64):
        launched = contextvars.copy_context()
        assert _in_engine_thread(launched, lambda: forced_config("attention_dkdv")) == {"BLOCK_M": 16, "BLOCK_N": 64}
        assert _in_engine_thread(launched, lambda: forced_config("attention_dq")) is None
    # a backward launched outside the block, and a thread with nothing stashed, see no config
    assert _in_engine_thread(contextvars.copy_context(), lambda: forced_config("attention_dkdv")) is None
    with use_config("attention_dkdv", BLOCK_M=16, BLOCK_N=64):
        seen = []
        thread = threading.Thread(target=lambda: seen.append(forced_config("attention_dkdv")))
        thread.start()
        thread.join()
        assert seen == [None]  # another thread's own calls keep their own (empty) context


def test_use_config_leaves_nothing_behind():
    """Nested blocks (innermost wins), an exception inside, and the decorator form all restore the config."""
    assert forced_config("attention_fwd") is None
    with pytest.raises(RuntimeError, match="inside"):
        with use_config("attention_fwd", BLOCK_M=16, BLOCK_N=64):
            with use_config("attention_fwd", BLOCK_M=64, BLOCK_N=16), use_config("attention_dq", BLOCK_M=16,
                                                                                  BLOCK_N=16):
                assert forced_config("attention_fwd") == {"BLOCK_M": 64, "BLOCK_N": 16}
            assert forced_config("attention_fwd") == {"BLOCK_M": 16, "BLOCK_N": 64}
            assert forced_config("attention_dq") is None
            raise RuntimeError("inside")
    assert forced_config("attention_fwd") is None

    @use_config("attention_dkdv", BLOCK_M=16, BLOCK_N=16)
    def forced():
        return forced_config("attention_dkdv")
    assert forced() == forced() == {"BLOCK_M": 16, "BLOCK_N": 16} and forced_config("attention_dkdv") is None


@pytest.mark.parametrize("setting, tf32", [("tf32", True), ("ieee", False), ("none", False)])
def test_tf32_is_read_through_torchs_new_precision_api(monkeypatch, setting, tf32):
    """torch 2.9+'s ``fp32_precision = "tf32"`` (the API torch recommends) makes reading the legacy ``allow_tf32``
    raise RuntimeError, which every fp32 attention and decode call on a GPU did while planning its launch."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    monkeypatch.setattr(_runtime, "INTERPRETED", False)  # the GPU path's plan
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        assert configs.uses_tf32(torch.float32) is tf32 and configs.uses_tf32(torch.float16) is False
        assert configs.kernel_meta(64, torch.float32, configs.uses_tf32(torch.float32), False)["PRECISION"] == (
            "tf32" if tf32 else "ieee")
    finally:
        if before == "none":
            matmul.fp32_precision = "none"
        else:  # the legacy setter, which any earlier legacy setting reads back from
            matmul.allow_tf32 = before == "tf32"
    if before == "none":
        matmul.allow_tf32 = True  # and the legacy API alone, as before
        try:
            assert configs.uses_tf32(torch.float32) is True
        finally:
            matmul.fp32_precision = "none"


def _close(out, expected, dtype):
    bound = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    return (out.double() - expected).abs().max().item() <= bound


def test_interleaved_calls_never_share_a_plan_they_should_not():
    """One (B, H, N, D) shape through layouts, storage offsets, dtypes, variants, GQA ratios and lengths of one
    tile bucket, interleaved, each against float64: the plan and variant memos key on everything they bake in."""
    torch.manual_seed(0)
    batch, heads, n, d = 1, 2, 24, 16
    flat = torch.randn(batch * heads * n * d + 3)
    layouts = {"contiguous": torch.randn(batch, heads, n, d),
               "transposed": torch.randn(batch, n, heads, d).transpose(1, 2),
               "sliced": torch.randn(batch, heads, n, 2 * d)[..., d:],
               "offset": flat[3:].view(batch, heads, n, d)}
    k, v = torch.randn(batch, 1, n, d), torch.randn(batch, 1, n, d)
    calls = [(q, k, v, {"causal": causal}) for q in layouts.values() for causal in (True, False)]
    calls += [(layouts["contiguous"], k, v, options) for options in (
        {"causal": True, "window_size": (4, 0)}, {"softcap": 5.0}, {"scale": 0.3}, {"scale": -0.5, "softcap": 2.0},
        {"window_size": (3, 2)}, {"causal": True})]
    calls += [(layouts["contiguous"], torch.randn(batch, kv, n, d), torch.randn(batch, kv, n, d), {"causal": True})
              for kv in (2, 1, 2)]
    calls += [(torch.randn(batch, heads, n_q, d), torch.randn(batch, 1, n_k, d), torch.randn(batch, 1, n_k, d),
               {"causal": True}) for n_q, n_k in ((20, 24), (24, 20), (17, 31))]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float32):
        calls.append((layouts["transposed"].to(dtype), k.to(dtype), v.to(dtype), {"causal": True}))
    for q, k_, v_, options in calls + calls[:4]:
        expected = reference.attention(q.double(), k_.double(), v_.double(), **options)
        assert _close(kernels.attention(q, k_, v_, **options), expected, q.dtype), options


def test_a_requires_grad_toggle_between_calls_of_one_signature():
    """The same signature with and without gradients, then its backward, against float64."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    for grad in (False, True, False, True):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        out = kernels.attention(*leaves, causal=True)
        doubles = [t.double().requires_grad_(grad) for t in (q, k, v)]
        expected = reference.attention(*doubles, causal=True)
        assert _close(out, expected, torch.float32) and out.requires_grad is grad
        if grad:
            out.sum().backward()
            expected.sum().backward()
            for mine, theirs in zip(leaves, doubles):
                assert (mine.grad.double() - theirs.grad).abs().max().item() <= 1e-4


def test_threads_launch_at_once_with_their_own_shapes_and_dtypes():
    """Six threads of attention, softmax and layer norm, each its own shapes and dtype: correct results, no error
    from a shared cache."""
    failures = []

    def work(i):
        try:
            generator = torch.Generator().manual_seed(i)
            dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
            for step in range(2):
                n = 8 + 4 * i + step
                q = torch.randn(1, 2, n, 8, generator=generator).to(dtype)
                k, v = (torch.randn(1, 1, n + 3, 8, generator=generator).to(dtype) for _ in range(2))
                expected = reference.attention(q.double(), k.double(), v.double(), causal=bool(i % 2))
                if not _close(kernels.attention(q, k, v, causal=bool(i % 2)), expected, dtype):
                    failures.append(("attention", i, step))
                x = torch.randn(3, n + i, generator=generator).to(dtype)
                if not _close(kernels.softmax(x, dim=i % 2), torch.softmax(x.double(), dim=i % 2), dtype):
                    failures.append(("softmax", i, step))
                normed = kernels.layer_norm(x, (n + i,), eps=1e-5 * (i + 1))
                expected = torch.nn.functional.layer_norm(x.double(), (n + i,), eps=1e-5 * (i + 1))
                if not (normed.double() - expected).abs().max().item() <= 10 * (1e-4 if i % 3 == 0 else 4e-3):
                    failures.append(("layer_norm", i, step))
        except Exception as error:  # noqa: BLE001  (reported below)
            failures.append((i, repr(error)))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

