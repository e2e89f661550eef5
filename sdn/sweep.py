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

__all__ = ["sweep_lines"]


def _line_order(num_lines: int, reverse: bool) -> list[tuple[int, int]]:
    """(line, previous line) pairs in processing order; the first line is left unchanged."""
    if reverse:
        return [(d, d + 1) for d in range(num_lines - 2, -1, -1)]
    return [(d, d - 1) for d in range(1, num_lines)]


def _neighbour_blocks(weight_ih: Tensor, num_features: int) -> list[Tensor]:
    """Split W_ih (3F, 3F) into the blocks that multiply n(i-1), n(i) and n(i+1)."""
    return [weight_ih[:, k * num_features : (k + 1) * num_features] for k in range(3)]


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
        x_flat = x.view(num_lines, rows, feat)
        w_blocks_t = [w.t() for w in _neighbour_blocks(weight_ih, feat)]

        # Hidden-state product of the whole map at once: it never reads updated values.
        gh = torch.addmm(bias_hh, x.view(-1, feat), weight_hh.t()).view(num_lines, rows, 3 * feat)

        # Output lines live in a buffer padded by one zero position at both ends of every line,
        # so that the neighbour at offset k of position i is row (i + k) of the padded line.
        out = x.new_zeros(num_lines, length + 2, batch, feat)
        out_flat = out.view(num_lines, (length + 2) * batch, feat)
        order = _line_order(num_lines, reverse)
        first = order[0][1] if order else 0
        out[first, 1 : length + 1] = x[first]
        gates = x.new_empty(num_lines, rows, 3 * feat) if save_for_backward else None

        for d, p in order:
            prev = out_flat[p]
            gi = torch.addmm(bias_ih, prev[0:rows], w_blocks_t[0])
            gi.addmm_(prev[batch : batch + rows], w_blocks_t[1])
            gi.addmm_(prev[2 * batch : 2 * batch + rows], w_blocks_t[2])
            ghd = gh[d]
            rz = torch.sigmoid(gi[:, : 2 * feat] + ghd[:, : 2 * feat])
            r, z = rz[:, :feat], rz[:, feat:]
            n = torch.tanh(torch.addcmul(gi[:, 2 * feat :], r, ghd[:, 2 * feat :]))
            # h' = (1 - z) * n + z * h, written straight into the padded output buffer.
            torch.lerp(n, x_flat[d], z, out=out_flat[d, batch : batch + rows])
            if gates is not None:
                gates[d, :, : 2 * feat] = rz
                gates[d, :, 2 * feat :] = n

        if save_for_backward:
            ctx.save_for_backward(x, out, gates, gh, weight_ih, weight_hh)
            ctx.reverse = reverse
        return out[:, 1 : length + 1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, out, gates, gh, weight_ih, weight_hh = ctx.saved_tensors
        num_lines, length, batch, feat = x.shape
        rows = length * batch
        order = _line_order(num_lines, ctx.reverse)
        w_ih = weight_ih  # (3F, 3F): rows [r; z; n], columns [n(i-1) | n(i) | n(i+1)]

        # Gradient w.r.t. every output line; the input path adds into the previous line.
        grad_lines = grad_out.contiguous().clone().view(num_lines, length, batch, feat)
        grad_x = torch.empty_like(x)
        grad_gates = x.new_zeros(num_lines, rows, 3 * feat)  # d(pre-activations) of the input path

        for d, p in reversed(order):
            g = grad_lines[d].view(rows, feat)
            r = gates[d, :, :feat]
            z = gates[d, :, feat : 2 * feat]
            n = gates[d, :, 2 * feat :]
            h = x[d].view(rows, feat)
            ghn = gh[d, :, 2 * feat :]
            torch.mul(g, z, out=grad_x[d].view(rows, feat))
            dn_pre = g * (1 - z) * (1 - n * n)
            dz_pre = g * (h - n) * z * (1 - z)
            dr_pre = dn_pre * ghn * r * (1 - r)
            dgi = grad_gates[d]
            dgi[:, :feat] = dr_pre
            dgi[:, feat : 2 * feat] = dz_pre
            dgi[:, 2 * feat :] = dn_pre
            # Input path into the previous line: position i received n(i-1+k) through block k.
            y = torch.mm(dgi, w_ih).view(length, batch, 3 * feat)
            gp = grad_lines[p]
            gp += y[:, :, feat : 2 * feat]
            gp[:-1] += y[1:, :, :feat]
            gp[1:] += y[:-1, :, 2 * feat :]

        first = order[0][1] if order else 0
        grad_x[first] = grad_lines[first]

        # Hidden path, for all lines at once: dgh = [dr, dz, dn * r].
        grad_hidden = grad_gates.clone()
        grad_hidden[:, :, 2 * feat :] *= gates[:, :, :feat]
        gh_flat = grad_hidden.view(-1, 3 * feat)
        grad_x.view(-1, feat).addmm_(gh_flat, weight_hh)
        grad_weight_hh = gh_flat.t().mm(x.view(-1, feat))
        grad_bias_hh = gh_flat.sum(0)

        # Input weights: one product per neighbour offset over all processed lines.
        lines_done = [d for d, _ in order]
        prev_lines = [p for _, p in order]
        gi_flat = grad_gates[lines_done].view(-1, 3 * feat)
        grad_weight_ih = torch.cat(
            [
                gi_flat.t().mm(out[prev_lines, k : k + length].reshape(-1, feat))
                for k in range(3)
            ],
            dim=1,
        )
        grad_bias_ih = gi_flat.sum(0)
        return grad_x, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, None, None


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
