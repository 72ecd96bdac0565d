"""The nets, training, export round trip and inference-mode batch independence."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import types
import warnings
from dataclasses import asdict
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from store import ModelStore, loading
from store.publishing import publish
from training.data import to_input
from training.model import build_net
from training.train import TrainConfig, seed_everything, train

from .conftest import ROOT


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


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
    loaded = loading.load(mv)
    norm = mv.manifest["normalization"]
    x = to_input(sample_test.images[:64], norm["mean"], norm["std"])
    probs = loaded.predict(x)
    assert probs.shape == (64, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    # One image alone gives the same answer as inside the batch.
    np.testing.assert_allclose(loaded.logits(x[5:6]), loaded.logits(x)[5:6], atol=1e-5)


def test_every_batch_size_answers_as_the_unbatched_export(shipped_store, sample_test):
    """The served forward (batch buckets, padded; fused with oneDNN) gives each image what
    the plain exported graph gives it, at every batch size up to past the largest bucket."""
    mv = shipped_store.resolve("mnist")
    loaded = loading.load(mv)
    norm = mv.manifest["normalization"]
    x = to_input(sample_test.images[:80], norm["mean"], norm["std"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = gluon.SymbolBlock.imports(str(mv.symbol_file), ["data"], str(mv.params_file))
    reference = plain(mx.nd.array(x)).asnumpy()
    singles = np.concatenate([loaded.predict(x[i : i + 1]) for i in range(len(x))])
    for n in [*range(1, 34), 47, 64, 80]:
        np.testing.assert_allclose(loaded.logits(x[:n]), reference[:n], atol=1e-4)
        np.testing.assert_allclose(loaded.predict(x[:n]), singles[:n], atol=1e-5, rtol=0)
    assert (loaded.logits(x).argmax(1) == reference.argmax(1)).all()


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

    proc = run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "mnist:1",
            "--store",
            str(tiny_store.root),
            "--data-dir",
            str(REPO_ROOT / "tests/data/mnist-sample"),
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test accuracy" in proc.stdout and ": match" in proc.stdout


def test_evaluate_matches_manifest_on_the_shipped_model(shipped_store, full_test):
    proc = run(
        [sys.executable, "-m", "training.evaluate", "mnist", "--store", str(shipped_store.root)]
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


# `python -m training.train` as shipped (12 epochs, seed 42) on the committed sample's 1,000
# training images: measured 97.4% on its 500 test digits. A broken recipe lands far below.
DEFAULT_RECIPE_ON_SAMPLE = 0.974


def test_the_default_recipe_on_the_sample_keeps_its_accuracy(tmp_path):
    proc = run(sample_training(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = ModelStore(tmp_path).resolve("mnist").manifest
    assert manifest["hyperparameters"] == asdict(TrainConfig())  # the recipe, nothing changed
    assert manifest["metrics"]["test_accuracy"] >= DEFAULT_RECIPE_ON_SAMPLE - 0.02


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, docker stop
def test_ctrl_c_or_sigterm_during_training_publishes_nothing(tmp_path, sig):
    with subprocess.Popen(  # closes the pipes, whatever happens
        sample_training(tmp_path, "--epochs", "200", "--limit-train", "500"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            line = proc.stderr.readline()
            while line and not line.startswith("epoch 1:"):
                line = proc.stderr.readline()
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "nothing was published" in err and "Traceback" not in err
    assert not (tmp_path / "mnist").exists()  # not even an empty model folder


def test_a_stop_signal_in_training_is_raised_between_two_steps(sample_train, sample_test):
    """Raised where it lands, a Ctrl-C inside tqdm's __del__ was only printed by Python and
    training ran on (a CI run timed out): in training it waits for the next step."""
    from training.train_cli import StopSignals, Terminated

    stops = StopSignals()
    stops.deferred = True
    steps: list[int] = []

    def between_batches() -> None:
        steps.append(1)
        if len(steps) == 3:
            stops(signal.SIGINT, None)  # as the signal arrives: nothing raised yet
        stops.check()

    cfg = TrainConfig(arch="mlp", epochs=2, batch_size=50)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, sample_train, sample_test, progress=False, between_batches=between_batches)
    assert len(steps) == 3
    stops.deferred = False
    with pytest.raises(Terminated):
        stops(signal.SIGTERM, None)  # outside training: at once, as docker stop's SIGTERM


def test_ctrl_c_after_the_version_went_live_says_so(tmp_path, monkeypatch, capsys):
    from store import PublishInterrupted
    from training import train_cli

    def published_then_interrupted(*args, **kwargs):
        raise PublishInterrupted(7)

    monkeypatch.setattr(train_cli, "load_split", lambda *args: None)
    monkeypatch.setattr(train_cli, "doubtful_data", lambda *args: [])
    monkeypatch.setattr(train_cli, "train", lambda *args, **kwargs: None)
    monkeypatch.setattr(train_cli, "publish", published_then_interrupted)
    assert train_cli.main(["--store", str(tmp_path)]) == 130
    assert "interrupted, but mnist v7 was already published" in capsys.readouterr().err

    def interrupted(*args):  # Ctrl-C after publish() returned, while the result prints
        raise KeyboardInterrupt

    live = types.SimpleNamespace(name="mnist", version=8, path=tmp_path, manifest={})
    monkeypatch.setattr(train_cli, "publish", lambda *args, **kwargs: live)
    monkeypatch.setattr(train_cli, "describe_timing", interrupted)
    live.manifest = {"metrics": {"test_accuracy": 0.99}, "training": {}}
    assert train_cli.main(["--store", str(tmp_path)]) == 130
    assert "interrupted, but mnist v8 was already published" in capsys.readouterr().err


def test_blank_training_images_are_a_data_error_before_training(sample_train, sample_test):
    from training.data import DataError, Split
    from training.train_cli import doubtful_data

    blank = Split(np.zeros((64, 28, 28), np.uint8), np.arange(64, dtype=np.int32) % 10, {})
    with pytest.raises(DataError, match="almost no contrast"):
        train(TrainConfig(epochs=1), blank, sample_test, progress=False)
    images_md5 = sample_test.md5["t10k-images-idx3-ubyte"]
    same = Split(
        sample_test.images,
        np.full(len(sample_test), 3, np.int32),
        {"train-images-idx3-ubyte": images_md5},
    )
    doubts = doubtful_data(same, sample_test)
    assert "the training and test images are the same file" in doubts[0]
    assert doubts[1] == "the training labels hold only the classes [3]"
    assert doubtful_data(sample_train, sample_test) == []
    assert "only the classes" in doubtful_data(sample_train, sample_test, limit=3)[0]


def test_a_model_below_min_accuracy_is_not_published(tmp_path):
    proc = run(
        sample_training(
            tmp_path, "--epochs", "1", "--limit-train", "300", "--min-accuracy", "0.999"
        )
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "is below --min-accuracy 99.9000%: nothing was published" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mnist").exists()  # no version, no temp folder, no empty folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "nan"], "argument --lr: 'nan' is not a number from 1e-30 to 1e30"),
        (["--lr", "inf"], "argument --lr: 'inf' is not a number from 1e-30 to 1e30"),
        (["--lr", "0"], "argument --lr: '0' is not a number from 1e-30"),
        (["--lr", "1e39"], "argument --lr: '1e39' is not a number from 1e-30"),  # > float32
        (["--lr", "1e-50"], "argument --lr: '1e-50' is not a number from 1e-30"),  # 0 in float32
        (["--weight-decay", "nan"], "argument --weight-decay: 'nan' is not a number from 0 to"),
        (["--weight-decay", "1e308"], "argument --weight-decay: '1e308' is not a number from 0"),
        (["--weight-decay=-1e-4"], "argument --weight-decay: '-1e-4' is not a number"),
        (["--momentum", "1"], "argument --momentum: '1' is not a number from 0 up to"),
        (["--momentum", "-0.5"], "argument --momentum: '-0.5' is not a number from 0"),
        (["--warmup-epochs", "-1"], "argument --warmup-epochs: '-1' is not a number from 0"),
        (["--warmup-epochs", "inf"], "argument --warmup-epochs: 'inf' is not a number from 0"),
        (["--warmup-epochs", "1e308"], "argument --warmup-epochs: '1e308' is not a number from"),
        (["--store", ""], "argument --store: an empty path"),
        (["--data-dir", " "], "argument --data-dir: an empty path"),
        (["--seed", "-1"], "argument --seed: '-1' is not an integer from 0 to 2**32 - 1"),
        (["--seed", str(2**32)], "argument --seed: '4294967296' is not an integer from 0"),
        (["--seed", "1" + "0" * 400], "argument --seed: '1000000000"),  # too big for a float
        (["--epochs", "9" * 1000], "argument --epochs: '9999999999"),
        (["--max-shift", "100000"], "argument --max-shift: '100000' is not an integer from 0"),
        (["--limit-train", "0"], "argument --limit-train: '0' is not an integer of at least 1"),
        (["--limit-train", "-5"], "argument --limit-train: '-5' is not an integer of at least 1"),
        (["--epochs", "0"], "argument --epochs: '0' is not an integer of at least 1"),
        (["--batch-size", "1.5"], "argument --batch-size: '1.5' is not an integer of at least 1"),
        (["--dropout", "nan"], "argument --dropout: 'nan' is not a number from 0 up to"),
        (["--min-accuracy", "99"], "argument --min-accuracy: '99' is not a fraction above 0"),
        (["--min-accuracy", "nan"], "argument --min-accuracy: 'nan' is not a fraction"),
    ],
)
def test_training_arguments_out_of_range_are_refused(capsys, args, message):
    from training.train_cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_momentum_reaches_both_momentum_optimizers():
    from training.train import make_trainer

    net = build_net("mlp")
    net.initialize()
    for optimizer in ("sgd", "nag"):
        cfg = TrainConfig(optimizer=optimizer, momentum=0.7)
        assert make_trainer(net, cfg, 10)._optimizer.momentum == 0.7


def test_a_diverged_run_stops_early_and_publishes_nothing(tmp_path):
    proc = run(sample_training(tmp_path, "--epochs", "20", "--limit-train", "256", "--lr", "1e30"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "training diverged in epoch 1" in proc.stderr and "try a lower --lr" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mnist").exists()


def nan_net() -> gluon.HybridBlock:
    net = build_net("mlp")
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 1, 28, 28)))
    for param in net.collect_params().values():
        param.set_data(mx.nd.full(param.shape, np.nan))
    return net


def test_nan_weights_are_never_exported(sample_test, tmp_path):
    from training.train import Diverged, TrainResult, export_and_check

    with pytest.raises(Diverged, match="holds NaN or infinity"):
        export_and_check(TrainResult(nan_net(), 0.13, 0.31), tmp_path, "m", sample_test)
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_cannot_be_written_is_a_store_error(sample_test, tmp_path, monkeypatch):
    from store import StoreError
    from training.train import TrainResult, export_and_check

    net = build_net("mlp")
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 1, 28, 28)))

    def full_disk(*args, **kwargs):  # what MXNet raises when the disk is full
        raise mx.base.MXNetError(
            "Traceback (most recent call last):\n  [bt] (0) libmxnet.so\n"
            "  File src/io/local_filesys.cc, line 36\nCheck failed: nwrite == size (0 vs. 4096) : "
            "FileStream.Write incomplete"
        )

    monkeypatch.setattr(net, "export", full_disk)
    with pytest.raises(StoreError, match=r"could not export into .*FileStream\.Write incomplete"):
        export_and_check(TrainResult(net, 0.13, 0.31), tmp_path, "m", sample_test)


def test_a_nan_model_is_refused_at_load_and_by_evaluate(tiny_store, tmp_path):
    """A NaN model published by other means: the service and evaluate refuse it."""
    store = ModelStore(tmp_path / "store")
    fields = ("name", "version", "artifacts", "schema_version")
    manifest = {k: v for k, v in tiny_store.resolve("mnist").manifest.items() if k not in fields}

    def write(folder: Path) -> dict[str, str]:
        nan_net().export(str(folder / "mnist"), epoch=0)
        return {"symbol": "mnist-symbol.json", "params": "mnist-0000.params"}

    mv = publish(store, "mnist", write, manifest)
    with pytest.raises(ValueError, match="not finite"):
        loading.load(mv)
    proc = run(
        [
            *(sys.executable, "-m", "training.evaluate", "mnist", "--store", str(store.root)),
            *("--data-dir", str(ROOT / "tests/data/mnist-sample")),
        ]
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "v1 cannot be loaded: ValueError: the model's outputs are not finite" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("edit", "status", "said"),
    [
        (lambda m: m["metrics"].update(test_loss=99.0), 1, "test_loss 99: MISMATCH"),
        (lambda m: m["metrics"].update(confusion=[[0] * 10] * 10), 1, "confusion matrix: MISMATCH"),
        (lambda m: m["metrics"].update(test_accuracy="0.25"), 2, "test metrics numbers"),
        (lambda m: m["metrics"].update(test_accuracy=10**400), 2, "not a finite number"),
        (lambda m: m.update(metrics=[1]), 2, "'metrics' must be an object"),
        (lambda m: m["metrics"].update(confusion="x"), 2, "not a matrix of counts"),
        (lambda m: m["metrics"].update(confusion=[[0.7] * 10] * 10), 2, "not a matrix of counts"),
        (lambda m: m["metrics"].update(confusion=[[[[1]]]]), 2, "not a matrix of counts"),
        (lambda m: m.pop("metrics"), 0, "records no metrics: nothing to compare"),
        (lambda m: m["data"].update(md5="x"), 0, "confusion matrix: match"),  # none recorded
        (lambda m: m["data"]["md5"].update({"t10k-labels-idx1-ubyte": "0" * 32}), 0, "other test"),
    ],
)
def test_evaluate_checks_every_recorded_metric(tiny_store, tmp_path, capsys, edit, status, said):
    """Evaluated on the data it was trained with, a hand-edited record is caught."""
    from training import evaluate

    store_dir = shutil.copytree(tiny_store.root, tmp_path / "store")
    manifest_path = store_dir / "mnist" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    sample = str(ROOT / "tests/data/mnist-sample")
    assert evaluate.main(["mnist:1", "--store", str(store_dir), "--data-dir", sample]) == status
    out = capsys.readouterr()
    assert said in out.out + out.err


@pytest.mark.parametrize(
    "ref", ["mnist:²", "mnist:١", "mnist:0", "mnist:-1", "mnist:1\n", "mnist:", "mnist:1000000000"]
)
def test_evaluate_takes_only_ascii_positive_versions(ref):
    import argparse

    from training.evaluate import parse_ref

    with pytest.raises(argparse.ArgumentTypeError):
        parse_ref(ref)
    assert parse_ref("mnist:12") == ("mnist", 12) and parse_ref("mnist") == ("mnist", None)
