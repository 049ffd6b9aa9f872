"""Weight averaging (--ema): the exponential moving average the model is evaluated and kept as."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from imgtrain import train_pytorch_model
from imgtrain.training.averaging import EVERY, MAX_DECAY, WINDOW, WeightAverage


def test_the_average_follows_the_recurrence_and_leaves_the_buffers_alone():
    """Every EVERY steps the average moves by those steps' decays together (the weights of the steps between
    count as the latest of them), and ``flush`` moves it at once: what the loop does before each evaluation."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    average = WeightAverage(net)
    assert all(not p.requires_grad for p in average.network.parameters())
    expected, kept = [p.detach().clone() for p in net.parameters()], 1.0
    for n in range(2 * EVERY + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)  # training moves the running statistics: the average's stay
        kept *= min(MAX_DECAY, (1 + n) / (WINDOW + n))
        if (n + 1) % EVERY == 0:
            expected = [kept * e + (1 - kept) * p.detach() for e, p in zip(expected, net.parameters(), strict=True)]
            kept = 1.0
        average.update()
    assert average.updates == 2 * EVERY + 1
    # one step since it last moved: not yet in the average
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(average.network.parameters(), expected, strict=True))
    average.flush()
    expected = [kept * e + (1 - kept) * p.detach() for e, p in zip(expected, net.parameters(), strict=True)]
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(average.network.parameters(), expected, strict=True))
    assert not torch.equal(average.network[0].weight, net[0].weight)  # an average, not a copy
    assert torch.equal(average.network[1].running_mean, torch.zeros(4))
    average.take_buffers(net)
    assert all(torch.equal(a, b) for a, b in zip(average.network.buffers(), net.buffers(), strict=True))
    # the window grows with the run: the first step's weights are mostly forgotten at once, later ones slowly
    assert WeightAverage(net).decay() == pytest.approx(1 / WINDOW)


class _Interrupt(Exception):
    pass


def _stop_after_epoch_1(message: str) -> None:
    if message.startswith("epoch 1/"):  # logged after the epoch's best model and checkpoint are written
        raise _Interrupt


@pytest.mark.parametrize("ema", [True, False])
def test_the_model_kept_is_the_average_or_with_no_ema_the_weights(tmp_path, image_dirs, ema):
    """After epoch 1 of 2 (interrupted there), the work directory holds the epoch's best model and the checkpoint:
    with --ema (the default) the model is the checkpoint's average of the weights, not the trained weights;
    with --no-ema it is the trained network and the checkpoint holds no average."""
    d = image_dirs
    with pytest.raises(_Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", epochs=2, batch_size=8,
                            image_size=32, num_workers=0, precision="fp32", ema=ema, log=_stop_after_epoch_1)
    work = tmp_path / ".imgtrain-resume-m"
    model = load_file(work / "model.safetensors")
    checkpoint = load_file(work / "checkpoint.safetensors")
    trained = {k[len("model/"):]: v for k, v in checkpoint.items() if k.startswith("model/")}
    averaged = {k[len("average/"):]: v for k, v in checkpoint.items() if k.startswith("average/")}
    assert model.keys() == trained.keys()
    if not ema:
        assert not averaged and all(torch.equal(model[k], trained[k]) for k in model)
        return
    assert averaged.keys() == model.keys() and all(torch.equal(model[k], averaged[k]) for k in model)
    weights = [k for k in model if k.endswith(".weight")]
    assert all(not torch.equal(model[k], trained[k]) for k in weights)
    # 27 training images, fewer than precise BatchNorm needs (PRECISE_ENOUGH): the average takes the trained
    # network's running statistics (the recomputed ones: tests/test_batchnorm.py, on 225 digits)
    means = [k for k in model if k.endswith("running_mean")]
    assert means and all(torch.equal(model[k], trained[k]) for k in means)
