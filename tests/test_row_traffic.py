"""Counted bytes of the row kernels (softmax, layer/RMS norm and their residual variants) against the IO minimum,
at the hidden sizes of real models and at wide rows: ``benchmarks/counting.py`` counts every load and store the
interpreter executes.

The minimum: every input element read once and every output element written once (fp32 mean/rstd included: the
forward saves them for the backward, which reads them). Rows wider than a one-block kernel holds on chip
(softmax > ``MAX_BLOCK``, norms > their one-block limits) need two reads of their inputs: that is their minimum.

What the minimum cannot count, and the tests bound per launch: the norms read weight (and bias) once per program
(``programs`` of the launch: about 8 per SM forward, 2 backward on a GPU, 4 under the interpreter), and the
backward's deterministic dweight/dbias reduction writes one fp32 partial row per program and reads it back. Their
share is programs / rows: on an H100 (132 SMs) with 16k rows (8 x 2048 tokens), 264 backward programs give the
fp16 layer norm's partials ~4% of its traffic; the representative test below runs 64 rows per program.
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
OPS = ("softmax", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
DTYPE = torch.float16
BACKWARD_BOUND = 1.05


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


def _programs(op, rows, n, backward):
    """The norm launch's program count (each reads the parameters once; backward ones write a partial row)."""
    if op == "softmax":
        return 0
    if backward:
        return norm_module._row_split(rows, torch.device("cpu"), norm_module.BACKWARD_PROGRAMS_PER_SM)[0]
    runs = norm_module._multi_row(n) or _two_reads(op, n, False)
    return norm_module._row_split(rows, torch.device("cpu"), norm_module.FORWARD_PROGRAMS_PER_SM)[0] if runs else rows


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
    # the stats read, and their zero gradients the autograd layer materialises (4 B a row each)
    stats = 2 * rows * 4 * n_params
    # the weight, once per program; dweight/dbias: the reduced fp32 row written and cast to the parameter dtype
    finish = n_params * n * (4 + 4 + DTYPE.itemsize)
    weight_reads = 2 if _two_reads(op, n, True) else 1  # once per pass
    return (reads + stats + row + finish + _chunk_scalars(op, rows, n, True),
            weight_reads * n * DTYPE.itemsize + n_params * n * 4 * 2)


def _count(op, rows, n, backward):
    x, residual, params = _inputs(op, rows, n, backward)
    if not backward:
        with counting() as counts:
            _call(op, x, residual, params)
        return counts
    outs = _call(op, x, residual, params)
    grads = [torch.randn_like(t) for t in outs]
    with counting() as counts:
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


@pytest.mark.parametrize("op", OPS)
def test_backward_at_64_rows_a_program_is_within_five_percent_of_the_minimum(op):
    rows, n = 256, 768
    assert _programs(op, rows, n, True) in (0, rows // 64)
    counts = _count(op, rows, n, backward=True)
    assert counts.bytes <= BACKWARD_BOUND * _backward_bytes(op, rows, n)[0]
