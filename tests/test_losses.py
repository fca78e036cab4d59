"""Gate losses (Eq. 7-9): values, gradients, corner cases, GBaS priors, DDP gather, bad inputs."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msvit.losses import GBaSLoss, bas_loss, centre_prior, l0_loss, relaxed_bernoulli_cdf


def sample_relaxed_bernoulli(mu, tau, shape, generator):
    """sigmoid((logit(mu) + L) / tau), L ~ Logistic(0, 1): the prior BaS should prefer."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    return torch.sigmoid((math.log(mu / (1 - mu)) + torch.logit(u)) / tau).float()


def test_l0_zero_at_or_below_target():
    m = torch.tensor([[0.1, 0.3], [0.25, 0.15], [0.0, 0.4]])  # per-image means 0.2, 0.2, 0.2
    assert l0_loss(m, 0.2).item() == pytest.approx(0.0, abs=1e-7)
    assert l0_loss(m, 0.5).item() == 0.0
    assert l0_loss(torch.tensor([[0.9, 0.7], [0.1, 0.1]]), 0.5).item() == pytest.approx(0.15)  # (0.3 + 0) / 2


def test_two_sided_l0_pins_the_batch_rate_from_both_sides():
    low = torch.full((3, 4), 0.1, requires_grad=True)
    high = torch.full((3, 4), 0.6, requires_grad=True)
    assert l0_loss(low, 0.25).item() == 0.0  # the hinge gives a sparse gate nothing back
    assert l0_loss(low, 0.25, two_sided=True).item() == pytest.approx(0.15)
    l0_loss(low, 0.25, two_sided=True).backward()
    l0_loss(high, 0.25, two_sided=True).backward()
    assert (low.grad < 0).all() and (high.grad > 0).all()  # descent raises the low rate, lowers the high one
    mixed = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # batch mean 0.25: on target
    assert l0_loss(mixed, 0.25, two_sided=True).item() == 0.0


def test_l0_gradient_lowers_excess():
    m = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    m.requires_grad_(True)
    loss = l0_loss(m, 0.25)
    loss.backward()
    assert loss.item() > 0 and (m.grad >= 0).all()
    with torch.no_grad():
        stepped = m - 1.0 * m.grad
    assert stepped.mean() < m.mean()
    assert l0_loss(stepped, 0.25) < loss


def test_relaxed_bernoulli_cdf_matches_samples():
    g = torch.Generator().manual_seed(0)
    x = sample_relaxed_bernoulli(0.3, 0.3, (20000,), g)
    for q in (0.05, 0.3, 0.5, 0.9):
        empirical = (x <= q).float().mean().item()
        assert relaxed_bernoulli_cdf(torch.tensor(q), 0.3, 0.3).item() == pytest.approx(empirical, abs=0.015)
    assert relaxed_bernoulli_cdf(torch.tensor(0.5), 0.3, 0.3).item() == pytest.approx(0.7)  # P(X <= 1/2) = 1 - mu


def test_bas_single_value_closed_form():
    # one value: ecdf = 1/2 and F(1/2) = 1 - mu, so the loss is (1/2 - mu)^2
    assert bas_loss(torch.tensor([[0.5]]), 0.2).item() == pytest.approx(0.09, abs=1e-6)


def test_bas_prefers_prior_samples_over_constant_at_mean():
    g = torch.Generator().manual_seed(0)
    target, tau = 0.3, 0.3
    drawn = sample_relaxed_bernoulli(target, tau, (64, 49), g)
    constant = torch.full((64, 49), target)  # Fig. 3a: right mean, no conditional behaviour
    drawn_loss, constant_loss = bas_loss(drawn, target, tau), bas_loss(constant, target, tau)
    assert drawn_loss < 0.01 and constant_loss > 0.05 and constant_loss > 10 * drawn_loss
    # Clamping x into [eps, 1 - eps] flattens the prior's CDF outside it: at tau = 0.3, 23% of the
    # prior lies below 1e-3, so even exact prior samples keep a floor F(eps)^3/3 + (1-F(1-eps))^3/3.
    f_lo = relaxed_bernoulli_cdf(torch.tensor(0.0), target, tau).item()
    f_hi = 1 - relaxed_bernoulli_cdf(torch.tensor(1.0), target, tau).item()
    assert drawn_loss.item() == pytest.approx((f_lo**3 + f_hi**3) / 3, abs=5e-4)
    assert bas_loss(drawn, target, tau, eps=1e-6) < 1e-4  # a finer clamp removes the floor
    # flattened: shuffling values across positions changes nothing
    perm = torch.randperm(drawn.numel(), generator=g)
    assert bas_loss(drawn.flatten()[perm].view(64, 49), target, tau).item() == pytest.approx(drawn_loss.item())


def test_bas_gradient_spreads_a_constant_batch():
    m = torch.full((16, 8), 0.4)
    m += torch.linspace(-1e-3, 1e-3, 128).view(16, 8)  # break ties so the sort is defined
    m.requires_grad_(True)
    bas_loss(m, 0.4).backward()
    order = m.detach().flatten().argsort()
    grad = m.grad.flatten()[order]
    # descent moves the lowest values down and the highest up, toward the bimodal prior
    assert (grad[:32] > 0).all() and (grad[-32:] < 0).all()


def test_gbas_gradients_reach_gates_and_priors():
    loss_fn = GBaSLoss((4, 6), 0.25)
    m = torch.rand(8, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = loss_fn(m)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert m.grad.abs().sum() > 0 and (m.grad != 0).sum() > 12
    assert loss_fn.prior_logits.grad is not None and loss_fn.prior_logits.grad.abs().sum() > 0
    assert [n for n, _ in loss_fn.named_parameters()] == ["prior_logits"]


def test_gbas_centre_init():
    for grid, target in (((7, 7), 0.5), ((4, 6), 0.25), ((14, 14), 0.1)):
        theta = GBaSLoss(grid, target).priors.detach().view(grid)
        corners = theta[[0, 0, -1, -1], [0, -1, 0, -1]]
        centre = theta[(grid[0] - 1) // 2 : grid[0] // 2 + 1, (grid[1] - 1) // 2 : grid[1] // 2 + 1]
        assert (centre.min() > corners.max()) and theta.mean().item() == pytest.approx(target, abs=1e-3)
        assert ((theta > 0) & (theta < 1)).all()
    flat = GBaSLoss((4, 6), 0.25, ctr_init=False).priors.detach()
    assert torch.allclose(flat, torch.full((24,), 0.25))
    assert torch.allclose(GBaSLoss(49, 0.5).priors.detach(), centre_prior((7, 7), 0.5), atol=1e-6)


def _fit_priors(sigma, m_sampler=None, steps=120):
    """Adam on the priors only; m_sampler=None optimises the hyperprior term alone."""
    loss_fn = GBaSLoss((6, 6), 0.3, sigma=sigma, ctr_init=m_sampler is None)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (loss_fn.hyperprior_term() if m_sampler is None else loss_fn(m_sampler())).backward()
        opt.step()
    return loss_fn.priors.detach()


def test_gbas_small_sigma_pulls_priors_together():
    initial = GBaSLoss((6, 6), 0.3).priors.detach()
    tight, loose = _fit_priors(0.05), _fit_priors(1.0)  # hyperprior alone, from the centre init
    assert tight.std() < 0.5 * initial.std() and tight.std() < 0.2 * loose.std()
    assert tight.mean().item() == pytest.approx(0.3, abs=0.01)
    # full loss on gates whose positions really differ: small sigma keeps the priors together,
    # large sigma lets each prior follow its column (the flattened-BaS end of the range)
    g = torch.Generator().manual_seed(1)
    column_mu = torch.linspace(0.05, 0.7, 36)
    sampler = lambda: sample_relaxed_bernoulli_cols(column_mu, 0.3, 32, g)  # noqa: E731
    tight, loose = _fit_priors(0.01, sampler), _fit_priors(1.0, sampler)
    assert tight.std() < 0.05 < 0.15 < loose.std()
    assert torch.corrcoef(torch.stack([loose, column_mu]))[0, 1] > 0.9


def sample_relaxed_bernoulli_cols(mu, tau, batch, generator):
    u = torch.rand(batch, mu.numel(), generator=generator).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((torch.logit(mu) + torch.logit(u)) / tau)


def test_gbas_with_shared_prior_is_per_position_bas():
    # theta_i = g* for all i (the sigma -> 0 limit): the position term is per-column BaS
    loss_fn = GBaSLoss((3, 4), 0.3, ctr_init=False)
    m = torch.rand(10, 12, generator=torch.Generator().manual_seed(0))
    per_column = torch.stack([bas_loss(m[:, i : i + 1], 0.3) for i in range(12)])
    terms = loss_fn.terms(m)
    assert terms.positions.item() == pytest.approx(per_column.mean().item(), rel=1e-5)
    summed = GBaSLoss((3, 4), 0.3, ctr_init=False, reduction="sum").terms(m)
    assert summed.positions.item() == pytest.approx(per_column.sum().item(), rel=1e-5)
    assert loss_fn(m).item() == pytest.approx((terms.positions + terms.hyperprior).item())


def test_losses_keep_float32_under_half_inputs():
    m = torch.rand(4, 9).half()
    assert bas_loss(m, 0.5).dtype == torch.float32 and GBaSLoss(9, 0.5)(m).dtype == torch.float32
    assert l0_loss(m.double(), 0.5).dtype == torch.float64


@pytest.mark.parametrize(
    "bad_m", [torch.rand(5), torch.rand(2, 3, 4), torch.ones(2, 3, dtype=torch.long), torch.rand(0, 4)]
)
def test_bad_m_raises(bad_m):
    for fn in (lambda m: l0_loss(m, 0.5), lambda m: bas_loss(m, 0.5), GBaSLoss((2, 2), 0.5)):
        with pytest.raises(ValueError, match="m must"):
            fn(bad_m)
    with pytest.raises(TypeError):
        l0_loss([[0.5]], 0.5)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_bad_target_raises(target):
    with pytest.raises(ValueError, match="target"):
        l0_loss(torch.rand(2, 4), target)
    with pytest.raises(ValueError, match="target"):
        bas_loss(torch.rand(2, 4), target)
    with pytest.raises(ValueError, match="target"):
        GBaSLoss((2, 2), target)


def test_gbas_bad_arguments_raise():
    with pytest.raises(ValueError, match="positions"):
        GBaSLoss((4, 4), 0.5)(torch.rand(2, 15))
    with pytest.raises(ValueError, match="grid"):
        GBaSLoss(15, 0.5)  # centre init needs a 2-D grid
    assert GBaSLoss(15, 0.5, ctr_init=False).grid == (1, 15)
    for kwargs in (
        {"grid": (0, 4)},
        {"grid": (2, 2.0)},
        {"grid": -3},
        {"sigma": 0.0},
        {"temperature": -1.0},
        {"reduction": "max"},
    ):
        with pytest.raises(ValueError):
            GBaSLoss(**{"grid": (2, 2), "target": 0.5, **kwargs})
    with pytest.raises(ValueError, match="temperature"):
        bas_loss(torch.rand(2, 2), 0.5, temperature=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    m_all = torch.rand(7, 9, generator=torch.Generator().manual_seed(0))
    m = m_all[SLICES[rank]].clone().requires_grad_(True)  # unequal local batches: 4 and 3
    loss_fn = GBaSLoss((3, 3), 0.4, gather=True)
    loss = bas_loss(m, 0.4, gather=True) + loss_fn(m)
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "grad": m.grad, "prior_grad": loss_fn.prior_logits.grad},
        os.path.join(out_dir, f"{rank}.pt"),
    )
    dist.destroy_process_group()


SLICES = (slice(0, 4), slice(4, 7))


def test_gather_uses_global_batch_under_ddp(tmp_path):
    world = 2
    mp.spawn(_gather_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    m_all = torch.rand(7, 9, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss_fn = GBaSLoss((3, 3), 0.4)
    loss = bas_loss(m_all, 0.4) + loss_fn(m_all)
    loss.backward()
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)  # same global loss on every rank
        assert torch.allclose(got["prior_grad"], loss_fn.prior_logits.grad, atol=1e-6)
        # the backward sums every rank's gradient: DDP's averaging then gives dL/dm exactly
        assert torch.allclose(got["grad"], world * m_all.grad[SLICES[rank]], atol=1e-6)


def test_gather_is_a_no_op_without_process_group():
    m = torch.rand(3, 4)
    assert bas_loss(m, 0.5, gather=True).item() == bas_loss(m, 0.5).item()
