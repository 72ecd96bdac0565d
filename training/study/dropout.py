"""Experiment 3: BatchNorm on/off x Dropout on/off on the project's MLP.

Train accuracy is measured like test accuracy, in inference mode on a fixed
subset of the training images, so the gap (train - test) is the generalization
gap, not an artefact of Dropout being active during training.
"""

from __future__ import annotations

from training.study.config import StudyConfig
from training.study.runner import RunSpec, StudyData, checkpoints, subset, train_run
from training.study.stats import log, spread

CONFIGS = ((False, False), (False, True), (True, False), (True, True))  # (BN, Dropout)


def name(bn: bool, dropout: bool) -> str:
    return {
        (False, False): "neither",
        (False, True): "dropout",
        (True, False): "bn",
        (True, True): "bn+dropout",
    }[(bn, dropout)]


def run(cfg: StudyConfig, data: StudyData) -> dict:
    dc = cfg.dropout
    train_eval = subset(data.train, dc.train_eval_images)
    evals = {"train": train_eval, "test": subset(data.test, dc.eval_images)}
    final = {"train": train_eval, "test": data.test}
    at = checkpoints(dc.steps, n_log=16, n_lin=24)
    runs = []
    for bn, drop in CONFIGS:
        for seed in cfg.seeds:
            spec = RunSpec(
                "mlp",
                bn,
                dc.dropout if drop else 0.0,
                dc.lr,
                seed,
                dc.steps,
                batch_size=dc.batch_size,
                momentum=dc.momentum,
                weight_decay=dc.weight_decay,
            )
            record, _ = train_run(spec, data, evals, at=at, final=final)
            record["config"] = name(bn, drop)
            for row in record["history"]:
                if "train_accuracy" in row:
                    row["gap"] = row["train_accuracy"] - row["test_accuracy"]
            if not record["diverged"]:
                record["final_gap"] = record["final_train_accuracy"] - record["final_test_accuracy"]
            log(
                f"[dropout] {record['config']} seed {seed}: {record['steps_done']} steps in "
                f"{record['train_seconds']:.0f}s, train {record.get('final_train_accuracy', 0):.4f}"
                f" test {record.get('final_test_accuracy', 0):.4f}"
            )
            runs.append(record)
    return {"runs": runs, "summary": summarize(runs), "train_eval_images": len(train_eval)}


def summarize(runs: list[dict]) -> dict:
    out: dict = {"configs": {}}
    for bn, drop in CONFIGS:
        rs = [r for r in runs if r["config"] == name(bn, drop)]
        out["configs"][name(bn, drop)] = {
            "batch_norm": bn,
            "dropout": drop,
            "diverged": sum(r["diverged"] for r in rs),
            "train_accuracy": spread(r.get("final_train_accuracy") for r in rs),
            "test_accuracy": spread(r.get("final_test_accuracy") for r in rs),
            "gap": spread(r.get("final_gap") for r in rs),
            "test_error": spread(
                1 - r["final_test_accuracy"] for r in rs if "final_test_accuracy" in r
            ),
        }
    c = out["configs"]

    def delta(a: str, b: str, what: str) -> float | None:
        x, y = c[a][what]["mean"], c[b][what]["mean"]
        return None if x is None or y is None else x - y

    # What each adds on its own and on top of the other (negative gap = less overfitting).
    out["effects"] = {
        "bn_alone": {
            "gap": delta("bn", "neither", "gap"),
            "test_accuracy": delta("bn", "neither", "test_accuracy"),
        },
        "dropout_alone": {
            "gap": delta("dropout", "neither", "gap"),
            "test_accuracy": delta("dropout", "neither", "test_accuracy"),
        },
        "dropout_on_top_of_bn": {
            "gap": delta("bn+dropout", "bn", "gap"),
            "test_accuracy": delta("bn+dropout", "bn", "test_accuracy"),
        },
        "bn_on_top_of_dropout": {
            "gap": delta("bn+dropout", "dropout", "gap"),
            "test_accuracy": delta("bn+dropout", "dropout", "test_accuracy"),
        },
    }
    ok = [k for k, v in c.items() if v["test_accuracy"]["mean"] is not None]
    out["best_test"] = max(ok, key=lambda k: c[k]["test_accuracy"]["mean"]) if ok else None
    okg = [k for k, v in c.items() if v["gap"]["mean"] is not None]
    out["smallest_gap"] = min(okg, key=lambda k: c[k]["gap"]["mean"]) if okg else None
    return out
