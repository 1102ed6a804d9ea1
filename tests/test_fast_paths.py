"""Each optimised path (a conf switch, measured by bench/gpu.py) against the plain one, on CPU.

Tolerances: paths that only reorder work (row slices, cached keys/values, threads) agree
to float32 rounding; compiled graphs fuse operations and may round differently, so they
are held to 1e-4 relative.
"""
import random

import pytest
import torch

from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig, diffusion_loss
from model.mllm import Captioner, FusedEmbedder, load_mllm
from model.prior import ControlAdapter, FusionDiffPrior, compile_blocks
from model.training import OptimConfig, accumulate_gradients, apply_step, make_optimizer, make_scheduler
from pipelines.config import load_config, plain
from pipelines.synthetic import Item, draw

pytestmark = pytest.mark.fast

D, COND = 32, 16
SIZES = dict(d_vl=D, cond_dim=COND, map_channels=4, map_size=8, patch_size=2, hidden_size=32, num_heads=4,
             mlp_ratio=2.0, num_encoder_blocks=2, num_decoder_blocks=2, frequency_size=32)

INSTRUCTION = "Represent the user's input."


def opened(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Zero-initialised gates and outputs opened, as after training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def models():
    prior = opened(FusionDiffPrior(**SIZES), 0)
    adapter = opened(ControlAdapter.from_prior(prior), 1)
    return prior, adapter


def queries(b=5, k=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(b, k, COND, generator=g)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, 3:] = False
    zq = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=-1)
    return c, mask, zq


def sampler(**changes) -> GuidedSampler:
    cfg = load_config("conf/demo.yaml")
    return GuidedSampler(DiffusionConfig(**plain(cfg.diffusion)), SamplerConfig(**{**plain(cfg.sampling), **changes}))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_adapter_on_the_first_rows_equals_the_same_rows_by_mask():
    prior, adapter = models()
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(6, D, generator=g), torch.randint(0, 1000, (6,), generator=g)
    c, mask, zq = queries(6)
    rows = torch.tensor([True, True, True, False, False, False])
    with torch.no_grad():
        by_slice = prior(z, t, c, mask, adapter=adapter, z_query=zq[:3], control_rows=3)
        by_mask = prior(z, t, c, mask, adapter=adapter, z_query=zq[:3], control_rows=rows)
        bare = prior(z, t, c, mask)
    assert rel(by_slice, by_mask) < 1e-6
    assert torch.allclose(by_slice[3:], bare[3:], atol=1e-6)  # rows past the slice: no adapter
    assert (by_slice[:3] - bare[:3]).abs().max() > 1e-3  # and the first rows were steered


def test_cached_text_keys_and_values_give_the_same_samples():
    prior, adapter = models()
    c, mask, zq = queries()
    plain_s = sampler(cache_text=False).sample(prior, c, mask, adapter, zq, generator=torch.Generator().manual_seed(0))
    cached = sampler(cache_text=True).sample(prior, c, mask, adapter, zq, generator=torch.Generator().manual_seed(0))
    assert rel(cached, plain_s) < 1e-5


def test_compiled_sampler_matches_eager_and_pads_odd_batches():
    prior, adapter = models()
    c, mask, zq = queries(b=5)  # 5 rows: padded to 8 inside, cut back to 5
    eager = sampler(compile="none").sample(prior, c, mask, adapter, zq, generator=torch.Generator().manual_seed(0))
    compiled = sampler(compile="default", cache_text=True).sample(prior, c, mask, adapter, zq,
                                                                   generator=torch.Generator().manual_seed(0))
    assert compiled.shape == eager.shape == (5, D)
    assert rel(compiled, eager) < 1e-4


def test_unknown_compile_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="sampling.compile='fast'"):
        sampler(compile="fast")


def _train(steps: int, fused: bool, compiled: bool) -> tuple[list[float], torch.Tensor]:
    cfg = load_config("conf/demo.yaml")
    diffusion = DiffusionConfig(**plain(cfg.diffusion))
    optim = OptimConfig.from_conf({**plain(cfg.train_stage1), "lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0})
    torch.manual_seed(0)
    prior = FusionDiffPrior(**SIZES)
    if compiled:
        compile_blocks(prior, None)
    params = list(prior.parameters())
    opt = make_optimizer(params, optim, fused=fused)
    sched = make_scheduler(opt, optim, steps)
    g = torch.Generator().manual_seed(5)
    z0 = torch.nn.functional.normalize(torch.randn(16, D, generator=g), dim=-1)
    c, m = torch.randn(16, 6, COND, generator=g), torch.ones(16, 6, dtype=torch.bool)
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        loss = accumulate_gradients(lambda rows: diffusion_loss(prior, diffusion, z0[rows], c[rows], m[rows],
                                                                generator=gen), 16, 0)
        losses.append(float(loss))
        apply_step(opt, sched, params, optim.grad_clip)
    return losses, torch.cat([p.detach().flatten() for p in prior.parameters()])


def test_fused_adamw_and_compiled_blocks_train_like_the_plain_step():
    plain_losses, plain_w = _train(4, fused=False, compiled=False)
    fused_losses, fused_w = _train(4, fused=True, compiled=False)
    compiled_losses, compiled_w = _train(4, fused=True, compiled=True)
    assert rel(fused_w, plain_w) < 1e-6
    assert max(abs(a - b) for a, b in zip(fused_losses, plain_losses)) < 1e-6
    assert rel(compiled_w, plain_w) < 1e-4
    assert max(abs(a - b) / b for a, b in zip(compiled_losses, plain_losses)) < 1e-4
    assert rel(plain_w, _train(0, fused=False, compiled=False)[1]) > 1e-4  # the steps moved the weights


def test_micro_batches_accumulate_the_whole_batch_gradient():
    prior = opened(FusionDiffPrior(**SIZES), 0).train()
    g = torch.Generator().manual_seed(6)
    z, t = torch.randn(8, D, generator=g), torch.randint(0, 1000, (8,), generator=g)
    c, m = torch.randn(8, 6, COND, generator=g), torch.ones(8, 6, dtype=torch.bool)
    target = torch.randn(8, D, generator=g)

    def loss_of_rows(rows):
        return torch.nn.functional.mse_loss(prior(z[rows], t[rows], c[rows], m[rows]), target[rows])

    grads = {}
    for micro in (0, 3):  # 3: parts of 3, 3 and 2 rows
        prior.zero_grad(set_to_none=True)
        loss = accumulate_gradients(loss_of_rows, 8, micro)
        grads[micro] = (float(loss), torch.cat([p.grad.flatten() for p in prior.parameters()]))
    assert abs(grads[3][0] - grads[0][0]) < 1e-6
    assert rel(grads[3][1], grads[0][1]) < 1e-5


def test_training_refuses_cuda_graphs_at_load(tmp_path):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="train.compile='reduce-overhead': expected one of none, default"):
        load_config("conf/demo.yaml", [f"run_dir={tmp_path}", "train.compile=reduce-overhead"])


# -- the MLLM paths ---------------------------------------------------------------------
def images(n: int):
    rng = random.Random(0)
    shapes = ["circle", "square", "diamond", "triangle"]
    out = [draw(Item(shapes[i % 4], "red", "small", "left", "white"), 64 + 24 * (i % 3), rng) for i in range(n)]
    out[1] = out[1].resize((150, 60))  # another aspect ratio: another number of image tokens
    return out


TEXTS = ["a red circle", "make it a green diamond with a long description of the background", None, "blue",
         "a small square on the left"]


@pytest.fixture(scope="module")
def plain_mllm(tiny_models):
    return load_mllm(tiny_models["mllm"], image_min_pixels=3136, image_max_pixels=12544)


@pytest.fixture(scope="module")
def fast_mllm(tiny_models):
    return load_mllm(tiny_models["mllm"], image_min_pixels=3136, image_max_pixels=12544,
                     preprocess_threads=3, normalize_on_device=True)


def test_threaded_preprocessing_and_device_normalisation_give_the_processor_inputs(plain_mllm, fast_mllm):
    ims = images(5)
    conv = [[{"role": "user", "content": [{"type": "image"}] + ([{"type": "text", "text": t}] if t else [])}]
            for t in TEXTS]
    a = plain_mllm.encode(conv, ims, add_generation_prompt=True)
    b = fast_mllm.encode(conv, ims, add_generation_prompt=True)
    assert sorted(a) == sorted(b)
    for key in a:
        if key == "pixel_values":
            assert rel(b[key], a[key]) < 1e-6
        else:
            assert torch.equal(a[key], b[key]), key
    # Three parts of different widths were left-padded into one batch.
    assert (a["attention_mask"] == 0).any()


def test_kept_rows_give_the_processor_inputs_and_are_not_processed_again(tiny_models, plain_mllm):
    """models.<role>.input_cache_rows: rows encoded with image keys are processed alone,
    kept, and merged into the batch the processor gives; met again (in another batch,
    in another order) they are not processed again; the oldest go past the limit."""
    kept = load_mllm(tiny_models["mllm"], image_min_pixels=3136, image_max_pixels=12544, input_cache_rows=6)
    ims = images(5)
    conv = [[{"role": "user", "content": ([{"type": "image"}] if i != 2 else [])
              + ([{"type": "text", "text": t}] if t else [{"type": "text", "text": "what is it?"}])}]
            for i, t in enumerate(TEXTS)]
    with_image = [i for i in range(5) if i != 2]
    keys = [None if i == 2 else f"image {i}" for i in range(5)]
    calls = []
    process = kept._process
    kept._process = lambda texts, images, kwargs: calls.append(len(texts)) or process(texts, images, kwargs)

    def both(rows: list[int]):
        present = [ims[i] for i in rows if i in with_image]
        a = plain_mllm.encode([conv[i] for i in rows], present, add_generation_prompt=True)
        b = kept.encode([conv[i] for i in rows], present, add_generation_prompt=True,
                        image_keys=[keys[i] for i in rows])
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    both([0, 1, 2, 3, 4])
    assert calls == [1] * 5  # each row alone, once
    assert (kept.encode(conv[:1], ims[:1], add_generation_prompt=True)["attention_mask"] == 1).all()
    assert calls == [1] * 6  # without keys: the processor as before, nothing kept
    both([4, 2, 1])
    assert calls == [1] * 6  # all three kept
    other = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "another prompt"}]}]]
    kept.encode(other, ims[:1], add_generation_prompt=True, image_keys=["image 0"])
    kept.encode(other, ims[1:2], add_generation_prompt=True, image_keys=["image 1"])
    assert calls == [1] * 8  # another text with the same image is another row
    assert len(kept._kept_rows) == 6  # the limit: the oldest unused (rows 0 and 3) went
    both([0])
    assert calls == [1] * 9


def test_embedder_fast_preprocessing_and_base_model_state(plain_mllm, fast_mllm):
    ims = images(5)
    plain_e = FusedEmbedder(plain_mllm, INSTRUCTION, INSTRUCTION, "<|endoftext|>")
    v = plain_e.embed(images=ims, texts=TEXTS)
    for parts in (1, 2, 5):  # 2: uneven parts, the second prepared while the first runs
        fast_e = FusedEmbedder(fast_mllm, INSTRUCTION, INSTRUCTION, "<|endoftext|>", overlap_parts=parts)
        assert rel(fast_e.embed(images=ims, texts=TEXTS), v) < 1e-5
    # The base model's last state is what the full model's last hidden state was (the
    # embedder no longer runs the LM head for it).
    conv = [[{"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]},
             {"role": "user", "content": [{"type": "image"}] + ([{"type": "text", "text": t}] if t else [])}]
            for t in TEXTS]
    batch = plain_mllm.encode(conv, ims, add_generation_prompt=True, suffix="<|endoftext|>")
    with torch.no_grad():
        full = plain_mllm.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1][:, -1]
    assert torch.allclose(v, torch.nn.functional.normalize(full.float(), dim=-1), atol=1e-6)


def test_static_kv_cache_generates_the_same_tokens(plain_mllm):
    ims = images(4)
    prompts = ["Describe this image."] * 4
    dynamic = Captioner(plain_mllm, "dynamic").generate_ids(ims, prompts, 12, min_new_tokens=12)
    static = Captioner(plain_mllm, "static").generate_ids(ims, prompts, 12, min_new_tokens=12)
    assert dynamic.shape == (4, 12)
    assert torch.equal(dynamic, static)
    with pytest.raises(ValueError, match="caption.kv_cache='paged'"):
        Captioner(plain_mllm, "paged")
