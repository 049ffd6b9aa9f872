"""The CUDA path: training, resuming and scoring on a GPU, and torchrun with NCCL.

Skipped where there is no GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
The CPU tests cover the same code: the loop, the checkpoints and the distributed set-up are shared.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from conftest import distributed_env
from imgtrain import load_trained_model, score_image_model, train_pytorch_model
from test_deploy import Server, _imgtrain_probabilities, _val_images
from test_reliability import Interrupt, _interrupt_after

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

QUIET = {"log": lambda m: None}
TRAIN = {"epochs": 3, "batch_size": 8, "image_size": 64, "num_workers": 2, "device": "cuda"}


def test_training_on_a_gpu_is_deterministic_and_resumes_exactly(tmp_path, image_dirs):
    d = image_dirs
    logs: list[str] = []
    first = train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "a", log=logs.append, **TRAIN)
    assert any("device cuda" in line for line in logs), logs
    spec = load_trained_model(first.output).spec.training
    assert spec["precision"] == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")  # native
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "b", **TRAIN, **QUIET)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "c", log=_interrupt_after(1), **TRAIN)
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "c", resume=True, **TRAIN, **QUIET)
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


def test_a_checkpoint_made_on_the_cpu_resumes_on_a_gpu_with_the_ranks_own_stream(tmp_path, image_dirs):
    """A checkpoint made on CPUs holds no GPU stream: resumed on a GPU, the process draws its dropout masks from
    its own stream, seeded by (seed, rank) as in a fresh run; each GPU drew the seed's masks, the same in every
    process of a torchrun."""
    from pathlib import Path

    from imgtrain.distributed import ALONE
    from imgtrain.seeding import seed_everything, seed_rank
    from imgtrain.training.train import TrainingParameters, _model_and_state, _Run

    d = image_dirs
    args = {**TRAIN, "epochs": 2, "num_workers": 0, "precision": "fp32"}
    with pytest.raises(Interrupt):
        train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", log=_interrupt_after(1),
                            **{**args, "device": "cpu"})
    run = _Run.of(Path(d["untrained"]), Path(d["train"]), Path(d["val"]), tmp_path / "m", TrainingParameters(**args),
                  torch.device("cuda"), ALONE)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        seed_everything(run.seed)
        _model_and_state(run, resume=True, log=lambda m: None)
        resumed = torch.cuda.get_rng_state()
        seed_rank(run.seed, 0)
        assert torch.equal(resumed, torch.cuda.get_rng_state())


def test_a_gpu_model_scores_on_the_cpu_as_on_the_gpu(tmp_path, image_dirs):
    d = image_dirs
    train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / "m", **TRAIN, **QUIET)
    for device in ("cuda", "cpu"):
        score_image_model(tmp_path / "m", d["val"], tmp_path / device, device=device, precision="fp32",
                          num_workers=0, log=lambda m: None)
    rows = {}
    for device in ("cuda", "cpu"):
        with open(tmp_path / device / "scored.csv", newline="") as f:
            rows[device] = list(csv.DictReader(f))
    assert [r["Scored Labels"] for r in rows["cuda"]] == [r["Scored Labels"] for r in rows["cpu"]]
    for a, b in zip(rows["cuda"], rows["cpu"], strict=True):
        for key in a:
            if key.startswith("Scored Probabilities"):
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-3)


def test_torchrun_with_nccl(tmp_path, image_dirs):
    """One process per GPU under torchrun: the NCCL process group, DistributedDataParallel and
    --sync-batchnorm, and a model that then loads anywhere."""
    d = image_dirs
    processes = torch.cuda.device_count()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m",
         "imgtrain", "train", "--untrained-model", d["untrained"], "--training-data", d["train"],
         "--validation-data", d["val"], "--output", tmp_path / "m", "--epochs", "2", "--batch-size", "4",
         "--image-size", "64", "--sync-batchnorm"],
        capture_output=True, text=True, timeout=300, env=distributed_env())
    assert r.returncode == 0, r.stderr
    word = "processes" if processes > 1 else "process"
    assert f"{processes} {word} (nccl): each takes 4 images a step" in r.stderr, r.stderr
    trained = load_trained_model(tmp_path / "m")
    assert trained.spec.training["processes"] == processes
    assert not any(k.startswith("module.") for k in trained.network.state_dict())


def test_serving_on_a_gpu_answers_as_the_cpu_does(trained_model, image_dirs):
    """`imgtrain serve` runs the network on the GPU (by default, where there is one), over real HTTP."""
    import json

    paths = _val_images(image_dirs, 6)
    model, expected = _imgtrain_probabilities(trained_model, paths)
    running = Server(trained_model, "--precision", "fp32")
    try:
        status, meta = running.get("/v2/models/shades")
        assert status == 200
        for path, row in zip(paths, expected, strict=True):
            status, body, _ = running.request("POST", "/predictions/shades", path.read_bytes(),
                                              {"Content-Type": "image/png"})
            answer = json.loads(body)
            first, second = sorted(row)[-2:][::-1]
            assert status == 200 and (answer["label"] == model.labels[int(row.argmax())] or first - second < 0.02)
            # cuDNN's convolutions run in TF32 on tensor cores: close to the CPU's fp32, not equal
            assert [answer["probabilities"][label] for label in model.labels] == pytest.approx(row, abs=1e-2)
    finally:
        code, err = running.stop()
    assert code == 0 and "on cuda, precision fp32" in err, err


def test_explaining_on_a_gpu_after_predicting_there(trained_model, image_dirs):
    """predict() leaves the network on the GPU; explaining then runs there too, and agrees with the CPU."""
    pytest.importorskip("captum")
    from imgtrain import predict
    from imgtrain.scoring.explain import explain_images

    model = load_trained_model(trained_model)
    paths = _val_images(image_dirs, 4)
    predict(model, paths, device="cuda")
    assert next(model.network.parameters()).device.type == "cuda"
    names = [p.name for p in paths]
    on_gpu = explain_images(model, paths, names, device="cuda")
    on_cpu = explain_images(model, paths, names, device="cpu")
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.predicted == cpu.predicted and gpu.probability == pytest.approx(cpu.probability, abs=1e-2)
        assert gpu.saliency.shape == cpu.saliency.shape and abs(gpu.saliency - cpu.saliency).max() < 0.05


def test_on_a_gpu_auto_is_torch_there_and_an_export_scores_on_the_cpu(trained_model, image_dirs, tmp_path, monkeypatch):
    """--engine auto stays torch on a GPU (no timing); an exported model, whose engines run on the CPU, is scored
    there with --device auto, and answers as the model directory does on the GPU."""
    from imgtrain import predict
    from imgtrain.deploy.export import export_model

    monkeypatch.setenv("IMGTRAIN_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    on_gpu = predict(trained_model, image_dirs["val"], engine="auto", precision="fp32", log=lines.append)
    assert any("on cuda" in line and "engine torch (fp32)" in line for line in lines), lines
    assert not (tmp_path / "cache").exists()  # nothing was timed
    exported = export_model(trained_model, tmp_path / "onnx", log=lambda m: None)
    lines.clear()
    on_cpu = predict(exported.parent, image_dirs["val"], precision="fp32", log=lines.append)
    assert any("on cpu" in line for line in lines), lines
    assert [a.label for a in on_cpu] == [a.label for a in on_gpu]
