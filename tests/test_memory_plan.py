"""sdn.memory_plan against independent counts, and the acceptance test of issue 21: every phase of
every paper run fits one 80 GiB GPU.

The planner's figures are checked against (a) exact hand counts of small tensor programs, (b) the
bytes autograd really saves in a real CPU forward of a tiny model (``saved_tensors_hooks``, counted
by storage), (c) the flop counter's own formula for the in-place GEMM it misses.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import baselines  # noqa: E402,F401  (registers the decoder blocks)
from benchmarks.memory_plan import paper_runs, plan_run  # noqa: E402
from pipelines.study import load_study  # noqa: E402
from sdn import memory_plan as mp  # noqa: E402
from sdn.models.hvae import build_hvae, get_config  # noqa: E402


def test_tracker_counts_live_storages_once_and_frees_them() -> None:
    """4-byte floats: a (1000,) tensor, a view of it and a product; peak and live by hand."""
    with mp.MemoryTracker() as tracker:
        a = torch.empty(1000, device="meta")
        view = a.view(10, 100)  # shares a's storage: no new bytes
        assert tracker.live == 4000
        b = a * 2
        assert (tracker.live, tracker.peak) == (8000, 8000)
        del a
        assert tracker.live == 8000  # the view keeps the storage alive
        del view
        assert tracker.live == 4000
        tracker.reset_peak()
        c = torch.empty(250, dtype=torch.float64, device="meta")
        assert (tracker.live, tracker.peak) == (6000, 6000)
        del b, c
        assert tracker.live == 0


def test_flops_include_the_in_place_gemm_the_flop_counter_misses() -> None:
    """addmm (counted by torch's formula) and addmm_ (added by the tracker): 2 * m * k * n each."""
    m, k, n = 3, 5, 7
    with mp.MemoryTracker() as tracker:
        x, w = torch.empty(m, k, device="meta"), torch.empty(k, n, device="meta")
        acc = torch.addmm(torch.empty(m, n, device="meta"), x, w)
        assert tracker.flops == 2 * m * k * n
        acc.addmm_(x, w)
        assert tracker.flops == 4 * m * k * n


def test_meta_autocast_lowers_convolutions_and_respects_disabled_regions() -> None:
    """Under emulated fp16 autocast a conv runs in fp16; an ``enabled=False`` region stays fp32;
    torch.autocast is restored afterwards (and still refuses "meta" outside the block)."""
    conv = nn.Conv2d(3, 4, 3, device="meta")
    x = torch.empty(2, 3, 8, 8, device="meta")
    with mp.meta_autocast():
        with torch.autocast(device_type="meta", dtype=torch.float16):
            assert conv(x).dtype == torch.float16
            with torch.autocast(device_type="meta", enabled=False):
                assert conv(x).dtype == torch.float32
            assert conv(x).dtype == torch.float16
        assert conv(x).dtype == torch.float32
    with pytest.raises(RuntimeError):
        torch.autocast(device_type="meta")


def _saved_bytes_of_a_real_forward(model: nn.Module, images: torch.Tensor) -> tuple[int, dict]:
    """Bytes of the distinct storages autograd saves in ``model(images)`` on CPU, parameters excluded
    and buffers (they exist before the forward), and the forward's output."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:  # saved tensors stay alive with the graph: ptrs are unique
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images)
    return sum(saved.values()), out


def test_activation_plan_equals_what_autograd_saves_on_a_real_cpu_forward() -> None:
    """Tiny HVAE (SDN, resampling, IAF, DML): the bytes the planner sees alive after the forward on
    meta equal the bytes autograd saves in the same forward on CPU, plus the four output scalars."""
    config = get_config("tiny")
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    cpu_model = build_hvae(config, "sdn")
    saved, out = _saved_bytes_of_a_real_forward(cpu_model, images)
    independent = saved + sum(t.untyped_storage().nbytes() for t in out.values())  # + the four output scalars
    with mp.meta_autocast(), mp.MemoryTracker() as tracker:
        model = build_hvae(config, "sdn", device="meta")
        before = tracker.live
        planned_out = model(images.to("meta"))
        after = tracker.live
    del planned_out
    assert saved > 0
    assert after - before == independent, (after - before, saved)


def test_train_plan_holds_parameters_gradients_adamax_and_ema_state() -> None:
    """Planned train peak of a model without activations to speak of (one linear layer, batch 1):
    params x (1 + grad + 2 Adamax + EMA + DDP buckets) = 6x the parameter bytes, plus at most one
    parameter-sized temporary of Adamax's foreach step."""
    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(1000, 1000)

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": self.fc(images.flatten(1).float()[:, :1000]).square().mean()}

    plan = mp.plan_train_step(Linear, (1, 40, 25), 1, "fp32", ema=True, ddp=True)
    param_bytes = (1000 * 1000 + 1000) * 4
    assert 6 * param_bytes <= plan.peak_bytes <= 7 * param_bytes + 100_000
    assert plan.flops == 2 * 2 * 1000 * 1000  # the forward GEMM and the weight gradient's (no input grad)


def test_largest_fitting_size_by_hand() -> None:
    """Affine plans: 1 GiB context aside, 10 GiB fixed and 1 GiB per item (x 1.15 headroom)."""
    def plan(n: int) -> mp.PhasePlan:
        return mp.PhasePlan("x", n, (10 + n) * mp.GIB, 0)

    budget = 80 * mp.GIB
    exact = int((budget - mp.CONTEXT_BYTES) / (1 + mp.HEADROOM_FRACTION) / mp.GIB) - 10  # 58
    assert mp.largest_fitting_size(plan(4), plan(8), budget) == exact - exact % 8
    assert mp.chunks_that_fit(plan, budget, 4) == exact - exact % 8
    assert plan(exact - exact % 8).fits(budget) and not plan(exact + 8).fits(budget)
    assert mp.largest_fitting_size(plan(1), plan(2), 14 * mp.GIB) == 1  # (14 - 1) / 1.15 - 10 = 1.3
    assert mp.largest_fitting_size(plan(1), plan(2), 10 * mp.GIB) == 0


def test_iw_chunk_split_covers_pairs() -> None:
    """A chunk below K holds one image's samples; above it, whole images."""
    assert mp.iw_chunk_split(256, 1024) == (1, 256)
    assert mp.iw_chunk_split(1024, 1024) == (1, 1024)
    assert mp.iw_chunk_split(4096, 1024) == (4, 1024)
    assert mp.iw_pass(1024, 1024, 128, features=True) == (128, 1024)  # the batch's features stay alive
    assert mp.iw_pass(1024, 4, 128, features=True) == (128, 512)
    assert mp.iw_pass(4096, 1024, 128, features=False) == (4, 4096)


def test_iw_chunk_plan_runs_the_model_and_grows_with_the_chunk() -> None:
    """A tiny HVAE's IW chunk is planned (whichever IW interface the model has); more pairs, more memory
    and FLOPs."""
    build = functools.partial(build_hvae, get_config("tiny"), "sdn")
    small, large = (mp.plan_iw_chunk(build, (3, 8, 8), n, 8, batch=2) for n in (4, 16))
    assert 0 < small.peak_bytes < large.peak_bytes and 0 < small.flops < large.flops


@pytest.fixture(scope="module")
def paper_study():
    return load_study(ROOT / "params-paper.yaml")


@pytest.mark.slow
def test_every_phase_of_every_paper_run_fits_80_gib(paper_study) -> None:
    """Issue 21's acceptance: at the sizes params-paper.yaml gives, every phase of every paper run
    (seeds share) is planned within 80 GiB per GPU, headroom included."""
    budget = 80 * mp.GIB
    start = time.perf_counter()
    rows = [row for run in paper_runs(paper_study) for row in plan_run(paper_study, run, budget, {}, search=False)]
    too_big = [(r.config, r.model, r.phase, r.size, round(r.planned_gib, 1)) for r in rows if not r.fits]
    assert not too_big
    phases = {(r.config, r.model): set() for r in rows}
    for r in rows:
        phases[(r.config, r.model)].add(r.phase)
    assert all(p == set(mp.PHASES) for (c, _), p in phases.items() if c != "shapes3d")
    print(f"planned {len(rows)} phases in {time.perf_counter() - start:.0f} s")


def test_train_stage_preflight_names_the_key_and_the_figures() -> None:
    """pipelines/train.py's pre-flight (called directly with a fake budget): a budget below the plan
    fails naming <family>.<dataset>.train.micro_batch_size and the GiB; enough budget passes; on CPU
    (no budget given, no GPU) it is skipped."""
    from pipelines.train import MemoryPlanError, check_memory_plan

    study = load_study(ROOT / "params.yaml")
    run = study.runs("density")[0]
    config = study.train_config(run)
    plan = check_memory_plan(study, run, config, available_bytes=80 * mp.GIB)
    assert plan is not None and plan.fits(80 * mp.GIB)
    with pytest.raises(MemoryPlanError, match=rf"density\.{run.dataset}\.train\.micro_batch_size = \d+ .*"
                                              rf"needs {plan.planned_gib:.1f} GiB per GPU.* 0\.5 GiB are available"):
        check_memory_plan(study, run, config, available_bytes=mp.GIB // 2)
    if not torch.cuda.is_available():
        assert check_memory_plan(study, run, config) is None


def test_benchmark_exits_1_when_a_phase_exceeds_the_budget(capsys) -> None:
    """benchmarks/memory_plan.py on the small 3DShapes runs: 0 within 80 GiB, 1 (and the offending
    phase named) within 2 GiB, where the SDN VAE's training step (2.5 GiB planned) does not fit."""
    from benchmarks.memory_plan import main

    assert main(["--configs", "shapes3d", "--no-search"]) == 0
    assert main(["--configs", "shapes3d", "--no-search", "--gpu-memory", "2"]) == 1
    assert "DOES NOT FIT: shapes3d/sdn train at 128" in capsys.readouterr().err
