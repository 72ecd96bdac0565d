"""The Batch Normalization study: the lab's claims and the BN paper's MNIST
experiment, measured with the project's own nets and data code.

Run it with ``python -m training.study`` (see training/study/cli.py); the
notebook notebooks/batch_normalization.ipynb calls the same functions.

- config: what runs, at which size (full, quick, small, smoke)
- runner: data loading and the training loop with checkpoints
- paper, lr, dropout: experiments 1, 2 and 3
- plots, report: figures and docs/bn-study.md from results.json
"""
