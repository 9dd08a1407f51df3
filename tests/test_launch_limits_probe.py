"""Limits of a real GPU that Triton's interpreter hides: 32-bit offset arithmetic and a grid's size.

Offsets past 2^31 elements are reached without the memory: views (``as_strided``) of a large uninitialised buffer,
of which only a few pages are touched, in a child process so that a wrapped offset's crash fails one test. What the
interpreter cannot reach (2^31 programs) is checked in the compiled TTIR, or with the limit lowered.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels

softmax_module = importlib.import_module("kernels.softmax")  # kernels.softmax is the function

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(source: str, interpret: bool = True) -> str:
    """stdout of ``source`` run by a fresh interpreter at the repository root; fails the test on any error."""
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True, text=True,
                         timeout=300, cwd=_ROOT, env=env)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    return run.stdout.strip()


_FAR_HEAD_DIMS = r"""
import torch, kernels
FAR = 150_000_000  # a head-dim stride: element d = 15 lies 15 * FAR > 2^31 elements in


def far(near, stride=FAR):
    # near's values in a view whose last (head) dim has ``stride``: 32-bit offsets d * stride wrap
    lead = near[..., 0].numel()
    base = torch.empty((near.shape[-1] - 1) * stride + lead, dtype=near.dtype)  # address space, a few pages used
    return base.as_strided(near.shape, (*near[..., 0].contiguous().stride(), stride)).copy_(near)


torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
qf, kf, vf = (far(t.detach()).requires_grad_() for t in (q, k, v))
out, out_far = kernels.attention(q, k, v, causal=True), kernels.attention(qf, kf, vf, causal=True)
assert torch.equal(out, out_far)
dout = torch.randn_like(out)
grads = torch.autograd.grad(out, (q, k, v), dout)
assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(out_far, (qf, kf, vf), dout)))

# decoding, split: q, the cache, the new keys and the rotary table (8 frequencies: 7 * 3 * FAR > 2^31) far
qd = torch.randn(2, 1, 2, 16, dtype=torch.float16)
cache = torch.randn(2, 8, 1, 16, dtype=torch.float16)
knew, vnew = torch.randn(2, 1, 1, 16, dtype=torch.float16), torch.randn(2, 1, 1, 16, dtype=torch.float16)
cos, sin = torch.rand(8, 8, dtype=torch.float16), torch.rand(8, 8, dtype=torch.float16)
seqlens = torch.tensor([3, 6], dtype=torch.int32)
kc, vc = cache.clone(), cache.clone()
expected = kernels.attention_with_kvcache(qd, kc, vc, knew, vnew, rotary_cos=cos, rotary_sin=sin,
                                          cache_seqlens=seqlens, causal=True, num_splits=2)
kcf, vcf = far(cache), far(cache)
got = kernels.attention_with_kvcache(far(qd), kcf, vcf, far(knew), far(vnew), rotary_cos=far(cos, 3 * FAR),
                                     rotary_sin=far(sin, 3 * FAR), cache_seqlens=seqlens, causal=True, num_splits=2)
assert torch.equal(got, expected) and torch.equal(kcf, kc) and torch.equal(vcf, vc)
print("ok")
"""


@pytest.mark.skipif(not kernels.INTERPRETED, reason="views over ~6 GiB of address space: CPU only")
def test_head_dim_strides_past_2_to_the_31_are_addressed_in_64_bits():
    """A head-dim-outer layout (stride_d * d past 2^31): _tile_ptrs multiplied the head-dim offsets in int32, so
    attention (forward and backward) and decoding read and wrote wrapped addresses (a segfault here); the decode
    append's rotary table (freq * stride_cd) did the same."""
    assert _child(_FAR_HEAD_DIMS) == "ok"


_COMBINE_TTIR = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from kernels.attention import decode

fn = decode._decode_combine
sig = {"PARTIALS": "*fp32", "O": "*fp16", "LSE": "*fp32", **{name: "i32" for name in fn.arg_names[3:-3]},
       "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "BLOCK_M": "constexpr"}
source = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_M": 16})
ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ttir"]
pid = re.search(r"(%\w+) = tt.get_program_id x : i32", ttir).group(1)
print(bool(re.search(rf"arith.extsi {pid} : i32 to i64", ttir)))
"""


def test_decode_combine_rows_are_64_bit():
    """The split-KV combine flattens B * H * Sq rows: its grid (programs of 16 rows) stays under CUDA's limit
    while the row index itself passes 2^31, which int32 wrapped (LSE + rows, and b, h, tok from it). The
    interpreter cannot run 2^27 programs: the compiled TTIR must widen the program id before scaling it."""
    assert _child(_COMBINE_TTIR, interpret=False) == "True"


def _count_launches(monkeypatch):
    launches = []
    run = kernels._direct.run

    def counted(jit, args, grid, **kwargs):
        launches.append(grid)
        return run(jit, args, grid, **kwargs)

    monkeypatch.setattr(kernels._direct, "run", counted)
    return launches


@pytest.mark.parametrize("dim", [-1, 0])
def test_softmax_rows_past_one_grid_launch_in_runs(monkeypatch, device, dim):
    """One program a row: past CUDA's 2^31 - 1 programs of a grid's first axis (a narrow softmax over many rows) a
    launch failed in Triton's launcher. Runs of whole causal matrices now, checked with the limit lowered to 7
    rows: the causal (4, 5) matrices go 4 rows a launch, so each row keeps its own mask; forward and backward,
    the rows unit-strided (dim -1) or moved (dim 0)."""
    x = torch.randn(3, 4, 5, device=device, requires_grad=True)
    causal = dim == -1
    expected = kernels.softmax(x, dim, causal=causal)
    grad = torch.randn_like(expected)
    (expected_dx,) = torch.autograd.grad(expected, x, grad)
    monkeypatch.setattr(softmax_module, "MAX_ROWS", 7)
    launches = _count_launches(monkeypatch)
    got = kernels.softmax(x, dim, causal=causal)
    (dx,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, expected) and torch.equal(dx, expected_dx)
    assert launches == ([(4,), (4,), (4,)] if causal else [(7,), (7,), (6,)]) * 2  # 12 rows, or 20 of 3


def test_softmax_causal_matrix_taller_than_a_grid_raises(monkeypatch, device):
    monkeypatch.setattr(softmax_module, "MAX_ROWS", 3)
    launches = _count_launches(monkeypatch)
    with pytest.raises(ValueError, match="causal over 4 query rows"):
        kernels.softmax(torch.randn(2, 4, 5, device=device), -1, causal=True)
    assert not launches
