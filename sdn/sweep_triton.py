"""The SDN sweep as two persistent Triton kernels: one launch per sweep forward, one backward.

Same contract and layout as :func:`sdn.sweep.sweep_lines` (a line tensor ``(S, L, B, F)``, lines
along the first axis). A sweep's only sequential dependency is between consecutive lines *of the
same batch element*, so each Triton program owns one batch element and walks all S−1 lines in
order inside one launch; ``tl.debug_barrier()`` after each line makes the program's own global
writes of line d visible to all its threads before they read it as line d+1's neighbours.

Forward, per sweep: one matrix product ``W_hh·x + b_hh`` for the whole map (it never reads an
updated value), then the kernel: per line, the neighbour products ``W_ih·[n(i−1), n(i), n(i+1)]``
as ``tl.dot`` tiles over the previous line, and the GRU gate arithmetic fused in registers.
Backward: the kernel walks the lines in reverse (gate algebra, then the gradient into the previous
line through ``W_ih``) and also writes every position's neighbours, so the weight and bias
gradients are five large matrix products/sums after it (no per-line work).

Precision: products take their operands in the line tensor's dtype (fp32, or the fp16/bf16 of an
autocast region) and accumulate in fp32 — fp32 products are exact IEEE fp32 (no TF32); the gate
arithmetic runs in fp32 and the state is stored in the line dtype, like CUDA's fused GRU cell.

Both kernels are ``torch.library.custom_op``s with fake implementations, so on the meta device (and
to ``torch.compile``) each is one opaque operator. On CUDA tensors the compiled kernels run; on CPU
tensors the same kernels run in Triton's interpreter (what ``TRITON_INTERPRET=1`` selects), which
is slow and only meant for tests.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sdn.sweep import _line_ranges, sweep_lines

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a torch build without Triton: only the plain sweep is available
    triton = tl = InterpretedFunction = None

__all__ = ["TRITON_AVAILABLE", "triton_sweep_lines"]

TRITON_AVAILABLE = triton is not None

_MAX_ELEMENTS = 2**31 - 1  # the kernels index with int32 offsets
_BLOCK_N = 32  # output features per tile
_BLOCK_K = 32  # reduction features per tile
_NUM_WARPS = 4


def _forward_kernel(
    x_ptr, gh_ptr, w_ptr, b_ptr, out_ptr, cand_ptr,
    S, L, B, F,
    REVERSE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per batch element: copy the first line, then update lines one after another.

    ``gh`` (S, L, B, 3F) holds W_hh·x + b_hh on entry; for every updated line its first 2F
    features are overwritten with the reset and update gates (kept for the backward). ``cand``
    receives the candidate state n of every updated line (zeros on the first line).
    """
    b = tl.program_id(0)
    pos = tl.arange(0, BLOCK_L)
    pos_ok = pos < L
    row = B * F  # stride between positions of a line
    line = L * row
    grow = B * 3 * F
    gline = L * grow
    first = S - 1 if REVERSE else 0
    for f0 in range(0, F, BLOCK_N):
        cols = f0 + tl.arange(0, BLOCK_N)
        mask = pos_ok[:, None] & (cols < F)[None, :]
        offs = first * line + pos[:, None] * row + b * F + cols[None, :]
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
        tl.store(cand_ptr + offs, tl.full((BLOCK_L, BLOCK_N), 0.0, tl.float32)
                 .to(cand_ptr.dtype.element_ty), mask=mask)  # defined, never read
    tl.debug_barrier()
    for step in range(0, S - 1):
        if REVERSE:
            d = S - 2 - step
            p = d + 1
        else:
            d = step + 1
            p = step
        for n0 in range(0, F, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < F
            acc_r = tl.full((BLOCK_L, BLOCK_N), 0.0, tl.float32)
            acc_z = tl.full((BLOCK_L, BLOCK_N), 0.0, tl.float32)
            acc_n = tl.full((BLOCK_L, BLOCK_N), 0.0, tl.float32)
            for k0 in range(0, F, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < F
                w_mask = k_ok[:, None] & col_ok[None, :]
                for o in tl.static_range(3):  # neighbour offsets −1, 0, +1
                    src = pos + (o - 1)
                    src_ok = (src >= 0) & (src < L)
                    a = tl.load(out_ptr + p * line + src[:, None] * row + b * F + ks[None, :],
                                mask=src_ok[:, None] & k_ok[None, :], other=0.0)
                    # W_ih[g·F + n, o·F + k], read transposed as a (K, N) tile
                    w = w_ptr + cols[None, :] * (3 * F) + (o * F + ks)[:, None]
                    w_r = tl.load(w, mask=w_mask, other=0.0)
                    w_z = tl.load(w + F * 3 * F, mask=w_mask, other=0.0)
                    w_n = tl.load(w + 2 * F * 3 * F, mask=w_mask, other=0.0)
                    if UPCAST:
                        a, w_r = a.to(tl.float32), w_r.to(tl.float32)
                        w_z, w_n = w_z.to(tl.float32), w_n.to(tl.float32)
                    acc_r = tl.dot(a, w_r, acc_r, input_precision="ieee")
                    acc_z = tl.dot(a, w_z, acc_z, input_precision="ieee")
                    acc_n = tl.dot(a, w_n, acc_n, input_precision="ieee")
            mask = pos_ok[:, None] & col_ok[None, :]
            goffs = d * gline + pos[:, None] * grow + b * 3 * F + cols[None, :]
            gh_r = tl.load(gh_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
            gh_z = tl.load(gh_ptr + goffs + F, mask=mask, other=0.0).to(tl.float32)
            gh_n = tl.load(gh_ptr + goffs + 2 * F, mask=mask, other=0.0).to(tl.float32)
            b_r = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            b_z = tl.load(b_ptr + F + cols, mask=col_ok, other=0.0).to(tl.float32)
            b_n = tl.load(b_ptr + 2 * F + cols, mask=col_ok, other=0.0).to(tl.float32)
            # σ and tanh written with exp: the standard library's @jit helpers cannot run in
            # the interpreter unless TRITON_INTERPRET was set before triton was imported
            r = 1.0 / (1.0 + tl.exp(-(acc_r + b_r[None, :] + gh_r)))
            z = 1.0 / (1.0 + tl.exp(-(acc_z + b_z[None, :] + gh_z)))
            n = 2.0 / (1.0 + tl.exp(-2.0 * (acc_n + b_n[None, :] + r * gh_n))) - 1.0  # tanh
            offs = d * line + pos[:, None] * row + b * F + cols[None, :]
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out_ty = out_ptr.dtype.element_ty
            tl.store(out_ptr + offs, (n + z * (h - n)).to(out_ty), mask=mask)
            tl.store(cand_ptr + offs, n.to(out_ty), mask=mask)
            tl.store(gh_ptr + goffs, r.to(out_ty), mask=mask)
            tl.store(gh_ptr + goffs + F, z.to(out_ty), mask=mask)
        tl.debug_barrier()


def _backward_kernel(
    gout_ptr, x_ptr, out_ptr, gh_ptr, cand_ptr, w_ptr, carry_ptr, gx_ptr, gpre_ptr, gph_ptr,
    nbr_ptr,
    S, L, B, F,
    REVERSE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per batch element: the lines in reverse processing order.

    Per line d (previous line p): its output gradient g = dL/dout[d] + carry[d] (what line d's
    successor sent back); the gate pre-activation gradients [dr, dz, dn] into ``gpre`` and the
    hidden-product gradients [dr, dz, dn·r] into ``gph``; the direct input gradient g·z into
    ``gx``; the neighbours [n(i−1), n(i), n(i+1)] of every position into ``nbr`` (so that
    dW_ih = gpreᵀ·nbr is one matrix product); then carry[p] = Σ_o W_oᵀ·gpre[d, j − o + 1] (fp32).
    The first line's rows of gpre, gph and nbr are zeros.
    """
    b = tl.program_id(0)
    pos = tl.arange(0, BLOCK_L)
    pos_ok = pos < L
    row = B * F
    line = L * row
    grow = B * 3 * F
    gline = L * grow
    first = S - 1 if REVERSE else 0
    for t in range(0, S - 1):
        step = S - 2 - t
        if REVERSE:
            d = S - 2 - step
            p = d + 1
        else:
            d = step + 1
            p = step
        for n0 in range(0, F, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < F
            mask = pos_ok[:, None] & col_ok[None, :]
            offs = d * line + pos[:, None] * row + b * F + cols[None, :]
            goffs = d * gline + pos[:, None] * grow + b * 3 * F + cols[None, :]
            g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g += tl.load(carry_ptr + offs, mask=mask & (t > 0), other=0.0)
            r = tl.load(gh_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(gh_ptr + goffs + F, mask=mask, other=0.0).to(tl.float32)
            gh_n = tl.load(gh_ptr + goffs + 2 * F, mask=mask, other=0.0).to(tl.float32)
            n = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dn = g * (1.0 - z) * (1.0 - n * n)
            dz = g * (h - n) * z * (1.0 - z)
            dr = dn * gh_n * r * (1.0 - r)
            pre_ty = gpre_ptr.dtype.element_ty
            tl.store(gpre_ptr + goffs, dr.to(pre_ty), mask=mask)
            tl.store(gpre_ptr + goffs + F, dz.to(pre_ty), mask=mask)
            tl.store(gpre_ptr + goffs + 2 * F, dn.to(pre_ty), mask=mask)
            tl.store(gph_ptr + goffs, dr.to(pre_ty), mask=mask)
            tl.store(gph_ptr + goffs + F, dz.to(pre_ty), mask=mask)
            tl.store(gph_ptr + goffs + 2 * F, (dn * r).to(pre_ty), mask=mask)
            tl.store(gx_ptr + offs, (g * z).to(gx_ptr.dtype.element_ty), mask=mask)
            for o in tl.static_range(3):
                src = pos + (o - 1)
                src_ok = (src >= 0) & (src < L)
                nb = tl.load(out_ptr + p * line + src[:, None] * row + b * F + cols[None, :],
                             mask=src_ok[:, None] & col_ok[None, :], other=0.0)
                tl.store(nbr_ptr + goffs + o * F, nb.to(pre_ty), mask=mask)
        tl.debug_barrier()
        for n0 in range(0, F, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < F
            acc = tl.full((BLOCK_L, BLOCK_N), 0.0, tl.float32)
            for k0 in range(0, 3 * F, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < 3 * F
                w_mask = k_ok[:, None] & col_ok[None, :]
                for o in tl.static_range(3):
                    src = pos - (o - 1)  # position i = j − o + 1 saw j as its neighbour o
                    src_ok = (src >= 0) & (src < L)
                    a = tl.load(gpre_ptr + d * gline + src[:, None] * grow + b * 3 * F
                                + ks[None, :], mask=src_ok[:, None] & k_ok[None, :], other=0.0)
                    w = tl.load(w_ptr + ks[:, None] * (3 * F) + o * F + cols[None, :],
                                mask=w_mask, other=0.0)
                    if UPCAST:
                        a, w = a.to(tl.float32), w.to(tl.float32)
                    acc = tl.dot(a, w, acc, input_precision="ieee")
            mask = pos_ok[:, None] & col_ok[None, :]
            tl.store(carry_ptr + p * line + pos[:, None] * row + b * F + cols[None, :], acc,
                     mask=mask)
        tl.debug_barrier()
    for f0 in range(0, F, BLOCK_N):
        cols = f0 + tl.arange(0, BLOCK_N)
        mask = pos_ok[:, None] & (cols < F)[None, :]
        offs = first * line + pos[:, None] * row + b * F + cols[None, :]
        g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(carry_ptr + offs, mask=mask & (S > 1), other=0.0)
        tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)
        zero = tl.full((BLOCK_L, BLOCK_N), 0.0, tl.float32).to(gpre_ptr.dtype.element_ty)
        goffs = first * gline + pos[:, None] * grow + b * 3 * F + cols[None, :]
        for gate in tl.static_range(3):  # the first line has no gates: zeros
            tl.store(gpre_ptr + goffs + gate * F, zero, mask=mask)
            tl.store(gph_ptr + goffs + gate * F, zero, mask=mask)
            tl.store(nbr_ptr + goffs + gate * F, zero, mask=mask)


if TRITON_AVAILABLE:
    # Compiled kernels for CUDA tensors, interpreted ones for CPU tensors (tests).
    _KERNELS = {
        "forward": (triton.jit(_forward_kernel), InterpretedFunction(_forward_kernel)),
        "backward": (triton.jit(_backward_kernel), InterpretedFunction(_backward_kernel)),
    }


def _launch(name: str, like: Tensor, *args, reverse: bool) -> None:
    """Run kernel ``name`` with one program per batch element of the line tensor ``like``."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton SDN sweep needs the `triton` package (SDN_SWEEP=plain "
                           "selects the plain PyTorch sweep)")
    num_lines, length, batch, feat = like.shape
    compiled, interpreted = _KERNELS[name]
    kernel = compiled if like.is_cuda else interpreted
    # The interpreter's tl.dot mishandles bf16 operands (Triton 3.8): it multiplies them in fp32
    # instead, which is what the tensor cores compute (exact products, fp32 accumulation).
    upcast = kernel is interpreted and like.dtype == torch.bfloat16
    block_l = max(16, triton.next_power_of_2(length))
    kernel[(batch,)](*args, num_lines, length, batch, feat, REVERSE=reverse, BLOCK_L=block_l,
                     BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, UPCAST=upcast, num_warps=_NUM_WARPS)


@contextmanager
def _unfilled(device: torch.device):
    """Skip deterministic mode's NaN fill of new buffers on CUDA: the kernels write every element
    they return and read only what they wrote (checked on CPU, where the fill stays on)."""
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = previous and device.type != "cuda"
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous


@torch.library.custom_op("sdn::sweep_forward", mutates_args={"gh"})
def _sweep_forward(x: Tensor, gh: Tensor, weight_ih: Tensor, bias_ih: Tensor,
                   reverse: bool) -> tuple[Tensor, Tensor]:
    """(out, cand) of one sweep; ``gh``'s first 2F features become the gates [r, z]."""
    with _unfilled(x.device):
        out = torch.empty_like(x)
        cand = torch.empty_like(x)
    _launch("forward", x, x, gh, weight_ih, bias_ih, out, cand, reverse=reverse)
    return out, cand


@_sweep_forward.register_fake
def _(x, gh, weight_ih, bias_ih, reverse):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("sdn::sweep_backward", mutates_args=())
def _sweep_backward(grad_out: Tensor, x: Tensor, out: Tensor, gh: Tensor, cand: Tensor,
                    weight_ih: Tensor, reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x without the hidden path, gate pre-activation gradients [dr, dz, dn], hidden-product
    gradients [dr, dz, dn·r], neighbours [n(i−1), n(i), n(i+1)]); the last three (S, L, B, 3F)."""
    with _unfilled(x.device):
        grad_x = torch.empty_like(x)
        grad_pre, grad_hidden, neighbours = (torch.empty_like(gh) for _ in range(3))
        carry = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _launch("backward", x, grad_out, x, out, gh, cand, weight_ih, carry, grad_x, grad_pre,
            grad_hidden, neighbours, reverse=reverse)
    return grad_x, grad_pre, grad_hidden, neighbours


@_sweep_backward.register_fake
def _(grad_out, x, out, gh, cand, weight_ih, reverse):
    return torch.empty_like(x), torch.empty_like(gh), torch.empty_like(gh), torch.empty_like(gh)


class _TritonSweepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lines: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                bias_hh: Tensor, reverse: bool, save_for_backward: bool) -> Tensor:
        num_lines, length, batch, feat = lines.shape
        x = lines.contiguous()
        # hidden products of the whole map: they never read a value the sweep updates
        gh = torch.addmm(bias_hh, x.view(-1, feat), weight_hh.t()).view(*x.shape[:3], 3 * feat)
        out, cand = torch.ops.sdn.sweep_forward(x, gh, weight_ih.contiguous(), bias_ih, reverse)
        if save_for_backward:
            ctx.save_for_backward(x, out, gh, cand, weight_ih, weight_hh)
            ctx.reverse = reverse
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, out, gh, cand, weight_ih, weight_hh = ctx.saved_tensors
        num_lines, length, batch, feat = x.shape
        rows = length * batch
        grad_x, grad_pre, grad_hidden, neighbours = torch.ops.sdn.sweep_backward(
            grad_out.contiguous().to(x.dtype), x, out, gh, cand, weight_ih.contiguous(),
            ctx.reverse,
        )
        # Weights and biases: a few large products over the updated lines (rows of 3F).
        done, _, _ = _line_ranges(num_lines, ctx.reverse)
        g_in = grad_pre.view(num_lines, rows, 3 * feat)[done].view(-1, 3 * feat)
        g_hid = grad_hidden.view(num_lines, rows, 3 * feat)[done].view(-1, 3 * feat)
        grad_weight_ih = g_in.t().mm(neighbours.view(num_lines, rows, 3 * feat)[done].view(-1, 3 * feat))
        grad_weight_hh = g_hid.t().mm(x.view(num_lines, rows, feat)[done].view(-1, feat))
        grad_x.view(num_lines, rows, feat)[done].view(-1, feat).addmm_(g_hid, weight_hh)
        return (grad_x, grad_weight_ih, grad_weight_hh, g_in.sum(0), g_hid.sum(0), None, None)


def triton_sweep_lines(
    lines: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    reverse: bool = False,
) -> Tensor:
    """:func:`sdn.sweep.sweep_lines` through the persistent Triton kernels (same arguments).

    Maps too large for the kernels' int32 offsets (S·L·B·3F ≥ 2³¹) take the plain sweep.
    """
    feat = lines.shape[-1]
    if lines.numel() * 3 > _MAX_ELEMENTS:
        return sweep_lines(lines, weight_ih, weight_hh, bias_ih, bias_hh, reverse)
    bias_ih = lines.new_zeros(3 * feat) if bias_ih is None else bias_ih
    bias_hh = lines.new_zeros(3 * feat) if bias_hh is None else bias_hh
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (lines, weight_ih, weight_hh, bias_ih, bias_hh)
    )
    return _TritonSweepFunction.apply(lines, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
                                      needs_grad)
