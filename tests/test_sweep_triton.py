"""The Triton sweep (run by Triton's interpreter on CPU tensors) against the plain sweep and a
naive GRUCell loop written here; its dispatch count, op registration, precision and selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from torch.utils._python_dispatch import TorchDispatchMode

from sdn.layers import DIRECTIONS, DirectionalSweep, select_sweep
from sdn.sweep import sweep_lines
from sdn.sweep_triton import TRITON_AVAILABLE, triton_sweep_lines
from test_layers import naive_sweep

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs the triton package")


def naive_line_sweep(lines: torch.Tensor, cell: torch.nn.GRUCell, reverse: bool) -> torch.Tensor:
    """(S, L, B, F): line d ← GRUCell([n(i−1), n(i), n(i+1)] of the updated line d∓1, line d)."""
    num_lines, length, batch, feat = lines.shape
    out = list(lines.unbind(0))
    for d in (range(num_lines - 2, -1, -1) if reverse else range(1, num_lines)):
        prev = out[d + 1] if reverse else out[d - 1]
        padded = nnf.pad(prev, (0, 0, 0, 0, 1, 1))  # zero positions beyond both ends
        inp = torch.cat([padded[:-2], padded[1:-1], padded[2:]], dim=-1)
        hidden = out[d].reshape(length * batch, feat)
        out[d] = cell(inp.reshape(length * batch, 3 * feat), hidden).view(length, batch, feat)
    return torch.stack(out)


def _grads(fn, x, cell, grad_out):
    x = x.clone().requires_grad_(True)
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + params, grad_out, allow_unused=True)
    # a single-line sweep never uses its weights: their gradient is zero
    return (y, *(torch.zeros_like(p) if g is None else g for p, g in zip([x] + params, grads)))


NAMES = ["output", "input", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
# (S lines, L positions, B, F): F > 32 spans several feature tiles, L > 16 a wider position
# block, L = 1 one-position lines, S = 1 a single (unchanged) line.
LINE_SHAPES = [(5, 6, 2, 8), (4, 7, 3, 5), (6, 1, 2, 4), (1, 5, 2, 4), (2, 3, 1, 16),
               (3, 20, 2, 12), (3, 4, 2, 40)]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", LINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_sweep_matches_naive_and_plain(shape, reverse):
    torch.manual_seed(0)
    num_lines, length, batch, feat = shape
    cell = torch.nn.GRUCell(3 * feat, feat)
    x = torch.randn(shape)
    grad_out = torch.randn(shape)
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    fast = _grads(lambda t: triton_sweep_lines(t, *params, reverse=reverse), x, cell, grad_out)
    plain = _grads(lambda t: sweep_lines(t, *params, reverse=reverse), x, cell, grad_out)
    naive = _grads(lambda t: naive_line_sweep(t, cell, reverse), x, cell, grad_out)
    for name, f, p, n in zip(NAMES, fast, plain, naive):
        torch.testing.assert_close(f, n, atol=1e-5, rtol=1e-5, msg=f"{name}: fast vs naive")
        torch.testing.assert_close(f, p, atol=1e-5, rtol=1e-5, msg=f"{name}: fast vs plain")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("hw", [(5, 3), (1, 4), (4, 1)])
def test_every_direction_through_the_layer(direction, hw, monkeypatch):
    """DirectionalSweep with SDN_SWEEP=triton equals the naive map loop of the layer tests."""
    monkeypatch.setenv("SDN_SWEEP", "triton")
    torch.manual_seed(1)
    sweep = DirectionalSweep(6, direction)
    x = torch.randn(2, 6, *hw)
    grad_out = torch.randn(2, 6, *hw)
    fast = _grads(sweep, x, sweep.cell, grad_out)
    naive = _grads(lambda t: naive_sweep(t, sweep.cell, direction), x, sweep.cell, grad_out)
    for name, f, n in zip(NAMES, fast, naive):
        torch.testing.assert_close(f, n, atol=1e-5, rtol=1e-5, msg=name)


def _bf16_cell(cell: torch.nn.GRUCell) -> torch.nn.GRUCell:
    twin = torch.nn.GRUCell(cell.input_size, cell.hidden_size)
    twin.load_state_dict(cell.state_dict())
    return twin.to(torch.bfloat16)


@pytest.mark.parametrize("reverse", [False, True])
def test_bf16_sweeps_match_a_naive_bf16_gru_loop(reverse):
    """bf16 operands and state: plain and fast paths stay within bf16 rounding of nn.GRUCell in
    bf16, and much closer to it than to the fp32 result (so they really compute in bf16)."""
    torch.manual_seed(2)
    shape = (6, 5, 2, 12)
    cell = torch.nn.GRUCell(36, 12)
    x = torch.randn(shape)
    params = [p.detach().bfloat16() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                                cell.bias_hh)]
    with torch.no_grad():
        fp32 = naive_line_sweep(x, cell, reverse)
        naive = naive_line_sweep(x.bfloat16(), _bf16_cell(cell), reverse).float()
        plain = sweep_lines(x.bfloat16(), *params, reverse=reverse)
        fast = triton_sweep_lines(x.bfloat16(), *params, reverse=reverse)
    assert plain.dtype == fast.dtype == torch.bfloat16
    bf16_error = (naive - fp32).abs().max()
    assert bf16_error > 1e-3  # the reference really is rounded
    for name, y in (("plain", plain), ("fast", fast)):
        torch.testing.assert_close(y.float(), naive, atol=3e-2, rtol=0, msg=name)
        assert (y.float() - naive).abs().mean() < (naive - fp32).abs().mean() * 1.5, name


@pytest.mark.parametrize("implementation", ["plain", "triton"])
def test_layer_sweeps_follow_the_autocast_dtype(implementation, monkeypatch):
    """Under bf16 autocast the sweep computes in bf16 (as autocast ran nn.GRUCell) and returns the
    input's dtype; gradients reach the fp32 weights; outside autocast it stays fp32."""
    monkeypatch.setenv("SDN_SWEEP", implementation)
    torch.manual_seed(3)
    sweep = DirectionalSweep(6, "top_down")
    x = torch.randn(2, 6, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sweep(x)
    with torch.no_grad():
        ref = naive_sweep(x.bfloat16(), _bf16_cell(sweep.cell), "top_down").float()
        exact = naive_sweep(x, sweep.cell, "top_down")
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=0)
    assert (y.float() - exact).abs().max() > 1e-4  # not secretly fp32
    grads = torch.autograd.grad(y.sum(), list(sweep.parameters()))
    exact_grads = torch.autograd.grad(naive_sweep(x, sweep.cell, "top_down").sum(),
                                      list(sweep.parameters()))
    for g, e in zip(grads, exact_grads):
        assert g.dtype == torch.float32
        assert (g - e).norm() < 5e-2 * e.norm()  # bf16-rounded, not wrong
    assert sweep(x).dtype == torch.float32


def test_fast_sweep_reads_no_uninitialised_memory():
    """Deterministic mode fills new buffers with NaN: a read of an unwritten element would show."""
    torch.manual_seed(8)
    shape = (4, 5, 2, 6)
    cell = torch.nn.GRUCell(18, 6)
    x, grad_out = torch.randn(shape), torch.randn(shape)
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        fast = _grads(lambda t: triton_sweep_lines(t, *params, reverse=True), x, cell, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    naive = _grads(lambda t: naive_line_sweep(t, cell, True), x, cell, grad_out)
    for name, f, n in zip(NAMES, fast, naive):
        torch.testing.assert_close(f, n, atol=1e-5, rtol=1e-5, msg=name)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view  # views launch no kernel
        return func(*args, **(kwargs or {}))


def _count_ops(fn, num_lines: int) -> int:
    torch.manual_seed(4)
    cell = torch.nn.GRUCell(24, 8).to("meta")
    x = torch.empty(num_lines, 6, 2, 8, device="meta", requires_grad=True)
    with _OpCounter() as counter:
        y = fn(x, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        y.backward(torch.ones_like(y))
    return counter.count


def test_fast_sweep_dispatches_a_fixed_number_of_ops():
    """On the meta device each kernel is one operator: the count does not grow with the lines."""
    fast = [_count_ops(triton_sweep_lines, s) for s in (4, 32)]
    plain = [_count_ops(sweep_lines, s) for s in (4, 32)]
    assert fast[0] == fast[1] <= 16, fast
    assert plain[1] > plain[0] + 28 * 10, plain  # ≈ 20+ ops per line forward + backward


def test_maps_beyond_int32_offsets_take_the_plain_sweep(monkeypatch):
    monkeypatch.setattr("sdn.sweep_triton._MAX_ELEMENTS", 100)
    cell = torch.nn.GRUCell(12, 4)
    x = torch.randn(3, 4, 2, 4)  # 3·96 elements > 100
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    with _OpCounter() as counter:
        y = triton_sweep_lines(x, *params)
    assert counter.count > 10  # the plain loop's ops, no custom op
    assert torch.equal(y, sweep_lines(x, *params))


def test_custom_ops_are_registered_correctly():
    torch.manual_seed(5)
    shape = (3, 4, 2, 4)
    w_ih = torch.randn(12, 12)
    opcheck = torch.library.opcheck
    opcheck(torch.ops.sdn.sweep_forward.default,
            (torch.randn(shape), torch.randn(*shape[:3], 12), w_ih, torch.randn(12), False))
    opcheck(torch.ops.sdn.sweep_backward.default,
            (torch.randn(shape), torch.randn(shape), torch.randn(shape),
             torch.rand(*shape[:3], 12), torch.randn(shape), w_ih, True))


def test_selection(monkeypatch):
    monkeypatch.delenv("SDN_SWEEP", raising=False)
    assert select_sweep(torch.device("cpu")) is sweep_lines
    assert select_sweep(torch.device("cuda")) is triton_sweep_lines
    assert select_sweep(torch.device("cuda"), "plain") is sweep_lines
    monkeypatch.setenv("SDN_SWEEP", "triton")
    assert select_sweep(torch.device("cpu")) is triton_sweep_lines
    monkeypatch.setenv("SDN_SWEEP", "fast")
    with pytest.raises(ValueError, match="SDN_SWEEP"):
        select_sweep(torch.device("cpu"))


@pytest.mark.slow
def test_kernels_compile_for_an_h100():
    """Ahead-of-time compile for sm_90 (no GPU needed): catches what the interpreter accepts but
    the compiler rejects (block shapes, dtypes of tl.dot)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sdn.sweep_triton import _KERNELS

    consts = {"REVERSE": True, "BLOCK_L": 32, "BLOCK_N": 32, "BLOCK_K": 32, "UPCAST": False}
    sizes = dict.fromkeys(("S", "L", "B", "F"), "i32")
    for dtype in ("fp32", "bf16"):
        ptr = "*" + dtype
        forward = dict.fromkeys(("x_ptr", "gh_ptr", "w_ptr", "b_ptr", "out_ptr", "cand_ptr"), ptr)
        backward = dict.fromkeys(("gout_ptr", "x_ptr", "out_ptr", "gh_ptr", "cand_ptr", "w_ptr"),
                                 ptr)
        backward.update(carry_ptr="*fp32", gx_ptr=ptr, gpre_ptr=ptr, gph_ptr=ptr, nbr_ptr=ptr)
        for name, signature in (("forward", forward), ("backward", backward)):
            signature = {**signature, **sizes, **dict.fromkeys(consts, "constexpr")}
            source = ASTSource(_KERNELS[name][0], signature, constexprs=consts)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4})
            assert "bar.sync" in compiled.asm["ptx"]  # the per-line barrier is there


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled kernels)")


@CUDA
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_fast_sweep_matches_plain(reverse):
    torch.manual_seed(6)
    shape = (9, 11, 3, 40)
    cell = torch.nn.GRUCell(120, 40).cuda()
    x = torch.randn(shape, device="cuda")
    grad_out = torch.randn(shape, device="cuda")
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    fast = _grads(lambda t: triton_sweep_lines(t, *params, reverse=reverse), x, cell, grad_out)
    naive = _grads(lambda t: naive_line_sweep(t, cell, reverse), x, cell, grad_out)
    for name, f, n in zip(NAMES, fast, naive):
        torch.testing.assert_close(f, n, atol=1e-5, rtol=1e-5, msg=name)


@CUDA
def test_cuda_bf16_fast_sweep_matches_plain():
    torch.manual_seed(7)
    shape = (9, 11, 3, 40)
    cell = torch.nn.GRUCell(120, 40).cuda()
    x = torch.randn(shape, device="cuda").bfloat16()
    params = [p.detach().bfloat16() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                                cell.bias_hh)]
    fast = triton_sweep_lines(x, *params)
    plain = sweep_lines(x, *params)
    torch.testing.assert_close(fast.float(), plain.float(), atol=3e-2, rtol=0)
