"""The Fusion-Diff model on tiny tensors: prior, Control-Adapter, loss, sampler, checkpoints."""
import pytest
import torch

from model.checkpoints import CheckpointMismatch, load_adapter, load_prior
from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig, ddpm_scheduler, diffusion_loss
from model.kinds import PREDICTION_TYPES
from model.prior import ControlAdapter, FusionDiffPrior

from pipelines.config import load_config, plain

pytestmark = pytest.mark.fast

D, COND = 32, 16
SIZES = dict(d_vl=D, cond_dim=COND, map_channels=4, map_size=8, patch_size=2, hidden_size=32, num_heads=4,
             mlp_ratio=2.0, num_encoder_blocks=2, num_decoder_blocks=2, frequency_size=32)


def conf():
    cfg = load_config("conf/demo.yaml")
    return DiffusionConfig(**plain(cfg.diffusion)), plain(cfg.sampling)


def trained_like(seed=0) -> FusionDiffPrior:
    """A prior whose zero-initialised gates and outputs are open, as after training."""
    torch.manual_seed(seed)
    prior = FusionDiffPrior(**SIZES)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return prior.eval()


def inputs(b=3, k=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, D, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    c = torch.randn(b, k, COND, generator=g)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, 2:] = False
    zq = torch.randn(b, D, generator=g)
    return z, t, c, mask, zq


def open_adapter(prior, seed=2):
    adapter = ControlAdapter.from_prior(prior)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(seed)))
    return adapter


@pytest.mark.parametrize("b", [1, 3, 5])
def test_output_shape_for_odd_batches(b):
    z, t, c, mask, zq = inputs(b)
    prior = trained_like()
    assert prior(z, t, c, mask).shape == (b, D)
    assert prior(z, t, c, mask, adapter=open_adapter(prior), z_query=zq).shape == (b, D)
    assert prior(z, t[0], None, None).shape == (b, D)  # scalar timestep, no text


def test_fresh_prior_predicts_zero_and_refuses_wrong_sizes():
    z, t, c, mask, _ = inputs()
    assert torch.equal(FusionDiffPrior(**SIZES)(z, t, c, mask), torch.zeros(3, D))
    with pytest.raises(ValueError, match="d_vl=32"):
        trained_like()(torch.randn(2, 48), t[:2])
    with pytest.raises(ValueError, match="cond_dim=16"):
        trained_like()(z, t, torch.randn(3, 5, 8), mask)


@pytest.mark.parametrize("delta", [1.0, 0.3])
def test_fresh_adapter_changes_nothing_bit_for_bit(delta):
    z, t, c, mask, zq = inputs()
    prior = trained_like()
    adapter = ControlAdapter.from_prior(prior)
    with torch.no_grad():
        bare = prior(z, t, c, mask)
        assert torch.equal(prior(z, t, c, mask, adapter=adapter, z_query=zq, control_scale=delta), bare)
        rows = torch.tensor([True, False, True])
        assert torch.equal(prior(z, t, c, mask, adapter=adapter, z_query=zq, control_rows=rows), bare)
        opened = open_adapter(prior)
        steered = prior(z, t, c, mask, adapter=opened, z_query=zq, control_rows=rows)
    assert (steered[0] - bare[0]).abs().max() > 1e-4
    assert torch.equal(steered[1], bare[1])  # a row outside control_rows is the bare prior's


def test_adapter_rows_subset_equals_full_batch_rows():
    z, t, c, mask, zq = inputs(4)
    prior = trained_like()
    adapter = open_adapter(prior)
    rows = torch.tensor([True, False, True, True])
    with torch.no_grad():
        full = prior(z, t, c, mask, adapter=adapter, z_query=zq)
        sub = prior(z, t, c, mask, adapter=adapter, z_query=zq, control_rows=rows)
    assert torch.allclose(sub[rows], full[rows], atol=1e-6)


def test_an_optimiser_step_changes_only_the_adapter():
    diffusion, _ = conf()
    z, _, c, mask, zq = inputs(4)
    prior = trained_like()
    prior.requires_grad_(False)
    adapter = ControlAdapter.from_prior(prior)
    before_prior = {k: v.clone() for k, v in prior.state_dict().items()}
    before_adapter = {k: v.clone() for k, v in adapter.state_dict().items()}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    for step in range(2):
        loss = diffusion_loss(prior, diffusion, z, c, mask, adapter=adapter, z_query=zq,
                              generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, before_prior[k]) for k, v in prior.state_dict().items())
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, before_adapter[k])]
    assert any(k.startswith("z2") for k in changed) and any(k.startswith("z1") for k in changed)


def test_padded_text_tokens_do_not_matter():
    z, t, c, mask, _ = inputs()
    prior = trained_like()
    c2 = c.clone()
    c2[~mask] = 1000 * torch.randn_like(c2[~mask])
    with torch.no_grad():
        assert torch.equal(prior(z, t, c, mask), prior(z, t, c2, mask))
        assert (prior(z, t, c, mask) - prior(z, t, c2, None)).abs().max() > 1e-4  # the mask was doing the work


def test_guidance_combines_the_two_branches_in_one_forward():
    diffusion, sampling = conf()
    z, t, c, mask, zq = inputs()
    prior = trained_like()
    adapter = open_adapter(prior)
    with torch.no_grad():
        cond = prior(z, t, c, mask, adapter=adapter, z_query=zq)
        uncond = prior(z, t, c, mask, drop_cond=torch.ones(3, dtype=torch.bool))
        for gamma in (0.0, 2.5):
            for cache_text in (False, True):
                s = GuidedSampler(diffusion, SamplerConfig(**{**sampling, "guidance_scale": gamma,
                                                              "cache_text": cache_text}))
                eps = s.guided_eps(prior, z, t, s.guided_text(prior, c, mask, 3, adapter), adapter, zq)
                assert torch.allclose(eps, (1 + gamma) * cond - gamma * uncond, atol=1e-5)
    assert torch.allclose(uncond, prior(z, t, None, None), atol=1e-6)  # dropped text == no text


class PerfectPredictor(torch.nn.Module):
    """Knows the clean vectors: returns the exact noise of any z_t (eq. 2 solved for eps),
    or the clean vectors themselves when it predicts the sample."""

    def __init__(self, x0, diffusion, prediction_type="epsilon"):
        super().__init__()
        self.x0, self.abar = x0, ddpm_scheduler(diffusion).alphas_cumprod
        self.weight = torch.nn.Parameter(torch.zeros(()))  # diffusion_loss reads a parameter's dtype
        self.outputs = prediction_type
        self.config = type("C", (), {"d_vl": x0.shape[1], "prediction_type": prediction_type})()
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def text_condition(self, *args, **kwargs):
        return None  # it reads no text

    def forward(self, x, t, *args, **kwargs):
        a = self.abar[t.long()].view(-1, 1) if t.dim() else self.abar[t.long()]
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1)
        if self.outputs == "sample":
            return x0 + 0 * self.weight
        return (x - a.sqrt() * x0) / (1 - a).sqrt() + 0 * self.weight


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler, steps", [("dpmsolver++", 14), ("ddpm", 1000)])
def test_sampler_with_a_perfect_predictor_recovers_the_vectors(sampler, steps, prediction_type):
    diffusion, sampling = conf()
    z0 = torch.nn.functional.normalize(torch.randn(4, D), dim=-1)
    oracle = PerfectPredictor(z0 * diffusion.scale(D), diffusion, prediction_type)
    s = GuidedSampler(diffusion, SamplerConfig(**{**sampling, "sampler": sampler, "num_steps": steps}))
    out = s.sample(oracle, torch.zeros(4, 1, COND), torch.ones(4, 1, dtype=torch.bool),
                   generator=torch.Generator().manual_seed(0))
    assert (out - z0).abs().max() < 1e-3


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_loss_targets_what_the_prior_predicts(prediction_type):
    """A predictor that knows the clean vectors has zero loss when the loss asks for what
    it outputs, and a large one when the loss asks for the other."""
    diffusion, _ = conf()
    z0 = torch.nn.functional.normalize(torch.randn(64, D), dim=-1)
    right = PerfectPredictor(z0 * diffusion.scale(D), diffusion, prediction_type)
    other = "sample" if prediction_type == "epsilon" else "epsilon"
    wrong = PerfectPredictor(z0 * diffusion.scale(D), diffusion, other)
    wrong.config.prediction_type = prediction_type  # claims one, outputs the other
    g = lambda: torch.Generator().manual_seed(0)
    assert diffusion_loss(right, diffusion, z0, None, None, generator=g()) < 1e-8
    assert diffusion_loss(wrong, diffusion, z0, None, None, generator=g()) > 0.1


def test_prediction_type_is_kept_in_the_checkpoint_and_checked(tmp_path):
    prior = FusionDiffPrior(**SIZES, prediction_type="sample")
    prior.save_pretrained(tmp_path / "prior")
    assert load_prior(str(tmp_path / "prior"), expected={**SIZES, "prediction_type": "sample"}).config.prediction_type == "sample"
    with pytest.raises(CheckpointMismatch, match="prediction_type: expected 'epsilon', found 'sample'"):
        load_prior(str(tmp_path / "prior"), expected={**SIZES, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="prior.prediction_type='v_prediction': expected one of epsilon, sample"):
        FusionDiffPrior(**SIZES, prediction_type="v_prediction")


def test_same_seed_same_samples_and_ensembles():
    diffusion, sampling = conf()
    _, _, c, mask, zq = inputs()
    prior = trained_like()
    adapter = open_adapter(prior)
    s = GuidedSampler(diffusion, SamplerConfig(**sampling))
    a = s.sample(prior, c, mask, adapter, zq, generator=torch.Generator().manual_seed(7))
    b = s.sample(prior, c, mask, adapter, zq, generator=torch.Generator().manual_seed(7))
    other = s.sample(prior, c, mask, adapter, zq, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    many = GuidedSampler(diffusion, SamplerConfig(**{**sampling, "samples_per_query": 3, "aggregation": "none"}))
    assert many.sample(prior, c, mask, adapter, zq, generator=torch.Generator().manual_seed(7)).shape == (3, 3, D)


def test_checkpoints_round_trip_and_refuse_other_sizes(tmp_path):
    prior = trained_like()
    adapter = open_adapter(prior)
    prior.save_pretrained(tmp_path / "prior")
    adapter.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "prior" / "diffusion_pytorch_model.safetensors").exists()
    z, t, c, mask, zq = inputs()
    loaded = load_prior(str(tmp_path / "prior"), expected=SIZES)
    loaded_adapter = load_adapter(str(tmp_path / "adapter"), loaded)
    with torch.no_grad():
        assert torch.equal(loaded(z, t, c, mask, adapter=loaded_adapter, z_query=zq),
                           prior(z, t, c, mask, adapter=adapter, z_query=zq))
    with pytest.raises(CheckpointMismatch, match="d_vl: expected 1536, found 32"):
        load_prior(str(tmp_path / "prior"), expected={**SIZES, "d_vl": 1536})
    other = FusionDiffPrior(**{**SIZES, "hidden_size": 64})
    with pytest.raises(CheckpointMismatch, match="hidden_size: expected 64, found 32"):
        load_adapter(str(tmp_path / "adapter"), other)
    with pytest.raises(CheckpointMismatch, match="no prior checkpoint"):
        load_prior(str(tmp_path / "nothing"))
