"""The directional sweep of an SDN layer as one autograd function with a hand-written backward.

Layout: a sweep walks the first axis of a *line tensor* ``(S, L, B, F)`` — S lines, each of L
positions, batch inside the line, features innermost. Line ``d`` is replaced by

    GRUCell(input=[n(i-1), n(i), n(i+1)], hidden=x[d, i])

where ``n`` is the already updated previous line (zeros beyond the border). In this layout the
three neighbours of every position are one buffer shifted by ±B rows, so the GRU input product of
a whole line is three matrix products on views (no ``cat``/``unfold`` copies), and the hidden
product ``W_hh·x + b_hh`` — which only reads values the sweep has not touched yet — is one matrix
product for the whole map before the loop. The backward walks the lines in reverse, carries the
gradient into the previous line through the input weights only, and defers every weight gradient
to single large matrix products after the loop. Nothing is written in place into a tensor that
autograd tracks, so the backward never copies the whole map once per line.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["sweep_lines", "parameter_grads"]


def _line_ranges(num_lines: int, reverse: bool) -> tuple[slice, slice, int]:
    """(updated lines, their previous lines, the unchanged first line) of a sweep."""
    if reverse:
        return slice(0, num_lines - 1), slice(1, num_lines), num_lines - 1
    return slice(1, num_lines), slice(0, num_lines - 1), 0


def _line_order(num_lines: int, reverse: bool) -> list[tuple[int, int]]:
    """(line, previous line) pairs in processing order."""
    if reverse:
        return [(d, d + 1) for d in range(num_lines - 2, -1, -1)]
    return [(d, d - 1) for d in range(1, num_lines)]


def _neighbour_blocks(weight: Tensor, num_features: int) -> list[Tensor]:
    """Split W_ih (G, 3F) into contiguous blocks multiplying n(i-1), n(i) and n(i+1)."""
    return [weight[:, k * num_features : (k + 1) * num_features].contiguous() for k in range(3)]


def _add_neighbour_products(acc: Tensor, prev: Tensor, blocks_t: list[Tensor], batch: int) -> None:
    """acc[i] += W0·prev[i-1] + W1·prev[i] + W2·prev[i+1] for rows ordered (position, batch)."""
    rows = prev.shape[0]
    acc.addmm_(prev, blocks_t[1])
    acc[batch:].addmm_(prev[: rows - batch], blocks_t[0])
    acc[: rows - batch].addmm_(prev[batch:], blocks_t[2])


def parameter_grads(
    grad_pre: Tensor,
    grad_x: Tensor,
    x_rows: Tensor,
    out: Tensor,
    reset: Tensor,
    weight_hh: Tensor,
    reverse: bool,
    length: int,
    batch: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weight and bias gradients of a sweep as a few large matrix products over all lines.

    ``grad_pre`` (S, L·B, 3F) holds the gradients of the gate pre-activations [r, z, n-input] of
    every updated line (the first line's rows are never read), ``out`` the sweep's output and
    ``reset`` the reset gates of the updated lines. The hidden path's gradient into the input,
    W_hhᵀ·[dr, dz, dn·r], is added to ``grad_x`` in place. ``grad_pre`` is overwritten. (The
    Triton fast path, :mod:`sdn.sweep_triton`, has its own tail: its kernel writes the neighbours.)
    """
    num_lines, _, feat = x_rows.shape
    done, prev_of_done, _ = _line_ranges(num_lines, reverse)

    # Input weights, one product per neighbour offset over all updated lines. Shifting the
    # flattened (line, position, batch) rows by ±B pairs every position with its neighbour,
    # plus one wrong pair per line boundary, which is subtracted again.
    g_flat = grad_pre[done].reshape(-1, 3 * feat)
    p_flat = out[prev_of_done].reshape(-1, feat)
    grad_blocks = [None, g_flat.t().mm(p_flat), None]
    if length > 1:
        g4 = grad_pre[done].view(-1, length, batch, 3 * feat)
        p4 = out[prev_of_done].view(-1, length, batch, feat)
        shifted = {0: (g_flat[batch:], p_flat[:-batch], g4[1:, 0], p4[:-1, -1]),
                   2: (g_flat[:-batch], p_flat[batch:], g4[:-1, -1], p4[1:, 0])}
        for k, (gs, ps, g_wrong, p_wrong) in shifted.items():
            grad_blocks[k] = gs.t().mm(ps)
            if g_wrong.numel():
                grad_blocks[k].sub_(
                    g_wrong.reshape(-1, 3 * feat).t().mm(p_wrong.reshape(-1, feat))
                )
    else:  # one position per line: no neighbours at offsets ±1
        grad_blocks[0] = grad_blocks[2] = torch.zeros_like(grad_blocks[1])
    grad_weight_ih = torch.cat(grad_blocks, dim=1)
    grad_bias_ih = g_flat.sum(0)

    # Hidden path, all lines at once: d(W_hh·h + b_hh) = [dr, dz, dn·r] (in place: the
    # input-weight gradients above were the last readers of dn).
    grad_hidden = grad_pre[done]
    grad_hidden[:, :, 2 * feat :] *= reset
    grad_hidden = grad_hidden.view(-1, 3 * feat)
    grad_x[done].view(-1, feat).addmm_(grad_hidden, weight_hh)
    grad_weight_hh = grad_hidden.t().mm(x_rows[done].reshape(-1, feat))
    grad_bias_hh = grad_hidden.sum(0)
    return grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh


class _SweepFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        lines: Tensor,
        weight_ih: Tensor,
        weight_hh: Tensor,
        bias_ih: Tensor,
        bias_hh: Tensor,
        reverse: bool,
        save_for_backward: bool,
    ) -> Tensor:
        num_lines, length, batch, feat = lines.shape
        rows = length * batch
        x = lines.contiguous()
        x_rows = x.view(num_lines, rows, feat)
        rz_blocks_t = [w.t() for w in _neighbour_blocks(weight_ih[: 2 * feat], feat)]
        n_blocks_t = [w.t() for w in _neighbour_blocks(weight_ih[2 * feat :], feat)]

        # Hidden-state products of the whole map at once (they never read updated values).
        # The reset/update pre-activations start as W_hh·x + b_hh + b_ih and receive the input
        # products line by line; they then hold the gates themselves (saved for the backward).
        flat = x.view(-1, feat)
        rz = torch.addmm(bias_hh[: 2 * feat] + bias_ih[: 2 * feat], flat, weight_hh[: 2 * feat].t())
        rz = rz.view(num_lines, rows, 2 * feat)
        gh_n = torch.addmm(bias_hh[2 * feat :], flat, weight_hh[2 * feat :].t())
        gh_n = gh_n.view(num_lines, rows, feat)
        cand = torch.empty_like(x_rows)  # candidate state n of every line
        out = torch.empty_like(x_rows)
        order = _line_order(num_lines, reverse)
        _, _, first = _line_ranges(num_lines, reverse)
        out[first] = x_rows[first]

        for d, p in order:
            prev = out[p]
            gates = rz[d]
            _add_neighbour_products(gates, prev, rz_blocks_t, batch)
            gates.sigmoid_()
            r, z = gates[:, :feat], gates[:, feat:]
            n = torch.addmm(bias_ih[2 * feat :], prev, n_blocks_t[1], out=cand[d])
            n[batch:].addmm_(prev[: rows - batch], n_blocks_t[0])
            n[: rows - batch].addmm_(prev[batch:], n_blocks_t[2])
            n.addcmul_(r, gh_n[d]).tanh_()
            # h' = (1 - z) * n + z * h
            torch.lerp(n, x_rows[d], z, out=out[d])

        if save_for_backward:
            ctx.save_for_backward(x, out, rz, cand, gh_n, weight_ih, weight_hh)
            ctx.reverse = reverse
        return out.view(num_lines, length, batch, feat)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, out, rz, cand, gh_n, weight_ih, weight_hh = ctx.saved_tensors
        num_lines, length, batch, feat = x.shape
        rows = length * batch
        done, prev_of_done, first = _line_ranges(num_lines, ctx.reverse)
        x_rows = x.view(num_lines, rows, feat)
        blocks = _neighbour_blocks(weight_ih, feat)  # (3F, F) each

        # Gradient w.r.t. every output line; the input path adds into the previous line.
        grad_lines = grad_out.contiguous().view(num_lines, rows, feat).clone()
        grad_pre = torch.empty(num_lines, rows, 3 * feat, dtype=x.dtype, device=x.device)
        for d, p in reversed(_line_order(num_lines, ctx.reverse)):
            # Gate algebra of h' = (1 - z)·n + z·h, per line while it is in cache.
            g, r, z, n = grad_lines[d], rz[d, :, :feat], rz[d, :, feat:], cand[d]
            pre = grad_pre[d]
            one_minus_z = 1 - z
            dn = g * one_minus_z
            dn_pre = torch.addcmul(dn, dn * n, n, value=-1, out=pre[:, 2 * feat :])  # ·(1 − n²)
            dz = (x_rows[d] - n).mul_(g).mul_(z)
            torch.mul(dz, one_minus_z, out=pre[:, feat : 2 * feat])  # ·z(1 − z)
            dr = torch.addcmul(r, r, r, value=-1).mul_(gh_n[d])  # r(1 − r)·(W_hn h + b_hn)
            torch.mul(dr, dn_pre, out=pre[:, :feat])
            # previous line position j received n(j) through W1, and was n(i∓1) of i = j±1
            gp = grad_lines[p]
            gp.addmm_(pre, blocks[1])
            gp[: rows - batch].addmm_(pre[batch:], blocks[0])
            gp[batch:].addmm_(pre[: rows - batch], blocks[2])

        r, z = rz[done, :, :feat], rz[done, :, feat:]
        grad_x = torch.empty_like(x_rows)
        grad_x[first] = grad_lines[first]
        torch.mul(grad_lines[done], z, out=grad_x[done])  # direct path h' = ... + z·h
        grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh = parameter_grads(
            grad_pre, grad_x, x_rows, out, r, weight_hh, ctx.reverse, length, batch
        )

        return (
            grad_x.view(num_lines, length, batch, feat),
            grad_weight_ih,
            grad_weight_hh,
            grad_bias_ih,
            grad_bias_hh,
            None,
            None,
        )


def sweep_lines(
    lines: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    reverse: bool = False,
) -> Tensor:
    """Run one GRU sweep over a line tensor ``(S, L, B, F)`` along its first axis.

    ``reverse`` walks the lines from the last to the first. Weights follow ``torch.nn.GRUCell``
    (input size 3F, hidden size F). Returns a new tensor; ``lines`` is never modified.
    """
    feat = lines.shape[-1]
    bias_ih = lines.new_zeros(3 * feat) if bias_ih is None else bias_ih
    bias_hh = lines.new_zeros(3 * feat) if bias_hh is None else bias_hh
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (lines, weight_ih, weight_hh, bias_ih, bias_hh)
    )
    return _SweepFunction.apply(lines, weight_ih, weight_hh, bias_ih, bias_hh, reverse, needs_grad)
