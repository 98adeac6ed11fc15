"""Quantizers: the FSQ/LFQ definitions, VQ codebook maintenance, residual and factorised levels,
and the shared contract (shapes, determinism, batch-vs-single equality, gradients, specs)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmllm.errors import ConfigError
from mmllm.tokenizers.quantizers import (
    FactorizedQuantizer,
    FiniteScalarQuantizer,
    LookupFreeQuantizer,
    Quantizer,
    QuantizerOutput,
    ResidualQuantizer,
    VectorQuantizer,
    build_quantizer,
)

DIM = 8
SPECS = [
    {"kind": "vq", "codebook_size": 32},
    {"kind": "vq", "codebook_size": 32, "codebook_dim": 4},
    {"kind": "fsq", "bins": [8, 5, 5, 5]},
    {"kind": "fsq", "bins": [4] * DIM},
    {"kind": "lfq", "bits": DIM},
    {"kind": "lfq", "bits": 6},
    {"kind": "rvq", "codebook_size": 16, "depth": 3},
    {"kind": "rfsq", "bins": [4, 4, 4, 4], "depth": 2},
    {"kind": "factorized", "codebook_size": 16, "groups": 2},
]


def spec_id(spec: dict) -> str:
    return "-".join(f"{value}" for value in spec.values()).replace(" ", "")


def trained(spec: dict, steps: int = 3) -> Quantizer:
    """A quantizer after a few training batches (k-means init, EMA updates), in eval mode."""
    torch.manual_seed(0)
    quantizer = build_quantizer(DIM, spec)
    for _ in range(steps):
        quantizer(torch.randn(256, DIM))
    return quantizer.eval()


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_shapes_for_any_leading_dims(spec: dict) -> None:
    quantizer = trained(spec)
    for shape in [(DIM,), (5, DIM), (2, 3, 4, DIM)]:
        z = torch.randn(shape)
        out = quantizer(z)
        codes = quantizer.encode(z)
        assert isinstance(out, QuantizerOutput)
        assert out.quantized.shape == z.shape
        assert codes.shape == (*shape[:-1], quantizer.levels) and codes.dtype == torch.int64
        assert out.loss.shape == ()
        assert ((codes >= 0) & (codes < quantizer.codebook_size)).all()
        assert quantizer.decode(codes).shape == z.shape


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_eval_is_deterministic_and_consistent(spec: dict) -> None:
    quantizer = trained(spec)
    state = {key: value.clone() for key, value in quantizer.state_dict().items()}
    z = torch.randn(6, 7, DIM)
    first, second = quantizer(z), quantizer(z)
    torch.testing.assert_close(first.quantized, second.quantized, rtol=0, atol=0)
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(quantizer.encode(z), first.codes)
    torch.testing.assert_close(quantizer.decode(first.codes), first.quantized, rtol=1e-5, atol=1e-5)
    for key, value in quantizer.state_dict().items():
        assert torch.equal(value, state[key]), f"eval forward changed {key}"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_batch_equals_single(spec: dict) -> None:
    quantizer = trained(spec)
    z = torch.randn(5, 9, DIM)
    batch_codes = quantizer.encode(z)
    single_codes = torch.stack([quantizer.encode(item) for item in z])
    assert torch.equal(batch_codes, single_codes)
    torch.testing.assert_close(
        quantizer.decode(batch_codes), torch.stack([quantizer.decode(codes) for codes in single_codes])
    )


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_gradients_reach_the_input(spec: dict) -> None:
    quantizer = trained(spec).train()
    z = torch.randn(64, DIM, requires_grad=True)
    out = quantizer(z)
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    for name, parameter in quantizer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_state_dict_round_trip(spec: dict) -> None:
    quantizer = trained(spec)
    torch.manual_seed(1)
    fresh = build_quantizer(DIM, spec).eval()
    fresh.load_state_dict(quantizer.state_dict())
    z = torch.randn(4, 10, DIM)
    assert torch.equal(fresh.encode(z), quantizer.encode(z))
    torch.testing.assert_close(fresh(z).quantized, quantizer(z).quantized)


def test_usage_counts_codes_and_perplexity() -> None:
    quantizer = FiniteScalarQuantizer(3, bins=[2, 2, 2])
    stats = quantizer.usage(torch.tensor([[0], [1], [2], [3], [0], [1], [2], [3]]))
    assert stats["usage"] == pytest.approx(0.5)
    assert stats["perplexity"] == pytest.approx(4.0)
    collapsed = quantizer.usage(torch.zeros(10, 1, dtype=torch.long))
    assert collapsed == {"usage": pytest.approx(1 / 8), "perplexity": pytest.approx(1.0)}


# --- FSQ ---------------------------------------------------------------------------------------


def all_fsq_codes(quantizer: FiniteScalarQuantizer) -> torch.Tensor:
    return torch.arange(quantizer.codebook_size).unsqueeze(-1)


def test_fsq_codes_round_trip_through_decode_and_encode() -> None:
    quantizer = FiniteScalarQuantizer(4, bins=[8, 5, 4, 3])
    assert quantizer.codebook_size == 8 * 5 * 4 * 3 and not list(quantizer.parameters())
    codes = all_fsq_codes(quantizer)
    values = quantizer.decode(codes)
    assert values.min() >= -1 and values.max() <= 1
    assert len(torch.unique(values, dim=0)) == quantizer.codebook_size
    assert torch.equal(quantizer.values_to_codes(values).unsqueeze(-1), codes)
    # A latent that the paper's bound maps inside each code's rounding cell encodes to that code.
    integers = values * quantizer.half_width
    target = integers - 0.3 * integers.sign()
    preimage = torch.atanh((target + quantizer.offset) / quantizer.half_l) - quantizer.shift
    assert torch.equal(quantizer.encode(preimage), codes)


def test_fsq_bound_is_the_paper_definition() -> None:
    quantizer = FiniteScalarQuantizer(2, bins=[8, 5])
    half_l = torch.tensor([3.5, 2.0]) * (1 - 1e-3)
    offset = torch.tensor([0.5, 0.0])
    z = torch.linspace(-4, 4, 33).unsqueeze(-1).expand(-1, 2)
    expected = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    torch.testing.assert_close(quantizer.bound(z), expected)
    rounded = quantizer.bound(torch.tensor([[-50.0, -50.0], [50.0, 50.0]])).round()
    assert rounded.tolist() == [[-4.0, -2.0], [3.0, 2.0]]  # even L: -L/2 .. L/2 - 1; odd L: symmetric


def test_fsq_covers_exactly_the_codebook() -> None:
    quantizer = FiniteScalarQuantizer(4, bins=[8, 5, 4, 3])
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(40_000, 4, generator=generator) * 1.998 - 0.999  # uniform over the bounded range
    z = torch.atanh(uniform) - quantizer.shift
    extremes = torch.tensor([[-1e4] * 4, [1e4] * 4])
    codes = quantizer.encode(torch.cat([z, extremes]))
    assert codes.min() == 0 and codes.max() == quantizer.codebook_size - 1
    assert len(torch.unique(codes)) == quantizer.codebook_size


def test_fsq_gradient_flows_through_rounding() -> None:
    quantizer = FiniteScalarQuantizer(4, bins=[8, 8, 8, 8])
    z = torch.randn(100, 4, requires_grad=True)
    quantizer(z).quantized.sum().backward()
    expected = (1 - torch.tanh(z.detach() + quantizer.shift) ** 2) * quantizer.half_l / quantizer.half_width
    torch.testing.assert_close(z.grad, expected)
    assert quantizer(z).loss == 0


def test_fsq_projects_only_when_width_differs() -> None:
    assert not list(FiniteScalarQuantizer(3, bins=[8, 8, 8]).parameters())
    projected = FiniteScalarQuantizer(16, bins=[8, 8, 8])
    assert projected.project_in.weight.shape == (3, 16) and projected.project_out.weight.shape == (16, 3)


# --- VQ ------------------------------------------------------------------------------------------

CLUSTERS = 64


def clustered_batches(steps: int, batch: int = 1024) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batches from 64 tight gaussian clusters centred far from the origin, plus a held-out set."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(CLUSTERS, DIM, generator=generator) * 2 + 6  # +6: far from a N(0, 1) codebook

    def sample(size: int) -> torch.Tensor:
        members = torch.randint(CLUSTERS, (size,), generator=generator)
        return centres[members] + 0.1 * torch.randn(size, DIM, generator=generator)

    return [sample(batch) for _ in range(steps)], sample(4096)


def train_vq(quantizer: VectorQuantizer, batches: list[torch.Tensor], held_out: torch.Tensor) -> dict[str, float]:
    """Training-mode passes over the batches (the EMA codebook learns without an optimizer), held-out usage."""
    for batch in batches:
        quantizer(batch)
    quantizer.eval()
    return quantizer.usage(quantizer.encode(held_out))


def test_dead_code_restart_lifts_usage() -> None:
    batches, held_out = clustered_batches(60)
    torch.manual_seed(0)
    # decay 0.95 (default 0.99): the EMA settles within the test's 60 steps.
    without = VectorQuantizer(DIM, CLUSTERS, decay=0.95, kmeans_init=False, dead_code_threshold=0)
    without = train_vq(without, batches, held_out)
    torch.manual_seed(0)
    restarted = VectorQuantizer(DIM, CLUSTERS, decay=0.95, kmeans_init=False, dead_code_threshold=1.0)
    with_restart = train_vq(restarted, batches, held_out)
    assert without["usage"] <= 0.1  # the bad init leaves almost every code dead
    assert with_restart["usage"] >= 0.9
    assert with_restart["perplexity"] > 10 * without["perplexity"]
    # EMA moved the used codes onto the clusters: most points are coded within the cluster noise.
    errors = (restarted.decode(restarted.encode(held_out)) - held_out).square().sum(-1)
    assert errors.median() < 2 * DIM * 0.1**2


def test_kmeans_init_on_first_training_batch() -> None:
    batches, held_out = clustered_batches(1)
    torch.manual_seed(0)
    quantizer = VectorQuantizer(DIM, CLUSTERS, dead_code_threshold=0)
    assert not quantizer.initialized
    stats = train_vq(quantizer, batches, held_out)
    assert quantizer.initialized
    assert stats["usage"] >= 0.9


def test_vq_eval_never_initializes_or_updates() -> None:
    quantizer = VectorQuantizer(DIM, 16).eval()
    before = quantizer.embed.clone()
    quantizer(torch.randn(100, DIM) + 5)
    assert not quantizer.initialized and torch.equal(quantizer.embed, before)


def test_vq_commitment_loss_is_beta_times_distance() -> None:
    quantizer = VectorQuantizer(DIM, 16, commitment_weight=0.5).eval()
    z = torch.randn(30, DIM)
    out = quantizer(z)
    expected = 0.5 * (z - quantizer.decode(out.codes)).square().mean()
    torch.testing.assert_close(out.loss, expected)


def test_factorised_codebook_is_low_dim_and_unit_norm() -> None:
    quantizer = trained({"kind": "vq", "codebook_size": 32, "codebook_dim": 4}, steps=5)
    assert quantizer.embed.shape == (32, 4)
    torch.testing.assert_close(quantizer.embed.norm(dim=-1), torch.ones(32))
    assert quantizer.project_in.weight.shape == (4, DIM) and quantizer.project_out.weight.shape == (DIM, 4)


# --- LFQ -----------------------------------------------------------------------------------------


def test_lfq_codes_are_sign_bits_without_parameters() -> None:
    quantizer = LookupFreeQuantizer(6, bits=6, scale=0.5)
    assert not list(quantizer.parameters()) and quantizer.codebook_size == 64
    z = torch.randn(40, 6)
    codes = quantizer.encode(z)
    expected = sum((z[:, bit] > 0).long() << bit for bit in range(6))
    assert torch.equal(codes.squeeze(-1), expected)
    torch.testing.assert_close(quantizer.decode(codes), torch.where(z > 0, 0.5, -0.5))
    every_code = torch.arange(64).unsqueeze(-1)
    assert torch.equal(quantizer.encode(quantizer.decode(every_code)), every_code)


def test_lfq_entropy_penalty_rewards_spread_and_confident_codes() -> None:
    quantizer = LookupFreeQuantizer(4, bits=4)
    every_code = quantizer.decode(torch.arange(16).unsqueeze(-1))
    spread, collapsed = quantizer.entropy_penalty(every_code), quantizer.entropy_penalty(every_code[:1].expand(16, 4))
    assert spread == pytest.approx(-math.log(16), abs=1e-3)  # confident samples, uniform batch
    assert collapsed == pytest.approx(0.0, abs=1e-3)
    undecided = quantizer.entropy_penalty(torch.zeros(16, 4))
    assert undecided == pytest.approx(0.0, abs=1e-3)  # maximal per-sample entropy cancels the batch entropy


def test_lfq_entropy_penalty_spreads_codes_in_training() -> None:
    torch.manual_seed(0)
    quantizer = LookupFreeQuantizer(6, bits=6, commitment_weight=0.0, entropy_weight=1.0)
    # All in one code, and small: at temperature 0.01 the code probabilities of |z| >~ 0.1 saturate.
    z = (torch.randn(512, 6) * 0.002 + 0.01).requires_grad_()
    optimizer = torch.optim.Adam([z], lr=0.01)
    before = quantizer.usage(quantizer.encode(z))
    for _ in range(30):
        optimizer.zero_grad()
        quantizer(z).loss.backward()
        optimizer.step()
    after = quantizer.usage(quantizer.encode(z))
    assert before["perplexity"] == pytest.approx(1.0)
    assert after["usage"] >= 0.9 and after["perplexity"] > 30


# --- residual and factorised -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "spec"),
    [(DIM, {"kind": "rvq", "codebook_size": 16, "depth": 3}), (4, {"kind": "rfsq", "bins": [5, 4, 4, 3], "depth": 3})],
    ids=["rvq", "rfsq"],
)
def test_residual_levels_refine_the_reconstruction(width: int, spec: dict) -> None:
    torch.manual_seed(0)
    quantizer = build_quantizer(width, spec)
    for _ in range(20):
        quantizer(torch.randn(256, width))
    quantizer.eval()
    assert isinstance(quantizer, ResidualQuantizer) and quantizer.levels == 3
    z = torch.randn(2000, width)
    codes = quantizer.encode(z)
    target = quantizer.residual_target(z)
    errors = [(quantizer.decode(codes[..., :k]) - target).square().mean() for k in range(1, 4)]
    assert all(finer < 0.8 * coarser for coarser, finer in itertools.pairwise(errors))
    levels_sum = sum(
        level.decode(codes[..., i : i + 1]) * quantizer.scales[i] for i, level in enumerate(quantizer.quantizers)
    )
    torch.testing.assert_close(quantizer.decode(codes), levels_sum)


def test_rfsq_levels_scale_by_powers_of_the_step() -> None:
    quantizer = build_quantizer(4, {"kind": "rfsq", "bins": [4, 4, 4, 4], "depth": 3})
    assert quantizer.codebook_size == 256 and quantizer.levels == 3 and not list(quantizer.parameters())
    torch.testing.assert_close(quantizer.scales[:, 0], torch.tensor([1.0, 1 / 3, 1 / 9]))


def test_quantizer_dropout_trains_on_prefixes() -> None:
    torch.manual_seed(0)
    quantizer = build_quantizer(DIM, {"kind": "rvq", "codebook_size": 16, "depth": 4, "quantizer_dropout": 1.0})
    dropped_levels = {int((quantizer(torch.randn(32, DIM)).codes[0] < 0).sum()) for _ in range(40)}
    assert dropped_levels == {0, 1, 2, 3}  # n ~ Uniform{1..4} levels kept
    codes = quantizer(torch.randn(32, DIM)).codes
    assert 0 < quantizer.usage(codes)["usage"] <= 1
    assert (quantizer.eval()(torch.randn(32, DIM)).codes >= 0).all()  # no dropout at eval


def test_factorized_groups_have_own_codebooks() -> None:
    quantizer = trained({"kind": "factorized", "codebook_size": 16, "groups": 4})
    assert isinstance(quantizer, FactorizedQuantizer) and quantizer.levels == 4
    assert all(level.dim == DIM // 4 for level in quantizer.quantizers)
    z = torch.randn(10, DIM)
    codes = quantizer.encode(z)
    for group, level in enumerate(quantizer.quantizers):
        assert torch.equal(codes[:, group : group + 1], level.encode(z[:, 2 * group : 2 * group + 2]))


# --- specs -----------------------------------------------------------------------------------------


def test_spec_examples_from_the_brief() -> None:
    assert build_quantizer(16, {"kind": "fsq", "bins": [8, 8, 8]}).codebook_size == 512
    rfsq = build_quantizer(16, {"kind": "rfsq", "bins": [4, 4, 4, 4], "depth": 2})
    assert (rfsq.codebook_size, rfsq.levels) == (256, 2)
    vq = build_quantizer(64, {"kind": "vq", "codebook_size": 512, "codebook_dim": 16})
    assert (vq.codebook_size, vq.levels, vq.embed.shape) == (512, 1, (512, 16))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "pq"}, "unknown quantizer kind"),
        ({"bins": [8]}, "'kind' key"),
        ({"kind": "fsq"}, "missing keyword(s) ['bins']"),
        ({"kind": "fsq", "bins": [8], "codebook_size": 8}, "unknown keyword(s) ['codebook_size']"),
        ({"kind": "rvq", "depth": 2, "bins": [4]}, "unknown keyword(s) ['bins']"),
        ({"kind": "rfsq", "depth": 2}, "missing keyword(s) ['bins']"),
        ({"kind": "fsq", "bins": [1, 8]}, "bins must be"),
        ({"kind": "vq", "decay": 1.5}, "decay"),
        ({"kind": "lfq", "bits": 40}, "bits"),
        ({"kind": "factorized", "groups": 3}, "must divide"),
    ],
)
def test_bad_specs_raise_one_line_config_errors(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_quantizer(DIM, spec)
    assert message in str(error.value) and "\n" not in str(error.value)
