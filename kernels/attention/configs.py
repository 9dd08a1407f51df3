"""Launch configurations of the attention kernels: tile tables per GPU family, autotuning, the launch itself, and
the GPU builds they declare.

A launch takes, in order: the config forced by ``kernels.registry.use_config`` (tests, benchmarks, the GPU
check), else on a GPU the autotuner over its family's table, else (interpreted) :data:`INTERPRETER_TILE`.

TMA (Hopper and Blackwell): on :data:`TMA_FAMILIES` the fp16/bf16 autotune lists hold every tile twice, first
with its streamed tiles read through tensor descriptors (``TMA=True``: UTMALDG in SASS), then through pointers,
and the autotuner picks; the default is the table's first tile on TMA. A launch runs TMA only where the plan
found its tensors legal for it (:func:`tma_legal`); a forced ``TMA=True`` (``use_config``) is dropped otherwise.
"""
import functools
import threading
from typing import Dict, List, Tuple, Union

import torch
import triton
from triton.errors import TritonError
from triton.runtime import _allocation  # Triton's allocator slot (a ContextVar), which has no public getter

from kernels import _direct, _runtime
from kernels._direct import DirectLaunches
from kernels.attention import mods
from kernels.attention.block_mask import result_kind_error
from kernels.attention.kernels import (MASK_BLOCK, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd,
                                      _dropout_mask)
from kernels.registry import TRITON_DTYPES, Build, declare, forceable, forced_config, register_builds

Family = Union[int, str]
"""A GPU family: compute capability x 10 (80, 90, 100) or an AMD target name ("gfx942")."""
Tile = Tuple[int, int, int, int]
"""(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
MAX_HEAD_DIM = 256
MAX_PROGRAMS = 2**31 - 1
"""CUDA's limit on a grid's first axis; every attention grid is one-dimensional."""

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU family and padded head dim, autotuned on a GPU per (head dim,
# dtype, causal, precision, length bucket). BLOCK_N is the streamed (inner) block of the forward and dQ, BLOCK_M
# that of dK/dV. fp16/bf16 entries use the tensor cores (HMMA on sm_80, HGMMA on sm_90 where the tile allows,
# tcgen05 UTCHMMA on sm_100, v_mfma on gfx942). Each table's first entry (the default, what a GPU runs first)
# compiles with no register spill on its family's target (ptxas -v / amdgcn metadata, triton 3.8 and 3.9) for the plain
# kernel and for every specialisation that shares the table (window, chunk, softcap, ALiBi, sinks, varlen). Hence the
# sm_80 forward at d64 takes 128x64 on 8 warps (on 4 warps, and at 64x64, ptxas spills a few bytes); dK/dV at d128
# and d256 takes 8 warps (on 4, its two fp32 accumulators and the K/V tiles spill 30-150 B); the forward at d256
# takes 64x32 (64x64 spills with softcap on sm_90). Later entries are candidates for the autotuner; the full build
# report lists their spills. Every table holds a tile whose grid block (BLOCK_M of the forward and dQ, BLOCK_N of
# dK/dV) is at most SHORT_BLOCK: sequences of up to SHORT_LENGTH tokens autotune over those only (:func:`prune`).
#
# sm_100 (Blackwell): tcgen05 MMA (UTCHMMA in SASS) wherever both dims of a dot's output tile are 64 or more
# (64 or 128 rows, 4 or 8 warps; 16 warps and 32-row tiles fall back to HMMA). Its forward at d64 takes 128x64 on
# 8 warps (on 4, 40 B spill; 128x128 spills 400 B); at d256 64x32 (128x32 spills 16-96 B with a window or a mask
# mod). dK/dV takes one stage (d64 32x128 on two spills 48 B with ALiBi; d128 16x64 8-48 B with ALiBi or varlen,
# 32x64 none); at d256 every tcgen05 tile tried spills (16x64: 112 B, 32x64: 328 B), so it keeps sm_90's 16x32
# (HMMA). dQ at d256 takes 64x16 (tcgen05; sm_90's 32x32 is HMMA).
# gfx942 (MI300, wave64, 64 KiB of LDS): the streamed block is 16 wide. With 32 or more, every fp16 forward, dQ
# and dK/dV tried spills SGPRs (5-120, past the 106 a wave may hold: the key-block addresses are scalar) and the
# larger ones VGPRs into scratch too (128x64 d128 on 8 warps: 68); at 16 none spills, with 16x16x16 v_mfma.
# One stage (no LDS double buffer) except the d64 forward, whose two stages still fit 106 SGPRs.
_DKDV_TILES = {64: [(32, 128, 8, 2), (16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3)],
               128: [(16, 64, 8, 1), (32, 64, 8, 2), (16, 128, 8, 2), (16, 64, 4, 1)],
               256: [(16, 32, 8, 1)]}
_DQ_TILES = {64: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
             128: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
             256: [(32, 32, 4, 1)]}
_SM100_DKDV = {64: [(32, 128, 8, 1), (16, 64, 4, 2), (16, 128, 8, 2), (32, 64, 4, 2)],
               128: [(32, 64, 8, 1), (16, 64, 8, 1), (16, 128, 8, 1), (16, 64, 4, 1)],
               256: [(16, 32, 8, 1)]}
AMD = "gfx942"
"""The AMD family (MI300's target); every AMD GPU runs its tables (they fit any CDNA part's 64 KiB of LDS)."""
_CONFIGS = {
    "fwd": {
        80: {64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3), (64, 64, 8, 3)],
             128: [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
             256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]},
        90: {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)],
             128: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2)],
             256: [(64, 32, 8, 2), (64, 64, 8, 2)]},
        100: {64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
              128: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3)],
              256: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)]},
        AMD: {64: [(128, 16, 4, 2), (128, 16, 4, 1), (64, 16, 4, 1), (256, 16, 8, 1)],
              128: [(128, 16, 4, 1), (128, 16, 8, 1), (64, 16, 4, 1)],
              256: [(64, 16, 4, 1), (64, 16, 8, 1), (32, 16, 4, 1)]},
    },
    "dkdv": {80: _DKDV_TILES, 90: _DKDV_TILES, 100: _SM100_DKDV,
             AMD: {64: [(16, 64, 4, 1), (32, 64, 4, 1)], 128: [(16, 64, 4, 1), (16, 64, 8, 1), (16, 32, 4, 1)],
                   256: [(16, 32, 8, 1), (16, 16, 4, 1)]}},
    "dq": {80: _DQ_TILES, 90: _DQ_TILES, 100: {**_DQ_TILES, 256: [(64, 16, 8, 1), (64, 32, 8, 1)]},
           AMD: {64: [(64, 16, 4, 1), (32, 16, 4, 1)], 128: [(64, 16, 4, 1), (32, 16, 4, 1)],
                 256: [(32, 16, 4, 1), (16, 16, 4, 1)]}},
}
FP32 = "fp32"
"""The :data:`_FIRST` key of the fp32 tables (shared by the NVIDIA families; ``(FP32, family)`` for one family's)."""
NVIDIA = (80, 90, 100)
FAMILIES = tuple(_CONFIGS["fwd"])
"""The GPU families with tables of their own: compute capability x 10 (80, 90, 100) or an AMD target name."""
SHORT_LENGTH, SHORT_BLOCK = 1024, 64
# IEEE fp32 dot products run on the FMA units, whose operands live in registers: only small tiles fit, and ptxas
# often settles on 64-128 registers and spills a few bytes rather than use more. First entries are held to the
# same bar as above, for every specialisation on sm_80 and sm_90 (dropout's dK/dV: see below). dK/dV d64 16x64 w8
# s1 takes 110-128 registers on sm_80 and 93-107 on sm_90 (32x32 w8 s2, clean with dropout, spills 12-32 B on sm_90
# without it); d128 16x32 w4 s1 191-202 / 165-168. dK/dV d256 16x16 w4 s1, dQ d128 32x16 w8 s2 and dQ d256 16x16
# w8 s1 are spill-free too. TF32 (opt-in) uses the same tables. gfx942 has its own: its forward and dQ at d64 on
# 32x32 w8 s2 spill 22 / 1 SGPRs, dQ d256 16x16 on 8 warps 114 VGPRs; 32x16 and 4 warps spill nothing.
_NVIDIA_FP32 = {
    "fwd": {64: [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)], 128: [(16, 32, 8, 2), (16, 16, 4, 2)],
            256: [(16, 16, 4, 2)]},
    "dkdv": {64: [(16, 64, 8, 1), (32, 32, 8, 2), (16, 32, 8, 2)],
             128: [(16, 32, 4, 1), (16, 32, 8, 1), (32, 32, 8, 1)], 256: [(16, 16, 4, 1), (16, 16, 8, 1)]},
    "dq": {64: [(32, 32, 8, 2), (16, 32, 4, 2)], 128: [(32, 16, 8, 2), (16, 32, 8, 2)],
           256: [(16, 16, 8, 1), (32, 16, 8, 1)]},
}
_FP32_CONFIGS = {
    "fwd": {AMD: {64: [(32, 16, 4, 1), (64, 16, 4, 1)], 128: [(16, 32, 8, 2), (32, 16, 4, 1)],
                  256: [(16, 16, 4, 2), (16, 16, 4, 1)]}},
    "dkdv": {AMD: {64: [(16, 64, 8, 1), (16, 32, 4, 1)], 128: [(16, 32, 4, 1), (16, 16, 4, 1)],
                   256: [(16, 16, 4, 1)]}},
    "dq": {AMD: {64: [(32, 16, 4, 1), (32, 32, 8, 2)], 128: [(32, 16, 8, 2), (32, 16, 4, 1)],
                 256: [(16, 16, 4, 1)]}},
}
for _kernel, _table in _NVIDIA_FP32.items():
    _FP32_CONFIGS[_kernel].update(dict.fromkeys(NVIDIA, _table))
# The forward with dropout draws Philox bits for every score of its tile, which needs registers of their own: its
# fp16/bf16 tiles are smaller on NVIDIA GPUs (the plain d64 default spills ~1 KB on sm_80 with dropout). Same bar
# as above. gfx942's own 16-wide tiles are small enough already; sm_100 at d256 takes 64x32 (tcgen05, 195
# registers) where the 32-row tile would fall back to HMMA.
_NVIDIA_DROPOUT_FWD = {64: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
                       128: [(64, 32, 4, 3), (64, 64, 8, 3)],
                       256: [(32, 32, 4, 2)]}
# sm_90's d64 takes 64x64 on 8 warps (168 / 188 registers with triton 3.8 / 3.9): on 4, triton 3.9 spills 8 B (3.8
# fits it in 252).
_DROPOUT_FWD_TILES = {80: _NVIDIA_DROPOUT_FWD, 90: {**_NVIDIA_DROPOUT_FWD, 64: [(64, 64, 8, 3), (64, 64, 4, 3),
                                                                             (128, 64, 8, 3), (64, 32, 4, 3)]},
                      100: {**_NVIDIA_DROPOUT_FWD, 256: [(64, 32, 8, 2), (32, 32, 4, 2)]}, AMD: _CONFIGS["fwd"][AMD]}
# A specialisation whose registers overflow its table's first entry starts from its own, then tries the rest of
# the table: {(specialisation, kernel, head dim): {family (fp16/bf16), FP32 or (FP32, family): tile}}. Same bar as
# above, measured with the specialisation on (fp16 and bf16 alike). Dropout's Philox bits: the fp32 dK/dV defaults
# spill with dropout (d64: 56 B on sm_80 and sm_90; d128: 80 B on sm_90); d64 32x32 w8 s2 (128 / 104 registers on
# sm_80 / sm_90), d128 32x16 w4 s1 (218 / 168) do not. A mask mod (the document mask: ids loaded and compared in
# partial cells) takes 40-70 registers more than the plain kernel: the sm_90 forward at d64 on 4 warps spills
# 116 B (on 8: 194 registers); dK/dV d64 32x128 w8 s2 spills 64 B on sm_80 (16x128: 202 / 181 registers), fp32
# 16x64 w8 s1 80 / 8 B (16x32 w4 s1: 163 / 128) and fp32 d256 16x16 w4 s1 352 B on sm_80 (on 8 warps: 210; those
# spill 56 B on sm_90, where 4 warps take 238); dQ d256 32x32 w4 s1 76 B on sm_80 (on 8 warps: 184 / 152). On
# sm_100 the shared fp32 firsts spill with a mask mod (forward d64 24 B, dK/dV d128 72 B), varlen (dK/dV d64 16 B,
# d256 96 B) or a score mod (dQ d128 8 B); the entries for (FP32, 100) below do not. fp32 softcap's tanh series
# (kernels._tanh) makes sm_80's fp32 dQ d64 on 32x32 w8 s2 (held to 64 registers) spill 8 B; 16x32 w4 s2 does not
# with triton 3.8 but does with 3.9 (8 B), where 16x32 w8 s2 takes 72-74 registers with either, a score mod too.
# On sm_100 (triton 3.8, at 75788c3) the shared fp32 firsts spilled with a score mod (dK/dV d128 16x32 w4 s1: 16 B)
# and ALiBi (dQ d128 32x16 w8 s2: 24 B); 16x32 w8 s1 and 16x32 w8 s2 do not. On sm_80 (triton 3.8) fp32 dQ spilled
# with a softcap (d64 16x32 w8 s2: 24 B) and a score mod (d128 32x16 w8 s2: 8 B); 16x16 w4 s2 and 16x32 w8 s2
# do not. fp32 dK/dV d256 with dropout on sm_80: 16x16 w4 s1 128 B, w8 16 B, 32x16 w8 s1 none; d64 with dropout
# 32x32 w8 s2 8 B (16x32 w8 s2: 40 B, 32x16 w4 s1: 8 B, 32x16 w8 s1: 16 B), on one stage none (107 registers).
# On sm_90 (triton 3.8, at 7692700) the shared fp32 forward firsts spilled with a window, ALiBi or dropout at d128
# (16x32 w8 s2: 8 / 12 / 24 B; 32x16 w8 s2: 75-79 registers, none, and half the key loads of 16x16 w4 s2, also
# clean), sinks at d256 (16x16 w4 s2: 8 B; on 8 warps 80 registers) and a score mod at d64 (32x32 w8 s2: 28 B;
# 16x64 w8 s2: 79 registers); its dQ d128 with a mask mod on 32x16 w8 s2 (16 B; 16x32 w8 s2: 93 registers).
# sm_100's dK/dV d64 with a score mod spills 100 B on one stage, none on two. On gfx942 fp32 dK/dV d256 spills
# SGPRs (into VGPR lanes, no scratch) on 16x16 w4 s1 with a mask mod (2 at 75788c3, 19 at 7692700), a window (4),
# chunk (12), softcap (4) or dropout (16), where the plain kernel takes 100 of the 106 a wave may hold (its
# arguments' addresses and strides are scalars); every other tile tried spills more (w8 and 16x32 / 32x16: 95-124
# VGPRs into scratch, w2 and two stages 39-200): the gfx942 family's defaults off its bar. Triton 3.9 spills where
# 3.8 did not: fp32 dK/dV d128 with a mask mod on sm_80 (16x32 w4 s1: 160 B; w8: 172 registers, none), fp32 dK/dV
# d256 varlen on sm_90 (16x16 w4 s1: 112 B; w8: 106 registers) and the fp32 d128 forward with a chunk on gfx942
# (16x32 w8 s2: 13 SGPRs; 32x16 w4 s1: none). Every first above but the sm_90 ones measured at 7692700 and sm_80's
# dropout d64 (triton 3.8 only) is spill-free with both.
_FIRST = {
    ("dropout", "dkdv", 64): {FP32: (32, 32, 8, 2), (FP32, 80): (32, 32, 8, 1)},
    ("dropout", "fwd", 128): {(FP32, 90): (32, 16, 8, 2)},
    ("window", "fwd", 128): {(FP32, 90): (32, 16, 8, 2)},
    ("alibi", "fwd", 128): {(FP32, 90): (32, 16, 8, 2)},
    ("sinks", "fwd", 256): {(FP32, 90): (16, 16, 8, 2)},
    ("score_mod", "fwd", 64): {(FP32, 90): (16, 64, 8, 2)},
    ("mask_mod", "dq", 128): {(FP32, 90): (16, 32, 8, 2)},
    ("dropout", "dkdv", 128): {FP32: (32, 16, 4, 1)},
    ("dropout", "dkdv", 256): {(FP32, 80): (32, 16, 8, 1)},
    ("mask_mod", "fwd", 64): {90: (128, 64, 8, 3), (FP32, 100): (16, 32, 4, 2)},
    ("mask_mod", "dkdv", 64): {80: (16, 128, 8, 2), FP32: (16, 32, 4, 1)},
    ("mask_mod", "dkdv", 128): {(FP32, 80): (16, 32, 8, 1), (FP32, 100): (16, 32, 8, 1)},
    ("mask_mod", "dkdv", 256): {(FP32, 80): (16, 16, 8, 1)},
    ("mask_mod", "dq", 256): {80: (32, 32, 8, 1), 90: (32, 32, 8, 1)},
    ("varlen", "dkdv", 64): {(FP32, 100): (32, 32, 8, 2)},
    ("varlen", "dkdv", 256): {(FP32, 90): (16, 16, 8, 1), (FP32, 100): (16, 16, 8, 1)},
    ("score_mod", "dq", 64): {(FP32, 80): (16, 32, 8, 2)},
    ("score_mod", "dq", 128): {(FP32, 80): (16, 32, 8, 2), (FP32, 100): (16, 32, 8, 2)},
    ("score_mod", "dkdv", 64): {100: (32, 128, 8, 2)},
    ("score_mod", "dkdv", 128): {(FP32, 100): (16, 32, 8, 1)},
    ("softcap", "dq", 64): {(FP32, 80): (16, 16, 4, 2)},
    ("chunk", "fwd", 128): {(FP32, AMD): (32, 16, 4, 1)},
    ("alibi", "dq", 128): {(FP32, 100): (16, 32, 8, 2)},
}
TMA_FAMILIES = (90, 100)
"""The families whose fp16/bf16 tables run each tile on tensor descriptors first (TMA needs compute capability 9.0
or later; every such GPU runs one of these families' tables)."""
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TMA_ALIGN = 16  # bytes: a descriptor's base address and every stride but the last (the hardware's rule)
# TMA's own first entries, where a table's first spills on tensor descriptors (its pointer build does not): the TMA
# list starts from these, then the table's (the pointer list is the table's as is). {(specialisation, kernel, head
# dim): {family: tile}}; ("*", kernel, head dim) stands for every specialisation without a key of its own. Same bar
# as above, fp16 and bf16, TMA on (triton 3.8). sm_100's d256 forward on 64x32 w8 s2 is held to 128 registers and
# spills 20-40 B (plain, softcap, ALiBi, sinks, varlen, score mod); 64x64 w8 s2 takes 134 and spills none. sm_90's
# d256 dropout forward on its 32x32 w4 (HMMA) spills 336 B; 64x32 w8 s2 none, on wgmma. dQ with dropout: sm_90 d128
# 64x64 w8 s2 spills 68 B (64x32 w4 s2 none), sm_100 d64 8 B (64x32 w4 s2 none); with a chunk sm_100 d64 32 B
# (64x32 w4 s2 none); with a softcap (its hidden scores' tanh zeroed, 75788c3) sm_100 d64 8 B (64x32 w4 s2 none).
# Every other TMA default compiles spill-free on its table's first tile. Triton 3.9 adds two:
# sm_100's dQ d128 varlen on 64x64 w8 s2 spills 12 B (on 4 warps none), and dK/dV d256 with a mask mod on 16x32
# w8 s1 spills 52 B on sm_90 and sm_100 (32x16 w8 s1: 252 / 198 registers with 3.9, 172 / 160 with 3.8); every
# entry here is spill-free with both.
_TMA_FIRST = {
    ("*", "fwd", 256): {100: (64, 64, 8, 2)},
    ("dropout", "fwd", 256): {90: (64, 32, 8, 2)},
    ("dropout", "dq", 64): {100: (64, 32, 4, 2)},
    ("chunk", "dq", 64): {100: (64, 32, 4, 2)},
    ("softcap", "dq", 64): {100: (64, 32, 4, 2)},
    ("dropout", "dq", 128): {90: (64, 32, 4, 2)},
    ("varlen", "dq", 128): {100: (64, 64, 4, 2)},
    ("mask_mod", "dkdv", 256): {90: (32, 16, 8, 1), 100: (32, 16, 8, 1)},
}
KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_GRID_BLOCK = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}  # the block the grid tiles
_GRID_INDEX = {kernel: ("BLOCK_M", "BLOCK_N").index(name) for kernel, name in _GRID_BLOCK.items()}
INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32}
"""Interpreted launches' tile: autotuning needs a GPU; small tiles keep the interpreter quick and still exercise
multi-block paths at small lengths."""
DELTA_BLOCK_M, DELTA_WARPS = 64, 8  # 4 warps spill 8-20 B on sm_100 (ptxas-blackwell); 8 spill nowhere
DROPOUT_MASK_TILE = (32, 64)  # the dropout-mask helper: elementwise, one config


def tiles(kernel: str, family: Family, d_bucket: int, fp32: bool, variant: str = "",
          tma: bool = False) -> List[Tile]:
    """The autotune list of ``kernel`` ("fwd", "dkdv", "dq") for a GPU family (:data:`FAMILIES`), padded head dim,
    dtype and specialisation (a :data:`_VARIANTS` name or "": see :func:`specialisation`); its first entry is the
    default. With ``tma``, the list its tensor-descriptor configs run (:data:`_TMA_FIRST`)."""
    if fp32:
        table = _FP32_CONFIGS[kernel][family][d_bucket]
    elif variant == "dropout" and kernel == "fwd":
        table = _DROPOUT_FWD_TILES[family][d_bucket]
    else:
        table = _CONFIGS[kernel][family][d_bucket]
    firsts = _FIRST.get((variant, kernel, d_bucket), {})
    shared = firsts.get(FP32) if family in NVIDIA else None
    first = firsts.get((FP32, family), shared) if fp32 else firsts.get(family)
    if tma:
        first = _TMA_FIRST.get((variant, kernel, d_bucket), _TMA_FIRST.get(("*", kernel, d_bucket), {})).get(
            family, first)
    return table if first is None else [first] + [t for t in table if t != first]


def specialisation(meta: dict, dropout: bool, varlen: bool = False, alibi: bool = False, sinks: bool = False) -> str:
    """The specialisation whose first entry (:func:`tiles`) a launch with compile-time parameters ``meta`` tries
    first (``dropout``, ``varlen``, ``alibi``, ``sinks``: whether it passes a SEED, packed sequences' offsets, ALiBi
    slopes, sink logits): "dropout", else "mask_mod", else "score_mod", else "varlen", else "chunk", else "softcap",
    else "alibi", else "window", else "sinks" (the one with the largest register footprint when several are on),
    else "" (the table's own)."""
    if dropout:
        return "dropout"
    mod = next((name for name in ("mask_mod", "score_mod") if meta.get(name.upper()) is not None), "")
    if mod or varlen:
        return mod or "varlen"
    if meta.get("CHUNKED"):
        return "chunk"
    if meta.get("SOFTCAP") or alibi:
        return "softcap" if meta.get("SOFTCAP") else "alibi"
    return "window" if meta.get("WINDOW") else "sinks" if sinks else ""


def uses_tma(family: Family, fp32: bool) -> bool:
    """Whether ``family``'s autotune lists try tensor-descriptor (TMA) configs, first: fp16/bf16 on
    :data:`TMA_FAMILIES` (fp32's small FMA tiles gain nothing from it)."""
    return family in TMA_FAMILIES and not fp32


def tma_legal(*tensors: torch.Tensor, seq_first: bool = False) -> bool:
    """Whether every one of ``tensors`` (B, H, N, D) may be read and written through per-head (N, D) tensor
    descriptors: a dtype TMA moves, a unit head-dim stride, and 16-byte aligned base and strides (batch and head
    strides only where that dim has more than one entry: a lone index never multiplies its stride). On a GPU
    also compute capability 9.0 or later (the interpreter emulates descriptors anywhere). Shapes, strides and
    addresses only: no device work."""
    first = tensors[0]
    if not _runtime.INTERPRETED and (first.device.type != "cuda" or torch.version.hip
                                     or _runtime.device_capability(first.device)[0] < 9):
        return False
    return all(_tma_layout(t, seq_first) for t in tensors)


def _tma_layout(t: torch.Tensor, seq_first: bool) -> bool:
    """Whether ``t`` (B, H, N, D), or with ``seq_first`` (B, N, H, D), or packed (total, H, D), is laid out for TMA
    (:func:`tma_legal`)."""
    if t.dtype not in TMA_DTYPES or t.stride(-1) != 1 or t.data_ptr() % TMA_ALIGN:
        return False
    size = t.element_size()
    if t.dim() == 3:  # packed sequences (total, H, D): as their (1, H, total, D) view
        (stride_n, stride_h, _), batch, heads, stride_b = t.stride(), 1, t.shape[1], 0
    else:
        batch, heads = t.shape[0], t.shape[2 if seq_first else 1]
        stride_b, stride_1, stride_2 = t.stride()[:3]
        stride_h, stride_n = (stride_2, stride_1) if seq_first else (stride_1, stride_2)
    return ((stride_n * size) % TMA_ALIGN == 0 and (batch == 1 or (stride_b * size) % TMA_ALIGN == 0)
            and (heads == 1 or (stride_h * size) % TMA_ALIGN == 0))


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a kernel builds on the device, from torch's caching allocator on
    the current device (alignment: the allocator's blocks are 512-byte aligned, past the 128 TMA asks)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Give Triton :func:`_scratch` for device-side descriptors unless an allocator is set: once per thread (Triton
    keeps it in a ContextVar), a lookup afterwards. A user's own allocator is left alone."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def flavoured(kernel: str, family: Family, d_bucket: int, fp32: bool, variant: str = "",
              tma: bool = False) -> List[Tuple[Tile, bool]]:
    """(tile, TMA) of a launch's autotune list: with ``tma`` (inputs legal for it) on a family that
    :func:`uses_tma`, every tile on tensor descriptors first (from the TMA first entry), then every tile on
    pointers (:func:`tiles`); else pointers only. Its first entry is the default."""
    pointers = [(tile, False) for tile in tiles(kernel, family, d_bucket, fp32, variant)]
    if not (tma and uses_tma(family, fp32)):
        return pointers
    return [(tile, True) for tile in tiles(kernel, family, d_bucket, fp32, variant, tma=True)] + pointers


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D of a head dim: the power of two >= 16 the kernels' tiles span (masked loads fill the rest)."""
    return max(16, _runtime.next_power_of_2(head_dim))


def d_bucket(head_dim: int) -> int:
    """The table key of a head dim: its padded width, with every width up to 64 sharing the 64 table."""
    block_d = padded_head_dim(head_dim)
    return 64 if block_d <= 64 else block_d


def default_configs(family: Family, dtype: torch.dtype, head_dim: int) -> Dict[str, Dict[str, int]]:
    """{registry kernel name: config} of the config a GPU of ``family`` tries first for these inputs, in the form
    ``kernels.registry.use_config`` takes (e.g. to count interpreted IO with a GPU's tiles); ``TMA`` where the
    family's list starts on tensor descriptors."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    configs = {}
    for kernel in KERNELS:
        (block_m, block_n, warps, stages), tma = flavoured(kernel, family, d_bucket(head_dim), dtype == torch.float32,
                                                           tma=True)[0]
        configs[f"attention_{kernel}"] = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                                              **({"TMA": True} if tma else {}))
    return configs


def device_family(device: torch.device) -> Family:
    """The table family of a GPU: AMD (torch.version.hip) by its gcnArchName, every AMD target running the
    :data:`AMD` tables; NVIDIA by compute capability: 10.x Blackwell (tcgen05), 9.x and later others Hopper's,
    earlier Ampere's. Asked of the driver once per device."""
    return _device_family(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_family(index: int) -> Family:
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]  # "gfx942:sramecc+:xnack-"
        return arch if arch in FAMILIES else AMD
    major, _ = _runtime.device_capability(torch.device("cuda", index))
    return 100 if major == 10 else 90 if major >= 9 else 80


def _length_bucket(n: int) -> int:
    return _runtime.next_power_of_2(max(min(n, 16384), 64))


def prune(kernel: str, table: List[Tile], lengths: Tuple[int, int]) -> List[Tile]:
    """The entries of ``table`` a launch over (query, key) ``lengths`` autotunes over: where the grid's length
    (queries for the forward and dQ, keys for dK/dV) is at most SHORT_LENGTH, only tiles whose grid block is at
    most SHORT_BLOCK (the table's own order kept). Why: a 512-token causal head has 4 row blocks of 128, half their
    key blocks masked, and batch x heads programs too few to fill a GPU; 64-row blocks double the programs and halve
    the wasted diagonal, so no 128-row tile gets picked by a noisy first timing."""
    n = lengths[1] if kernel == "dkdv" else lengths[0]
    grid_block = _GRID_INDEX[kernel]
    short = [t for t in table if t[grid_block] <= SHORT_BLOCK]
    return short if n <= SHORT_LENGTH and short else table


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, family: Family, bucket: int, fp32: bool, variant: str, n_bucket: Tuple[int, int],
           tma: bool = False):
    """An autotuner over this family's configs for a specialisation (:func:`tiles`), pruned for the length bucket
    (:func:`prune`); one per (causal is in the key) bucket of the lengths, so tuning is keyed on bucketed lengths
    (the autotuner itself keys on head dim, causal, window, chunk, softcap, precision, the mods' functions and the
    tensors' dtypes). With ``tma`` (inputs legal for it), the TMA configs too (:func:`flavoured`)."""
    listed = flavoured(kernel, family, bucket, fp32, variant, tma)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TMA": tma}, num_warps=w, num_stages=s)
               for tma in (True, False)
               for bm, bn, w, s in prune(kernel, [tile for tile, on in listed if on == tma], n_bucket)]
    key = ["HEAD_DIM", "CAUSAL", "WINDOW", "CHUNKED", "SOFTCAP", "PRECISION", "MASK_MOD", "SCORE_MOD"]
    return triton.autotune(configs=configs, key=key)(KERNELS[kernel])


def grid(rows: int, heads: int, block: int) -> Tuple[int]:
    """The 1-D grid of cdiv(rows, block) blocks for each of ``heads`` (batch * heads); ValueError past CUDA's
    limit, before anything launches."""
    programs = _runtime.cdiv(rows, block) * heads
    if programs > MAX_PROGRAMS:
        raise ValueError(f"attention: {heads} heads x {rows} rows in blocks of {block} need {programs} programs, "
                         f"more than a GPU grid holds ({MAX_PROGRAMS})")
    return (programs,)


_REGISTRY_NAMES = {kernel: forceable(f"attention_{kernel}", ("BLOCK_M", "BLOCK_N"),
                                     ("TMA", "num_warps", "num_stages")) for kernel in KERNELS}
_INTERPRETED_CONFIG = dict(INTERPRETER_TILE, TMA=False)
"""An interpreted launch's config unless one is forced: the interpreter's tile on pointers."""



def launch(kernel: str, rows: int, heads: int, args: tuple, meta: dict, lengths: Tuple[int, int],
           tma: Tuple[torch.Tensor, ...], dropout: bool = False, seq_first: bool = False,
           varlen: bool = False, alibi: bool = False, sinks: bool = False) -> None:
    """Launch ``kernel`` ("fwd", "dkdv", "dq") with its runtime ``args`` (by position) and compile-time ``meta``
    (by keyword) over cdiv(rows, block) blocks for each of ``heads`` (by ``run(..., grid=...)``, which
    ``kernel[grid](...)`` would call after repacking every argument), autotuned over :func:`tiles` of the launch's
    :func:`specialisation` (``dropout``, ``varlen``, ``alibi``, ``sinks``: whether the launch passes a SEED, packed
    sequences' offsets, ALiBi slopes, sink logits). ``tma``: the tensors the kernel
    streams, judged by :func:`tma_legal` only where a TMA config could run (``seq_first``: they are (B, N, H, D)).
    ValueError, before anything launches, for a forced tile larger than a block mask's cells."""
    try:  # (free unless it raises)
        block = _GRID_BLOCK[kernel]
        forced = forced_config(_REGISTRY_NAMES[kernel])
        if forced is None and _runtime.INTERPRETED:  # the common interpreted launch: nothing to decide
            KERNELS[kernel].run(*args, grid=grid(rows, heads, _INTERPRETED_CONFIG[block]), warmup=False, **meta,
                                **_INTERPRETED_CONFIG)
            return
        if forced is not None:
            if meta.get("MASK_MOD") is not None:
                _check_mask_tile(kernel, forced)
            config = dict(forced)
            config["TMA"] = bool(config.get("TMA")) and tma_legal(*tma, seq_first=seq_first)
            if _runtime.INTERPRETED:  # the interpreter has no warps or pipeline stages
                config.pop("num_warps", None)
                config.pop("num_stages", None)
            elif config["TMA"]:
                _ensure_scratch_allocator()
            KERNELS[kernel].run(*args, grid=grid(rows, heads, config[block]), warmup=False, **meta, **config)
            return
        direct = _DIRECT.get(kernel) or _DIRECT.setdefault(kernel, DirectLaunches(KERNELS[kernel]))
        # everything the tile's choice reads besides the arguments (the tensors' sizes enter through their strides and
        # the scalars): a launch seen before goes straight to its compiled kernel, skipping Triton's binder too
        signature = direct.key(args, rows, heads, lengths, dropout, seq_first, *meta.values())
        seen = direct.get(signature)
        if seen is not None:
            block_size, on_tma = seen.payload
            if on_tma:
                _ensure_scratch_allocator()
            direct.launch(signature, seen, args, grid(rows, heads, block_size))
            return
        family, fp32 = device_family(args[0].device), args[0].dtype == torch.float32
        on_tma = uses_tma(family, fp32) and tma_legal(*tma, seq_first=seq_first)
        if on_tma:
            _ensure_scratch_allocator()
        grid(rows, heads, 16)  # the smallest block of any table: check before the autotuner launches anything
        buckets = (_length_bucket(lengths[0]), _length_bucket(lengths[1]))
        # what selects the autotuner (the head dim and specialisation are in meta), then what it keys on
        key = (kernel, family, on_tma, dropout, buckets, args[0].dtype, args[3].dtype, tuple(map(type, args)),
               *meta.values())
        picked = _PICKED.get(key)
        if picked is None:  # this launch's first sight: the autotuner times its configs (once per its own key)
            with _TUNING:
                if key not in _PICKED:  # (another thread may have tuned it while this one waited)
                    variant = specialisation(meta, dropout, varlen, alibi, sinks)
                    tuned = _tuned(kernel, family, d_bucket(meta["HEAD_DIM"]), fp32, variant, buckets, on_tma)
                    tuned.run(*args, grid=lambda m: grid(rows, heads, m[block]), warmup=False, **meta)
                    _PICKED[key] = tuned.best_config.all_kwargs()
                    return
                picked = _PICKED[key]
        direct.run(signature, args, grid(rows, heads, picked[block]), (picked[block], picked["TMA"]), **meta,
                   **picked)
    except TritonError as error:  # a score mod whose result is no float tile, caught where the kernel is built
        wrong_kind = result_kind_error(error, score_fn=meta.get("SCORE_MOD"))
        if wrong_kind is None:
            raise
        raise wrong_kind from error


_DIRECT: Dict[str, DirectLaunches] = {}
"""Each kernel's launches by exact signature (``kernels/_direct.py``): a repeat of a launch already made runs its
compiled kernel without the autotuner memo's key, the TMA checks or Triton's argument binder (~11 µs of host time
per launch on the simulated sm_90 path, ``python -m benchmarks launch-path``)."""
_PICKED: Dict[tuple, dict] = {}
"""The config (``triton.Config.all_kwargs()``) the autotuner picked for a launch, by what chooses the autotuner
(kernel, family, TMA, dropout, length buckets; its head dim and specialisation come from the compile-time
arguments), the dtypes of q and of the fourth tensor (out, or the backward's dO), the types of the runtime
arguments (None where a variant's pointer is off) and the compile-time arguments: later launches with that key go
straight to the kernel. Why: Triton's ``Autotuner.run`` rebuilds its key from every argument on each call (dicts of
~60 names, a list search per name, each tensor's dtype as a string), ~25-30 us of host time per cache hit on CPU
with Triton 3.8 (``python -m benchmarks launch-path``), more than the rest of our host path. The key is at least as
fine as the autotuner's (its tuning key plus every tensor's dtype: k, v and the outputs take q's, the others' are
fixed by the checks), so a launch runs the config the autotuner would give it (:data:`_TUNING` keeps threads from
tuning at once)."""
_TUNING = threading.Lock()
"""Held while an autotuner runs a launch's first sight: Triton's ``Autotuner.run`` keeps the call's arguments on
the autotuner (``nargs``, set to None when a call ends) and its pick in ``best_config``, so two threads tuning at
once (``nn.DataParallel``'s replicas, the autograd engine's thread per GPU) broke each other's timing (a TypeError
from the None) or memoised the other's pick."""


def _check_mask_tile(kernel: str, config: dict) -> None:
    """ValueError unless the (forced) tile of ``config`` lies in one block-mask cell: BLOCK_M and BLOCK_N at most
    MASK_BLOCK (powers of two, which tile a cell exactly)."""
    for name in ("BLOCK_M", "BLOCK_N"):
        if name in config and config[name] > MASK_BLOCK.value:
            raise ValueError(f"attention_{kernel}: {name}={config[name]} is larger than a block mask's "
                             f"{MASK_BLOCK.value}x{MASK_BLOCK.value} cells; with a mask_mod, tiles must be at most "
                             f"{MASK_BLOCK.value}")


_DELTA_NAME = forceable("attention_bwd_delta", optional=("BLOCK_M", "num_warps"))


def launch_delta(args, rows: int, heads: int, meta: dict) -> None:
    """Launch the backward's delta pre-pass (one fixed config, nothing to tune)."""
    forced = forced_config(_DELTA_NAME) or {}
    block_m = forced.get("BLOCK_M", DELTA_BLOCK_M)
    options = {} if _runtime.INTERPRETED else {"num_warps": forced.get("num_warps", DELTA_WARPS)}
    _direct.run(_attn_bwd_delta, args, grid(rows, heads, block_m), HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"],
                BLOCK_M=block_m, **options)


def launch_dropout_mask(rng_state: torch.Tensor, mask: torch.Tensor, dropout_p: float) -> None:
    """Fill the contiguous (B, H, Nq, Nk) uint8 ``mask`` with the keep-mask of the dropout seeded by ``rng_state``."""
    batch, heads, n_q, n_k = mask.shape
    block_m, block_n = DROPOUT_MASK_TILE
    _dropout_mask[grid(n_q, batch * heads, block_m)](rng_state, mask, n_q, n_k, dropout_p, BLOCK_M=block_m,
                                                     BLOCK_N=block_n)


_FP32_PRECISION = hasattr(torch.backends.cuda.matmul, "fp32_precision")
"""Whether torch has the ``fp32_precision`` API (2.9 and later), whose "tf32" makes reading the legacy
``allow_tf32`` raise (torch refuses to read a mix of the two APIs); it reflects the legacy flag's setting too."""


def uses_tf32(dtype: torch.dtype) -> bool:
    """Whether fp32 dots run in TF32 here: on a GPU, when torch allows it for matmuls (a flag that can change
    between calls, so cached plans key on this value), set by either API (``allow_tf32``,
    ``set_float32_matmul_precision`` or ``fp32_precision``, the matmul one or the global one it inherits)."""
    if dtype != torch.float32 or _runtime.INTERPRETED:
        return False
    if _FP32_PRECISION:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return torch.backends.cuda.matmul.allow_tf32


def kernel_meta(head_dim: int, dtype: torch.dtype, tf32: bool, causal: bool, window: bool = False,
                softcap: bool = False) -> dict:
    """Compile-time parameters shared by the kernels: head dim and its padded width, the mask's upper (causal)
    and lower (window) bounds, softcap, dot precision (``tf32``: :func:`uses_tf32`), and whether bf16 dots must be
    computed in fp32 (the interpreter only; see kernels.py)."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), CAUSAL=causal,
                WINDOW=window, SOFTCAP=softcap, UPCAST=_runtime.INTERPRETED and dtype == torch.bfloat16,
                PRECISION="tf32" if tf32 else "ieee")


# ------------------------------------------------------------------------------------------------ GPU builds
_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "KV_BOUNDS": "*i32", "PAD": "*u8", "ALIBI": "*fp32", "SINKS": "*fp32",
          "BLOCK_MASK": "*i32", "SEED": "*i64", "MASK": "*u8", "CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32",
          "softcap": "fp32", "dropout_p": "fp32",
          # upper-case scalars, which the naming convention would take for pointers
          **dict.fromkeys(("H", "GROUP", "N_Q", "N_K", "CAUSAL_SHIFT", "WINDOW_SHIFT", "ALIBI_SHIFT", "CHUNK_SIZE"),
                         "i32")}
_VARIANTS = {"window": {"WINDOW": True}, "chunk": {"CHUNKED": True}, "softcap": {"SOFTCAP": True},
             "alibi": {"ALIBI": "*fp32"}, "sinks": {"SINKS": "*fp32"}, "dropout": {"SEED": "*i64"},
             "varlen": {"CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32"},
             "mask_mod": {"BLOCK_MASK": "*i32", "MASK_MOD": mods._same_document, "MASK_ARGS": ("*i32", "i32")},
             "score_mod": {"SCORE_MOD": mods._softcap, "SCORE_GRAD": mods._softcap_grad, "SCORE_ARGS": ("fp32",)}}
"""Each variant's specialisation: a constexpr switch turned on (a flag, or a mod's @triton.jit function), or an
argument passed instead of None, given by its type (a pointer, or a tuple of types for a mod's extra arguments).
A kernel takes the variant if it has the variant's first parameter, with those of its parameters it has (the
forward has no SCORE_GRAD). The mods are the shipped ones (mods.py): the document mask, its doc-id pointer and
batch stride with its block mask, and the tanh softcap score with its derivative."""
_OFF = {"WINDOW": False, "CHUNKED": False, "SOFTCAP": False, "ALIBI": None, "SINKS": None, "SEED": None,
        "CU_SEQLENS_Q": None, "CU_SEQLENS_K": None, "BLOCK_MASK": None, "MASK_ARGS": None, "SCORE_ARGS": None,
        "MASK_MOD": None, "SCORE_MOD": None, "SCORE_GRAD": None}


def _takes(fn, variant: str) -> bool:
    """Whether kernel ``fn`` has ``variant``'s specialisation (its first parameter)."""
    return next(iter(_VARIANTS[variant])) in fn.arg_names


def _build(kernel: str, dtype: torch.dtype, d: int, tile: dict, num_warps: int, num_stages: int, label: str,
           families: Tuple[int, ...], variant: str = "") -> Build:
    """A causal, padding-masked, unit-stride-head-dim build, as the launchers specialise at run time, with one
    variant's specialisation on (``_VARIANTS``) or none; ``tile`` holds the block sizes (and TMA, but for the
    delta pre-pass)."""
    fn = _attn_bwd_delta if kernel == "bwd_delta" else KERNELS[kernel]
    types = _TYPES
    if kernel == "bwd_delta":
        constexprs = dict(tile, HEAD_DIM=d, BLOCK_D=d)
    else:
        switches = dict(_OFF, **(_VARIANTS[variant] if variant else {}))
        switches = {name: value for name, value in switches.items() if name in fn.arg_names}
        passed = {name: value for name, value in switches.items() if isinstance(value, (str, tuple))}  # types
        types = dict(_TYPES, **passed)
        constexprs = dict(tile, HEAD_DIM=d, BLOCK_D=d, CAUSAL=True, UPCAST=False, PRECISION="ieee",
                          **{name: value for name, value in switches.items() if name not in passed})
    return declare(f"attention_{kernel}", fn, dtype=TRITON_DTYPES[dtype], constexprs=constexprs,
                   num_warps=num_warps, num_stages=num_stages, label=label, head_dim=d, variant=variant, types=types,
                   default=bool(families), families=families)


@register_builds
def _builds() -> List[Build]:
    """Every autotune config of every GPU family, for fp16/bf16/fp32 at head dims 64, 128 and 256, each table's
    first entry marked default for the families whose launches try it first. Each specialisation (window,
    chunk, softcap, ALiBi, sinks, dropout, varlen, mask_mod, score_mod) is built at the first config of its table for
    each family, marked default for that family too: every specialisation is held to the no-spill bar on the GPUs
    that run it, not only the plain kernel. The dropout-mask helper has one config."""
    builds = [declare("attention_dropout_mask", _dropout_mask, dtype="u8", num_warps=4, num_stages=1,
                      constexprs=dict(zip(("BLOCK_M", "BLOCK_N"), DROPOUT_MASK_TILE)), types=_TYPES, default=True,
                      label="forward's dropout keep-mask %dx%d" % DROPOUT_MASK_TILE)]
    for dtype, name in TRITON_DTYPES.items():
        for d in (64, 128, 256):
            builds.append(_build("bwd_delta", dtype, d, {"BLOCK_M": DELTA_BLOCK_M}, DELTA_WARPS, 1,
                                 f"{name} d{d} BLOCK_M={DELTA_BLOCK_M}", families=FAMILIES))
            for kernel in KERNELS:
                for variant in ("",) + tuple(v for v in _VARIANTS if _takes(KERNELS[kernel], v)):
                    fp32 = name == "fp32"
                    lists = {family: flavoured(kernel, family, d, fp32, variant, tma=True) for family in FAMILIES}
                    # the plain kernel: every config of every family; a specialisation: each family's first
                    table = dict.fromkeys(t for tiles_ in lists.values() for t in (tiles_ if not variant else
                                                                                   tiles_[:1]))
                    for entry in table:
                        (bm, bn, warps, stages), tma = entry
                        first_for = tuple(f for f, tiles_ in lists.items() if tiles_[0] == entry)
                        builds.append(_build(kernel, dtype, d, {"BLOCK_M": bm, "BLOCK_N": bn, "TMA": tma}, warps,
                                             stages, f"{name} d{d} causal {variant + ' ' if variant else ''}"
                                             f"{'tma ' if tma else ''}{bm}x{bn} w{warps} s{stages}", first_for,
                                             variant=variant))
    return builds
