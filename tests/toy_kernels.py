"""Two tiny Triton kernels whose costs are known by hand, shared by the counting and build-report tests."""
import triton
import triton.language as tl


@triton.jit
def copy_kernel(X, Y, N, BLOCK: tl.constexpr):
    """Y[i] = X[i] for i < N: reads and writes N elements, whatever the masked tail of the last block."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offsets, tl.load(X + offsets, mask=offsets < N), mask=offsets < N)


@triton.jit
def matmul_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """C (M, N) = A (M, K) @ B (K, N), one program, row-major: 2*M*N*K FLOPs, one tl.dot."""
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :])
    b = tl.load(B + k[:, None] * N + n[None, :])
    tl.store(C + m[:, None] * N + n[None, :], tl.dot(a, b, input_precision="ieee").to(C.dtype.element_ty))
