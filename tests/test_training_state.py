"""model/training.py's EMA of the weights and the training state saved beside a checkpoint."""
import pytest
import torch

from model.training import EMA, OptimConfig, load_training_state, make_optimizer, make_scheduler, save_training_state

pytestmark = pytest.mark.fast


def _step(model, opt):
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_the_ema_is_the_decayed_average_of_the_steps_and_copies_into_a_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    w0 = model.weight.detach().clone()
    ema = EMA(model, 0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = w0.clone()
    for _ in range(3):
        _step(model, opt)
        ema.update(model)
        expected = 0.75 * expected + 0.25 * model.weight.detach()
    assert torch.allclose(ema.shadow["weight"], expected, atol=1e-7)
    assert not torch.allclose(expected, model.weight.detach())
    other = torch.nn.Linear(3, 2)
    ema.copy_to(other)
    assert torch.allclose(other.weight, expected, atol=1e-7)


def test_the_saved_state_gives_back_the_average_and_the_optimiser(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = OptimConfig(lr=0.01, weight_decay=0.0, adam_eps=1e-8, grad_clip=1.0, warmup_steps=0, lr_schedule="constant",
                      batch_size=2, epochs=1)
    opt = make_optimizer(list(model.parameters()), cfg)
    sched = make_scheduler(opt, cfg, 10)
    ema = EMA(model, 0.9)
    for _ in range(2):
        _step(model, opt)
        sched.step()
        ema.update(model)
    save_training_state(str(tmp_path), opt, sched, ema, {"step": 2})
    # A restarted worker builds its EMA from the checkpoint's model weights, then loads the average.
    fresh_opt = make_optimizer(list(model.parameters()), cfg)
    fresh_sched = make_scheduler(fresh_opt, cfg, 10)
    restored = EMA(model, 0.9)
    assert load_training_state(str(tmp_path), fresh_opt, fresh_sched, restored)["step"] == 2
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
    assert fresh_sched.state_dict()["last_epoch"] == 2
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
