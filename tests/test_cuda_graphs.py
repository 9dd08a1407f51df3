"""Every public forward op can be captured in a CUDA graph: on a GPU each is captured in a torch.cuda.CUDAGraph and
replayed with new input values (eager's result, bit for bit: the same kernels); on CPU, where there are no graphs,
the property they need is tested instead: no allocation size (no op's output shape) depends on the inputs' values,
so two calls with inputs of the same shapes and different values, index tensors (cache_seqlens, cu_seqlens,
block tables) included, run the same sequence of ops on the same shapes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels.flash_attn import flash_attn_func

FP16 = torch.float16


def _int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _randn(device, *shape):
    return torch.randn(*shape, device=device).to(FP16)


def _qkv(device, n_q=7, n_k=9):
    """q (2, 4, n_q, 16), k, v (2, 2, n_k, 16) fp16: GQA with lengths that are not block multiples."""
    return _randn(device, 2, 4, n_q, 16), _randn(device, 2, 2, n_k, 16), _randn(device, 2, 2, n_k, 16)


def _norm_inputs(device, variant):
    return _randn(device, 5, 24), _randn(device, 5, 24), _randn(device, 24), _randn(device, 24)


def _padded(device, variant):
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[variant, 2 + variant:] = False  # another row, another length
    return (*_qkv(device), mask)


def _varlen(device, variant):
    """3 packed sequences of 13 tokens, their boundaries moved by the variant, within the same max lengths."""
    bounds = [[0, 3, 8, 13], [0, 6, 7, 13]][variant]
    q, k, v = (_randn(device, 13, heads, 16) for heads in (4, 2, 2))
    return q, k, v, _int32(bounds, device), _int32(bounds, device)


def _kvcache(device, variant):
    """One new token appended at each row's cache_seqlens (other values per variant) to a (2, 40, 2, 16) cache."""
    q, k, v = _randn(device, 2, 1, 4, 16), _randn(device, 2, 1, 2, 16), _randn(device, 2, 1, 2, 16)
    caches = _randn(device, 2, 40, 2, 16), _randn(device, 2, 40, 2, 16)
    return (q, *caches, k, v, _int32([[5, 31], [0, 39]][variant], device))


def _paged(device, variant):
    """The same step against 6 pages of 16 slots, the block table's pages and the lengths other per variant."""
    q, k, v = _randn(device, 2, 1, 4, 16), _randn(device, 2, 1, 2, 16), _randn(device, 2, 1, 2, 16)
    pages = _randn(device, 6, 16, 2, 16), _randn(device, 6, 16, 2, 16)
    table = _int32([[[0, 1, 2], [3, 4, 5]], [[5, 3, 1], [0, 2, 4]]][variant], device)
    return (q, *pages, k, v, _int32([[17, 2], [40, 30]][variant], device), table)


CASES = {  # name: (inputs(device, variant), the op on them)
    "softmax": (lambda device, variant: (_randn(device, 3, 5, 33),), lambda x: kernels.softmax(x, causal=True)),
    "log_softmax": (lambda device, variant: (_randn(device, 3, 5, 33),), lambda x: kernels.log_softmax(x, 1)),
    "layer_norm": (_norm_inputs, lambda x, r, w, b: kernels.layer_norm(x, (24,), w, b)),
    "rms_norm": (_norm_inputs, lambda x, r, w, b: kernels.rms_norm(x, (24,), w)),
    "add_layer_norm": (_norm_inputs, lambda x, r, w, b: kernels.add_layer_norm(x, r, (24,), w, b)),
    "add_rms_norm": (_norm_inputs, lambda x, r, w, b: kernels.add_rms_norm(x, r, (24,), w)),
    "attention": (lambda device, variant: _qkv(device), lambda q, k, v: kernels.attention(q, k, v, causal=True)),
    "attention_padded": (_padded, lambda q, k, v, mask: kernels.attention(q, k, v, key_padding_mask=mask)),
    "attention_window": (lambda device, variant: _qkv(device),
                         lambda q, k, v: kernels.attention(q, k, v, causal=True, window_size=(3, 0))),
    "attention_varlen": (_varlen, lambda q, k, v, cu_q, cu_k: kernels.attention_varlen(q, k, v, cu_q, cu_k, 6, 6,
                                                                                        causal=True)),
    "attention_with_kvcache": (_kvcache, lambda q, kc, vc, k, v, lengths: kernels.attention_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=lengths, causal=True, return_lse=True)),
    "attention_with_kvcache_paged": (_paged, lambda q, kc, vc, k, v, lengths, table: kernels.attention_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=lengths, block_table=table, num_splits=2)),
    "flash_attn_func": (lambda device, variant: tuple(t.transpose(1, 2).contiguous() for t in _qkv(device)),
                        lambda q, k, v: flash_attn_func(q, k, v, causal=True)),
    "scaled_dot_product_attention": (lambda device, variant: _qkv(device, 9, 9),
                                     lambda q, k, v: kernels.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                         enable_gqa=True)),
}


def _tensors(result):
    return [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]


class _Shapes(TorchDispatchMode):
    """Records (op, output shapes) of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func), [tuple(t.shape) for t in _tensors(out)]))
        return out


@pytest.mark.parametrize("name", list(CASES))
def test_no_allocation_size_depends_on_tensor_values(name):
    """Two calls, inputs of the same shapes and other values (other lengths and offsets for the index tensors):
    the same ops allocate the same shapes, so a CUDA graph captured on the first replays the second. After a
    warm-up call, as before a capture: a first call also fills caches (plans, constants) once."""
    make, op = CASES[name]
    op(*make("cpu", 0))
    recorded = []
    for variant in (0, 1):
        inputs = make("cpu", variant)
        with _Shapes() as shapes:
            op(*inputs)
        recorded.append(shapes.calls)
    assert recorded[0] and recorded[0] == recorded[1]
    assert any(call.startswith("aten.") and "empty" in call for call, _ in recorded[0])  # allocations were seen


def test_the_recorder_sees_a_value_dependent_allocation():
    recorded = []
    for values in ([0.0, 1.0, 2.0], [1.0, 1.0, 2.0]):
        with _Shapes() as shapes:
            torch.tensor(values)[torch.tensor(values) > 0.5]  # a boolean-mask gather: as many rows as are true
        recorded.append(shapes.calls)
    assert recorded[0] != recorded[1]


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRETED,
                    reason="CUDA graphs need a GPU (on CPU the allocation test above stands in)")
@pytest.mark.parametrize("name", list(CASES))
def test_captured_in_a_cuda_graph_and_replayed_with_new_values(name):
    """Captured on the first inputs, replayed after copying the second's values into them: eager's outputs on the
    second inputs, bit for bit, and for the KV cache ops the same caches."""
    make, op = CASES[name]
    static, fresh = make("cuda", 0), make("cuda", 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles the kernels, fills the caches of plans
        op(*(t.clone() for t in static))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _tensors(op(*static))
    for target, source in zip(static, fresh):
        target.copy_(source)
    graph.replay()
    expected = _tensors(op(*fresh))
    torch.cuda.synchronize()
    assert len(captured) == len(expected)
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(static, fresh))  # the appended caches too
