"""A GMM prior trained jointly with an autoencoder by gradient descent.

An MLP encoder maps 12-D points to 2-D embeddings, a decoder reconstructs them, and a
``GaussianMixture`` layer (3 full-covariance components) is a learned prior on the embeddings.
One loss, one optimizer: reconstruction error minus ``beta`` times the mixture's penalized mean
log-density of the embeddings (``torchgmm.gradient.objective``: the objective EM and the gradient
mode share; its ``-reg/2 tr(precision)`` term keeps the prior from collapsing onto shrinking
embeddings). After a short plain-autoencoder warm-up, the GMM starts from an EM fit to the
embeddings; afterwards its parameters move with the network's. Prints the losses going down and
how well the mixture's components recover the three hidden groups (purity).

    python examples/density_head.py

A few seconds on a CPU.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchgmm  # noqa: E402
from torchgmm.gradient import objective  # noqa: E402


def make_data(n: int = 600, d_in: int = 12, seed: int = 0):
    """Three groups on a 2-D latent plane, pushed through a fixed random nonlinear map to 12-D."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]])
    latent = centres[labels] + 0.45 * torch.randn(n, 2, generator=g)
    lift = torch.randn(2, d_in, generator=g)
    x = torch.tanh(latent @ lift) + 0.3 * (latent @ lift) + 0.05 * torch.randn(n, d_in, generator=g)
    return (x - x.mean(0)) / x.std(0), labels


def purity(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of points whose component's majority group is their own."""
    hits = 0
    for k in pred.unique():
        hits += int(torch.bincount(labels[pred == k], minlength=3).max())
    return hits / len(labels)


def main(pretrain: int = 200, steps: int = 300, beta: float = 0.1, reg: float = 0.05) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, labels = make_data()
    encoder = nn.Sequential(nn.Linear(x.shape[1], 64), nn.Tanh(), nn.Linear(64, 2))
    decoder = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, x.shape[1]))
    start = time.perf_counter()

    # 1. a plain autoencoder for a few steps, so that the embeddings mean something
    opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=5e-3)
    for _ in range(pretrain):
        opt.zero_grad()
        (decoder(encoder(x)) - x).square().mean().backward()
        opt.step()

    # 2. the mixture starts from an EM fit to those embeddings ...
    prior = torchgmm.GaussianMixture(3, covariance_type="full", random_state=0, n_init=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        prior.fit(encoder(x))

    # 3. ... and from here on learns by gradient descent, jointly with the encoder and decoder
    params = list(encoder.parameters()) + list(decoder.parameters()) + list(prior.parameters())
    opt = torch.optim.Adam(params, lr=5e-3)
    weights = torch.ones(len(x))
    cov = torchgmm.get_covariance("full")
    print(f"{'step':>5} {'loss':>9} {'recon':>8} {'-log p(z)':>10} {'purity':>7}")
    for step in range(steps + 1):
        z = encoder(x)
        recon = (decoder(z) - x).square().mean()
        log_density = objective(z, weights, prior.mixture_params(), cov, reg)  # penalized mean log p(z)
        loss = recon - beta * log_density
        if step % 50 == 0:
            with torch.no_grad():
                pred = prior.log_responsibilities(z).argmax(-1)
            print(f"{step:5d} {loss.item():9.4f} {recon.item():8.4f} {-log_density.item():10.4f} {purity(pred, labels):7.3f}")
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"({time.perf_counter() - start:.1f} s; mixture weights {[round(v, 3) for v in prior.weights_.tolist()]})")


if __name__ == "__main__":
    main()
