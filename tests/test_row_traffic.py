"""Counted bytes of the row kernels (softmax, layer/RMS norm and their residual variants) against the IO minimum,
at the hidden sizes of real models and at wide rows: ``benchmarks/counting.py`` counts every load and store the
interpreter executes, and (``rereads=True``) which loads re-read an address their launch had already loaded.

The minimum: every input element read once and every output element written once (fp32 mean/rstd included: the
forward saves them for the backward, which reads them). Rows wider than a one-block kernel holds on chip
(softmax > ``MAX_BLOCK``, norms > their one-block limits) need two reads of their inputs: that is their minimum.
Every hidden size (768 to 8192) is one block both ways: read once.

What the minimum cannot count, and the tests bound per launch: the norms read weight (and bias) once per program
(a persistent grid: forward, as many programs per SM as its registers hold, up to 8, 2 at 8192; backward, 16-warp
programs, narrow rows taken several at a time; 4 programs under the interpreter), and the backward's
deterministic dweight/dbias reduction writes one fp32 partial row per program and reads it back.

- The parameters' reads after a launch's first are re-reads of a few KiB that every program shares: a GPU serves
  them from L2, so the compulsory traffic (each address once a launch) of the forward is exactly the minimum,
  1.0x, at every hidden size. The issued loads add programs / rows of the parameters: in fp16 at 4096 rows on a
  132-SM GPU, +1.6% (add_rms_norm) to +6.2% (layer_norm) at 8192, up to +25% at 768-2048 (8 small programs per
  SM), all from L2.
- The partial rows are compulsory (each program writes its own; the reduction is a second launch). The backward
  runs one program per SM unless their share would pass 5% of the minimum (``PARTIAL_SHARE``), down to half the
  SMs: at 4096 rows on 132 SMs every op is within 1.05x (fp16 layer norm on 76 programs, +4.9%; RMS norm one a SM,
  +4.2%). ``make gpu-check`` times the one-per-SM backward beside it, for a GPU to tell whether the fewer programs
  cost bandwidth.
"""
import importlib

import pytest
import torch

import kernels
from benchmarks.counting import counting

norm_module = importlib.import_module("kernels.layernorm")
softmax_module = importlib.import_module("kernels.softmax")  # (kernels.softmax is the function)

HIDDEN_SIZES = (768, 1024, 2048, 4096, 5120, 8192)
WIDE_ROWS = (16384, 65536)
NORM_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
OPS = ("softmax",) + NORM_OPS
DTYPE = torch.float16
BACKWARD_BOUND = 1.05
GPU_SMS = 132
"""An H100/H200: the GPU whose program count the hidden-size tests reproduce, rows a program."""
GPU_ROWS = 4096
"""The benchmark's rows (``benchmarks/example/gpu_check_h200.md``)."""
INTERPRETER_PROGRAMS = norm_module.INTERPRETER_PROGRAMS
"""The persistent grid under the interpreter (``_row_split``)."""


def _inputs(op, rows, n, grad):
    """x, residual (the add_ variants) and the parameters. The residual is not a leaf that wants a gradient: x and
    the residual receive the same dh, and autograd would copy it for a second leaf (in a model both are
    activations, no copy)."""
    x = torch.randn(rows, n, dtype=DTYPE, requires_grad=grad)
    params = [torch.randn(n, dtype=DTYPE, requires_grad=grad) for _ in range(2 if "layer" in op else 1)]
    residual = torch.randn(rows, n, dtype=DTYPE) if op.startswith("add_") else None
    return x, residual, params


def _call(op, x, residual, params):
    """The op's outputs as a tuple (y, or y and the new residual h)."""
    n = x.shape[-1]
    if op == "softmax":
        return (kernels.softmax(x),)
    fn = getattr(kernels, op)
    out = fn(x, residual, (n,), *params) if residual is not None else fn(x, (n,), *params)
    return out if isinstance(out, tuple) else (out,)


def _two_reads(op, n, backward):
    """Whether rows of ``n`` take the kernels' two-pass path (inputs read twice)."""
    if op == "softmax":
        return not softmax_module._config(n)[1]
    return not norm_module._config(n, backward=backward)[1]


def _share_of(op, n, backward):
    """The backward's (row bytes, partial bytes a program) that cap its programs (every parameter wants a
    gradient here); None for a forward."""
    if not backward:
        return None
    return norm_module._backward_bytes(n, DTYPE.itemsize, "rms" in op, op.startswith("add_"),
                                       2 if "layer" in op else 1)


def _programs(op, rows, n, backward):
    """The norm launch's program count (each reads the parameters once; backward ones write a partial row)."""
    if op == "softmax":
        return 0
    _, single, _, multi_row, per_sm, _ = norm_module._plan(n, backward, 32)
    if not backward and single and not multi_row:
        return rows
    return norm_module._row_split(rows, torch.device("cpu"), per_sm, _share_of(op, n, backward))[0]


def _gpu_rows_per_program(op, n, backward):
    """Rows a norm program takes at GPU_ROWS rows on a GPU of GPU_SMS SMs (the launch's programs per SM at n, the
    backward's capped by its partials' share)."""
    slots = norm_module._plan(n, backward, 32)[4] * GPU_SMS
    if backward:
        slots = norm_module._backward_programs(GPU_ROWS, slots, *_share_of(op, n, backward))
    return norm_module._split_rows(GPU_ROWS, slots)[1]


def _chunk_scalars(op, rows, n, backward):
    """Bytes of the per-row fp32 scalars two-pass norm rows read again at each chunk (pass 2's mean/rstd; the
    backward's pass 1 also adds its chunk's c1, c2 into the (rows, 2) scratch): under 0.5% of those rows."""
    if op == "softmax" or not _two_reads(op, n, backward):
        return 0
    chunks = -(-n // norm_module.LONG_BLOCK)
    stats = 4 * (2 if "layer" in op else 1)
    if not backward:
        return rows * chunks * stats
    # stats read in both passes (the minimum counts one read), c1/c2 stored per chunk, read back after the first
    # and in pass 2
    return rows * (chunks * (2 * stats + 8 + 8) + (chunks - 1) * 8 - stats)


def _forward_bytes(op, rows, n):
    """(minimum, what each program adds): x (and residual) read, y (and h) written, fp32 stats; parameters."""
    row = rows * n * DTYPE.itemsize
    streams = 2 if op.startswith("add_") else 1
    # two-pass rows read h back in pass 2: from H when it was written (one stream instead of x and residual)
    reads = streams * row + (row if _two_reads(op, n, False) else 0)
    stats = 0 if op == "softmax" else rows * 4 * (2 if "layer" in op else 1)
    params = 0 if op == "softmax" else n * DTYPE.itemsize * (2 if "layer" in op else 1)
    return reads + streams * row + stats + _chunk_scalars(op, rows, n, False), params


def _backward_bytes(op, rows, n):
    """(minimum, partial-reduction bytes per program): softmax reads y and dy, writes dx; a norm reads h, dy
    (and the new residual's gradient), the stats, the weight, writes dh and the parameters' gradients. Each
    backward program writes a fp32 partial row per parameter, read back by the reduction."""
    row = rows * n * DTYPE.itemsize
    incoming = 2 if op.startswith("add_") else 1  # dy, and dh for the residual variants
    # two-pass rows read y (h) and dy again in pass 2 (the residual's dh only there)
    reads = (1 + incoming) * row + (2 * row if _two_reads(op, n, True) else 0)
    if op == "softmax":
        return reads + row, 0
    n_params = 2 if "layer" in op else 1
    # the stats read (4 B a row each); the eager autograd layer materialises no zero gradients for them
    stats = rows * 4 * n_params
    # the weight, once per program; dweight/dbias: the reduced fp32 row written and cast to the parameter dtype
    finish = n_params * n * (4 + 4 + DTYPE.itemsize)
    weight_reads = 2 if _two_reads(op, n, True) else 1  # once per pass
    return (reads + stats + row + finish + _chunk_scalars(op, rows, n, True),
            weight_reads * n * DTYPE.itemsize + n_params * n * 4 * 2)


def _count(op, rows, n, backward, rereads=False):
    x, residual, params = _inputs(op, rows, n, backward)
    if not backward:
        with counting(rereads) as counts:
            _call(op, x, residual, params)
        return counts
    outs = _call(op, x, residual, params)
    grads = [torch.randn_like(t) for t in outs]
    with counting(rereads) as counts:
        torch.autograd.backward(outs, grads)
    return counts


@pytest.mark.parametrize("n", HIDDEN_SIZES + WIDE_ROWS)
@pytest.mark.parametrize("op", OPS)
def test_forward_moves_exactly_the_minimum(op, n):
    """1.0x: every element read and written once (twice read for wide rows), the parameters once per program."""
    rows = 6
    minimum, per_program = _forward_bytes(op, rows, n)
    counts = _count(op, rows, n, backward=False)
    assert counts.triton_launches == 1 and counts.aten_ops == 0
    assert counts.bytes == minimum + _programs(op, rows, n, False) * per_program


@pytest.mark.parametrize("n", HIDDEN_SIZES + WIDE_ROWS)
@pytest.mark.parametrize("op", OPS)
def test_backward_moves_the_minimum_plus_the_partials_of_its_programs(op, n):
    """Everything beyond the minimum is the per-program weight read and fp32 partial rows; at the launch's
    program count that share is programs / rows, <= 5% at 64 rows a program (next test)."""
    rows = 6
    minimum, per_program = _backward_bytes(op, rows, n)
    counts = _count(op, rows, n, backward=True)
    assert counts.triton_launches == 1
    assert counts.bytes == minimum + _programs(op, rows, n, True) * per_program


@pytest.mark.parametrize("n", HIDDEN_SIZES)
@pytest.mark.parametrize("op", NORM_OPS)
def test_hidden_size_forward_moves_exactly_the_minimum_from_memory(op, n):
    """1.0x compulsory traffic at the rows a program takes on the GPU (module doc): each row read and written
    once, weight and bias once a launch; every other program's parameter read is a re-read (from L2 on a GPU)."""
    rows = INTERPRETER_PROGRAMS * _gpu_rows_per_program(op, n, backward=False)
    assert not _two_reads(op, n, False) and _programs(op, rows, n, False) == INTERPRETER_PROGRAMS
    minimum, params = _forward_bytes(op, rows, n)
    counts = _count(op, rows, n, backward=False, rereads=True)
    assert counts.bytes == minimum + INTERPRETER_PROGRAMS * params
    assert counts.reread == (INTERPRETER_PROGRAMS - 1) * params
    assert counts.compulsory == minimum + params


@pytest.mark.parametrize("n", HIDDEN_SIZES)
@pytest.mark.parametrize("op", NORM_OPS)
def test_hidden_size_backward_is_within_five_percent_of_the_minimum(op, n):
    """h and dy read once at every hidden size (the old 5120- and 8192-wide backward read them twice, 1.67x); at
    the rows a program takes at 4096 rows on the GPU, the partial rows (and the weight, read once from memory)
    keep it within 1.05x of the minimum."""
    rows = INTERPRETER_PROGRAMS * _gpu_rows_per_program(op, n, backward=True)
    assert not _two_reads(op, n, True) and _programs(op, rows, n, True) == INTERPRETER_PROGRAMS
    minimum, per_program = _backward_bytes(op, rows, n)
    weight = n * DTYPE.itemsize
    counts = _count(op, rows, n, backward=True, rereads=True)
    assert counts.bytes == minimum + INTERPRETER_PROGRAMS * per_program
    assert counts.reread == (INTERPRETER_PROGRAMS - 1) * weight
    assert counts.compulsory <= BACKWARD_BOUND * (minimum + weight)  # a perfect backward reads the weight once


def test_backward_programs_keep_the_partials_within_their_share_or_half_the_gpu(monkeypatch):
    """At 4096 fp16 rows on 132 SMs layer norm's backward drops to 76 programs and RMS norm keeps 132; with few
    rows the cap stops at half the SMs; without a share (``PARTIAL_SHARE = None``) one program per SM."""
    layer, rms = (norm_module._backward_bytes(1024, 2, rms, False, 2 - rms) for rms in (False, True))
    assert norm_module._backward_programs(GPU_ROWS, GPU_SMS, *layer) == 76
    assert norm_module._backward_programs(GPU_ROWS, GPU_SMS, *rms) == GPU_SMS
    assert norm_module._backward_programs(256, GPU_SMS, *layer) == GPU_SMS // 2
    monkeypatch.setattr(norm_module, "PARTIAL_SHARE", None)
    assert norm_module._backward_programs(GPU_ROWS, GPU_SMS, *layer) == GPU_SMS


@pytest.mark.parametrize("n", (768, 5120, 8192))
@pytest.mark.parametrize("op", OPS)
def test_backward_at_64_rows_a_program_is_within_five_percent_of_the_minimum(op, n):
    """Against the one-read minimum: within 5% wherever a hidden size's rows give a program 64 rows."""
    rows = 4 * 64
    assert _programs(op, rows, n, True) in (0, rows // 64) and not _two_reads(op, n, True)
    counts = _count(op, rows, n, backward=True)
    assert counts.bytes <= BACKWARD_BOUND * _backward_bytes(op, rows, n)[0]
