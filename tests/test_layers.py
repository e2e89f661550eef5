"""The SDN layer against a naive line-by-line reference written here, plus its contract."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sdn.layers import DIRECTIONS, DirectionalSweep, ResSDNLayer, SDNLayer

# ---------------------------------------------------------------------------------------------
# Naive reference: the paper's sweep written as a plain loop over lines, calling the same
# GRUCell on the concatenated neighbours [n(i-1), n(i), n(i+1)] of the updated previous line.
# It builds the result out of new tensors (no in-place writes), so autograd gives true gradients.
# ---------------------------------------------------------------------------------------------


def naive_sweep(x: torch.Tensor, cell: torch.nn.GRUCell, direction: str) -> torch.Tensor:
    """(B, F, H, W) -> (B, F, H, W), one sweep, one line at a time."""
    rows = direction in ("top_down", "bottom_up")
    if not rows:  # a column sweep is a row sweep of the transposed map
        return naive_sweep(x.transpose(2, 3), cell, {"left_right": "top_down",
                                                     "right_left": "bottom_up"}[direction]
                           ).transpose(2, 3)
    batch, feat, height, width = x.shape
    lines = [x[:, :, r, :] for r in range(height)]  # each (B, F, W)
    order = range(1, height) if direction == "top_down" else range(height - 2, -1, -1)
    for r in order:
        prev = lines[r - 1] if direction == "top_down" else lines[r + 1]
        padded = F.pad(prev, (1, 1))  # zeros beyond the border
        neighbours = torch.cat(
            [padded[:, :, 0:width], padded[:, :, 1:width + 1], padded[:, :, 2:width + 2]], dim=1
        )  # (B, 3F, W): n(i-1), n(i), n(i+1)
        inp = neighbours.permute(0, 2, 1).reshape(batch * width, 3 * feat)
        hidden = lines[r].permute(0, 2, 1).reshape(batch * width, feat)
        lines[r] = cell(inp, hidden).reshape(batch, width, feat).permute(0, 2, 1)
    return torch.stack(lines, dim=2)


def naive_sdn(layer: SDNLayer, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(layer.project_in(x))
    for sweep in layer.sweeps:
        h = naive_sweep(h, sweep.cell, sweep.direction)
    return layer.project_out(h)


def naive_res_sdn(layer: ResSDNLayer, x: torch.Tensor) -> torch.Tensor:
    y, g = naive_sdn(layer.sdn, x).chunk(2, dim=1)
    gate = torch.sigmoid(g)
    return gate * layer.conv(x) + (1 - gate) * y


def assert_same_outputs_and_grads(module, reference_fn, x, atol=1e-5, grad_atol=2e-5):
    """Outputs and gradients w.r.t. the input and every parameter agree with the reference."""
    x = x.clone().requires_grad_(True)
    params = list(module.parameters())
    out = module(x)
    ref = reference_fn(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + params, grad_out)
    ref_grads = torch.autograd.grad(ref, [x] + params, grad_out, allow_unused=True)
    # an unused parameter (a sweep over a single line) has zero gradient
    ref_grads = [torch.zeros_like(p) if g is None else g for p, g in zip([x] + params, ref_grads)]
    names = ["input"] + [n for n, _ in module.named_parameters()]
    for name, g, rg in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=grad_atol, rtol=1e-4, msg=f"gradient of {name}")


SHAPES = [(2, 6, 6), (3, 5, 9), (2, 9, 4)]  # (B, H, W): square, wide, tall


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_single_sweep_matches_naive_loop(direction, shape):
    torch.manual_seed(0)
    batch, height, width = shape
    sweep = DirectionalSweep(5, direction)
    x = torch.randn(batch, 5, height, width)
    assert_same_outputs_and_grads(sweep, lambda t: naive_sweep(t, sweep.cell, direction), x)


SEQUENCES = [
    ["left_right", "top_down"],
    ["top_down", "bottom_up"],  # two sweeps on the same axis
    ["right_left", "left_right"],
    ["left_right", "right_left", "top_down", "bottom_up"],
    ["bottom_up", "left_right", "top_down", "right_left"],
]


@pytest.mark.parametrize("directions", SEQUENCES, ids=lambda d: "-".join(d))
@pytest.mark.parametrize("shape", SHAPES)
def test_sdn_layer_matches_naive_loop(directions, shape):
    torch.manual_seed(1)
    batch, height, width = shape
    layer = SDNLayer(3, 4, 6, directions)
    x = torch.randn(batch, 3, height, width)
    assert_same_outputs_and_grads(layer, lambda t: naive_sdn(layer, t), x)


@pytest.mark.parametrize("shape", [(2, 4, 4), (1, 3, 5)])
def test_upsampling_res_sdn_matches_naive(shape):
    torch.manual_seed(2)
    batch, height, width = shape
    layer = ResSDNLayer(3, 4, 6, ["left_right", "top_down"], kernel_size=4, stride=2, padding=1,
                        upsample=True)
    assert isinstance(layer.sdn.project_in, torch.nn.ConvTranspose2d)
    assert isinstance(layer.conv, torch.nn.ConvTranspose2d)
    x = torch.randn(batch, 3, height, width)
    assert layer(x).shape == (batch, 4, 2 * height, 2 * width)
    assert_same_outputs_and_grads(layer, lambda t: naive_res_sdn(layer, t), x)


def test_res_sdn_gate_formula():
    torch.manual_seed(3)
    layer = ResSDNLayer(3, 2, 4, [0, 2])  # official indices: left_right, top_down
    assert layer.sdn.directions == ["left_right", "top_down"]
    assert layer.sdn.project_out.out_channels == 4  # 2·out_channels: (y, g)
    x = torch.randn(2, 3, 5, 7)
    assert_same_outputs_and_grads(layer, lambda t: naive_res_sdn(layer, t), x)


def test_float64_matches_naive():
    torch.manual_seed(4)
    layer = SDNLayer(2, 3, 4, DIRECTIONS).double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    assert_same_outputs_and_grads(layer, lambda t: naive_sdn(layer, t), x, atol=1e-12,
                                  grad_atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_first_line_of_sweep_is_unchanged(direction):
    torch.manual_seed(5)
    sweep = DirectionalSweep(4, direction)
    x = torch.randn(2, 4, 5, 7)
    y = sweep(x)
    first = {"left_right": (slice(None), 0), "right_left": (slice(None), -1),
             "top_down": (0, slice(None)), "bottom_up": (-1, slice(None))}[direction]
    index = (slice(None), slice(None)) + first
    assert torch.equal(y[index], x[index])
    assert not torch.allclose(y, x)


def test_top_down_is_causal():
    torch.manual_seed(6)
    sweep = DirectionalSweep(4, "top_down")
    x = torch.randn(2, 4, 7, 5)
    r = 3
    x2 = x.clone()
    x2[:, :, r, :] += torch.randn(2, 4, 5)
    y, y2 = sweep(x), sweep(x2)
    assert torch.equal(y[:, :, :r], y2[:, :, :r]), "rows above r must not change"
    for below in range(r, 7):
        assert not torch.allclose(y[:, :, below], y2[:, :, below]), f"row {below} must change"


def test_does_not_modify_input_and_is_deterministic():
    torch.manual_seed(7)
    layer = ResSDNLayer(3, 3, 5, DIRECTIONS)
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    before = x.detach().clone()
    out1 = layer(x)
    out1.sum().backward()
    grad1 = x.grad.clone()
    x.grad = None
    out2 = layer(x)
    out2.sum().backward()
    assert torch.equal(x.detach(), before)
    assert torch.equal(out1, out2)
    assert torch.equal(grad1, x.grad)


@pytest.mark.parametrize("batch", [1, 5])
def test_any_batch_size_and_inference_mode(batch):
    torch.manual_seed(8)
    layer = SDNLayer(3, 2, 4, ["top_down", "left_right"])
    x = torch.randn(batch, 3, 4, 6)
    with torch.no_grad():
        y = layer(x)
    with torch.inference_mode():
        y_inf = layer(x)
    torch.testing.assert_close(y, naive_sdn(layer, x).detach(), atol=1e-5, rtol=0)
    assert torch.equal(y, y_inf)


def test_bf16_autocast_on_cpu_close_to_float32():
    torch.manual_seed(9)
    layer = ResSDNLayer(3, 4, 8, ["left_right", "top_down"])
    x = torch.randn(2, 3, 8, 8)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    # bf16 convs around the float32 recurrence: ~3 significant digits
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(10)
    layer = SDNLayer(3, 4, 6, DIRECTIONS)
    x = torch.randn(2, 3, 6, 9)
    ref = layer(x)
    out = layer.cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DirectionalSweep(4, "diagonal"), "unknown SDN direction"),
        (lambda: DirectionalSweep(4, 7), "unknown SDN direction"),
        (lambda: SDNLayer(3, 4, 5, []), "non-empty"),
        (lambda: SDNLayer(3, 4, 5, ["left_right", "up"]), "unknown SDN direction"),
        (lambda: SDNLayer(3, 4, 0, ["left_right"]), "num_features"),
        (lambda: DirectionalSweep(0, "top_down"), "num_features"),
    ],
)
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "module, x, message",
    [
        (DirectionalSweep(4, "top_down"), torch.randn(4, 5, 5), "4-D input"),
        (DirectionalSweep(4, "top_down"), torch.randn(1, 3, 5, 5), "4 input channels"),
        (SDNLayer(3, 2, 4, ["left_right"]), torch.randn(1, 2, 5, 5), "3 input channels"),
        (ResSDNLayer(3, 2, 4, ["left_right"]), torch.randn(3, 5, 5), "4-D input"),
    ],
)
def test_bad_inputs_raise_value_error(module, x, message):
    with pytest.raises(ValueError, match=message):
        module(x)


def test_parameter_layout_follows_the_api():
    layer = SDNLayer(3, 4, 5, ["left_right", "bottom_up"], kernel_size=3)
    assert isinstance(layer.project_in, torch.nn.Conv2d)
    assert isinstance(layer.sweeps, torch.nn.ModuleList)
    assert [s.direction for s in layer.sweeps] == ["left_right", "bottom_up"]
    for sweep in layer.sweeps:
        assert isinstance(sweep.cell, torch.nn.GRUCell)
        assert (sweep.cell.input_size, sweep.cell.hidden_size) == (15, 5)
    assert layer.project_out.kernel_size == (1, 1)
    assert (layer.project_out.in_channels, layer.project_out.out_channels) == (5, 4)


def test_all_direction_pairs_on_one_line_maps():
    """Degenerate maps with a single line along the sweep axis are left as they are."""
    torch.manual_seed(11)
    for direction, shape in itertools.product(DIRECTIONS, [(1, 1), (1, 4), (4, 1)]):
        sweep = DirectionalSweep(3, direction)
        x = torch.randn(2, 3, *shape)
        assert_same_outputs_and_grads(sweep, lambda t: naive_sweep(t, sweep.cell, direction), x)


def test_reads_no_uninitialised_memory():
    """In deterministic mode torch fills new buffers with NaN: any read of one would show."""
    torch.manual_seed(12)
    layer = SDNLayer(3, 4, 5, DIRECTIONS)
    x = torch.randn(2, 3, 6, 7)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert_same_outputs_and_grads(layer, lambda t: naive_sdn(layer, t), x)
    finally:
        torch.use_deterministic_algorithms(previous)
