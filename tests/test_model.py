"""The nets, training, export round trip and inference-mode batch independence."""

from __future__ import annotations

import signal
import subprocess
import sys
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from service import model as serving
from service.store import ModelStore
from training.data import to_input
from training.model import build_net
from training.train import TrainConfig, seed_everything, train

from .conftest import ROOT


def _layers(net) -> list[str]:
    return [type(block).__name__ for block in net._children.values()]


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_build_net(arch, batch_norm):
    net = build_net(arch, batch_norm=batch_norm, dropout=0.3)
    net.initialize()
    out = net(mx.nd.zeros((3, 1, 28, 28)))
    assert out.shape == (3, 10)
    layers = _layers(net)
    assert ("BatchNorm" in layers) == batch_norm
    assert "Dropout" in layers
    if batch_norm:  # BatchNorm sits before each hidden activation
        for i, name in enumerate(layers):
            if name == "Activation":
                assert layers[i - 1] == "BatchNorm"


def test_build_net_rejects_bad_arguments():
    with pytest.raises(ValueError):
        build_net("resnet")
    with pytest.raises(ValueError):
        build_net("mlp", dropout=1.0)


def test_batch_independence_in_inference_and_not_in_training():
    seed_everything(0)
    net = build_net("cnn")
    net.initialize(mx.init.Xavier())
    net.hybridize()
    # Give BatchNorm non-trivial running statistics with a few training steps.
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = mx.nd.array(rng.normal(size=(32, 1, 28, 28)))
        with autograd.record():
            loss = loss_fn(net(x), mx.nd.array(rng.integers(0, 10, 32)))
        loss.backward()
        trainer.step(32)
    image = rng.normal(size=(1, 1, 28, 28)).astype(np.float32)
    others = rng.normal(loc=3.0, scale=2.0, size=(15, 1, 28, 28)).astype(np.float32)
    alone = net(mx.nd.array(image)).asnumpy()
    in_batch = net(mx.nd.array(np.concatenate([others[:7], image, others[7:]]))).asnumpy()[7:8]
    np.testing.assert_allclose(alone, in_batch, atol=1e-5)
    # In training mode BatchNorm uses the batch's statistics and Dropout is on.
    with autograd.train_mode():
        t_alone = net(mx.nd.array(np.concatenate([image, image]))).asnumpy()[0]
        t_batch = net(mx.nd.array(np.concatenate([others[:7], image, others[7:]]))).asnumpy()[7]
    assert np.abs(t_alone - t_batch).max() > 1e-2


def test_training_reduces_loss_and_is_reproducible(sample_train, sample_test):
    cfg = TrainConfig(arch="mlp", epochs=3, batch_size=50, lr=0.05, seed=7)
    first = train(cfg, sample_train, sample_test, progress=False)
    losses = [row["train_loss"] for row in first.history]
    assert losses[-1] < losses[0] * 0.7, losses
    assert first.history[-1]["test_accuracy"] > 0.6
    again = train(cfg, sample_train, sample_test, progress=False)
    assert [r["train_loss"] for r in again.history] == losses


def test_export_round_trip_through_the_store(tiny_store, sample_test):
    from training.train import export_and_check  # noqa: F401  (the check ran at publish)

    mv = tiny_store.resolve("mnist")
    assert mv.manifest["metrics"]["export_max_abs_diff"] <= 1e-5
    loaded = serving.load(mv)
    norm = mv.manifest["normalization"]
    x = to_input(sample_test.images[:64], norm["mean"], norm["std"])
    probs = loaded.predict(x)
    assert probs.shape == (64, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    # One image alone gives the same answer as inside the batch.
    np.testing.assert_allclose(loaded.logits(x[5:6]), loaded.logits(x)[5:6], atol=1e-5)


def test_trained_net_equals_its_export(sample_train, sample_test, tmp_path):
    from training.train import export_and_check

    cfg = TrainConfig(epochs=1, batch_size=100, seed=3)
    result = train(cfg, sample_train, sample_test, progress=False)
    files, metrics = export_and_check(result, tmp_path, "m", sample_test)
    with warnings.catch_warnings():  # imports() warns that "data" has no declared type
        warnings.simplefilter("ignore", UserWarning)
        loaded = gluon.SymbolBlock.imports(
            str(tmp_path / files["symbol"]), ["data"], str(tmp_path / files["params"])
        )
    x = mx.nd.array(to_input(sample_test.images, result.mean, result.std))
    diff = np.abs(loaded(x).asnumpy() - result.net(x).asnumpy()).max()
    assert diff <= 1e-5
    assert metrics["export_max_abs_diff"] <= 1e-5


def test_evaluate_cli_matches_the_manifest(tiny_store):
    from service.config import REPO_ROOT

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "mnist:1",
            "--store",
            str(tiny_store.root),
            "--data-dir",
            str(REPO_ROOT / "tests/data/mnist-sample"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test accuracy" in proc.stdout and ": match" in proc.stdout


def test_evaluate_matches_manifest_on_the_shipped_model(shipped_store, full_test):
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "mnist", "--store", str(shipped_store.root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "match" in proc.stdout
    accuracy = shipped_store.resolve("mnist").manifest["metrics"]["test_accuracy"]
    assert accuracy >= 0.995


def sample_training(store: Path, *args: str) -> list[str]:
    """The training command on the committed MNIST sample, publishing into ``store``."""
    return [
        sys.executable,
        "-m",
        "training.train",
        *args,
        "--data-dir",
        str(ROOT / "tests/data/mnist-sample"),
        "--store",
        str(store),
        "--no-progress",
    ]


def test_ctrl_c_during_training_publishes_nothing(tmp_path):
    proc = subprocess.Popen(
        sample_training(tmp_path, "--epochs", "200", "--limit-train", "500"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        while line and not line.startswith("epoch 1:"):
            line = proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "nothing was published" in err and "Traceback" not in err
    assert not (tmp_path / "mnist").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "mnist").iterdir()
    )


def test_a_model_below_min_accuracy_is_not_published(tmp_path):
    proc = subprocess.run(
        sample_training(
            tmp_path, "--epochs", "1", "--limit-train", "300", "--min-accuracy", "0.999"
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "is below --min-accuracy 99.9000%: nothing was published" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert ModelStore(tmp_path).versions("mnist") == []
    assert [p.name for p in (tmp_path / "mnist").iterdir() if p.name.startswith(".tmp-")] == []
