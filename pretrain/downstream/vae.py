"""The VAE whose latent space scHybridBERT builds its cell graph in (Briefings in Bioinformatics 2024):
encoder fc1 -> ReLU -> (mu, logvar), decoder fc3 -> ReLU -> fc4 -> sigmoid, trained on
``recon_weight * MSE + (1 - recon_weight) * KL``.

This project's choices, where the paper's description (as issue 23 gives it) leaves them open:
the input is log1p-CP10k expression of the highly variable genes, each gene divided by its
maximum over the cells (`unit_scale`) so that it lies in [0, 1] like the sigmoid output;
the MSE is summed over genes and the KL over latent dimensions, both averaged over cells (the
ELBO's own scale: a per-element MSE would be ~1/n_genes of the KL and the latent would collapse
to the prior); the cell's latent is ``mu`` (no sampling), so the graph is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    hidden: int = 256          # fc1 / fc3 width
    latent: int = 32           # mu / logvar width
    recon_weight: float = 0.5  # alpha in alpha * MSE + (1 - alpha) * KL
    steps: int = 1500          # optimizer steps (epochs of reshuffled cells until reached): a small file
    batch_size: int = 128      # needs as many steps as a large one to train
    lr: float = 1e-3


class CellVAE(nn.Module):
    def __init__(self, n_inputs: int, hidden: int = 256, latent: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(n_inputs, hidden)
        self.fc21 = nn.Linear(hidden, latent)  # mu
        self.fc22 = nn.Linear(hidden, latent)  # logvar
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, n_inputs)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [N, G] in [0, 1] -> (mu, logvar), each [N, latent]."""
        h = torch.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc4(torch.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction [N, G], mu, logvar); z drawn by the reparameterisation trick."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return self.decode(mu + eps * torch.exp(0.5 * logvar)), mu, logvar


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             recon_weight: float) -> torch.Tensor:
    """``recon_weight * MSE + (1 - recon_weight) * KL(q(z|x) || N(0, I))``, MSE summed over genes
    and KL over latent dimensions, both averaged over the ``[N]`` cells."""
    mse = ((recon - x) ** 2).sum(dim=1).mean()
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()
    return recon_weight * mse + (1 - recon_weight) * kl


def unit_scale(x: np.ndarray) -> np.ndarray:
    """Each column of non-negative ``x`` [N, G] divided by its maximum (all-zero columns stay 0)."""
    top = x.max(axis=0, keepdims=True)
    return (x / np.where(top > 0, top, 1)).astype(np.float32)


def fit_vae_latent(x: np.ndarray, config: VAEConfig = VAEConfig(), seed: int = 0) -> np.ndarray:
    """Train a `CellVAE` on ``x`` [N, G] (values in [0, 1]) and return each cell's ``mu`` [N, latent]."""
    if x.min() < 0 or x.max() > 1:
        raise ValueError("the VAE's input must lie in [0, 1] (its decoder ends in a sigmoid): pass unit_scale(x)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    model = CellVAE(data.shape[1], config.hidden, config.latent)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = 0
    while step < config.steps:
        for rows in torch.randperm(len(data), generator=gen).split(config.batch_size)[: config.steps - step]:
            batch = data[rows]
            recon, mu, logvar = model(batch, gen)
            loss = vae_loss(recon, batch, mu, logvar, config.recon_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return model.encode(data)[0].numpy()
