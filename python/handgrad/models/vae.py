"""A convolutional variational autoencoder on MNIST (``mnist_vae``).

Encoder: conv 1->16 k3 p1, ReLU, max-pool 2; conv 16->32 k3 p1, ReLU,
max-pool 2; linear 1568 -> 2 x latent (mean and log-variance). Decoder:
linear latent -> 1568, ReLU, reshape to 32x7x7; nearest upsampling x2, conv
32->16, ReLU; nearest upsampling x2, conv 16->1, sigmoid.

Training samples z = mu + sigma * eps (reparameterization, eps ~ N(0, I), so
the gradient flows through mu and sigma); the loss per image is the binary
cross-entropy of the reconstruction summed over pixels plus the closed-form
KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1),
reported separately. In eval mode z = mu. Pictures: samples decoded from
z ~ N(0, I), and the interpolation between two test digits in latent space.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .autoencoders import ReconstructionRecipe


class ConvVAE(nn.Module):
    def __init__(self, latent=16):
        super().__init__()
        self.latent = latent
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.to_stats = nn.Linear(32 * 7 * 7, 2 * latent)
        self.from_code = nn.Sequential(nn.Linear(latent, 32 * 7 * 7), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(16, 1, 3, padding=1), nn.Sigmoid())

    def encode(self, x):
        """The posterior's mean and log-variance."""
        return self.to_stats(self.features(x)).chunk(2, dim=1)

    def decode(self, z):
        return self.decoder(self.from_code(z).view(-1, 32, 7, 7))

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.decode(z), mu, logvar


class VAERecipe(ReconstructionRecipe):
    name = "mnist_vae"
    description = "Convolutional VAE on MNIST (Adam)"
    epochs = 10
    embeds_in_2d = False

    def build(self):
        return ConvVAE()

    def loss(self, model, x_in, x):
        recon, mu, logvar = model(x_in)
        n = len(x)
        reconstruction = F.binary_cross_entropy(recon, x, reduction="sum") / n
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum() / n
        return {"loss": reconstruction + kl, "reconstruction": reconstruction, "kl": kl}, recon

    def curve_keys(self, history):
        return ("train_loss", "test_loss", "train_reconstruction", "train_kl")

    @torch.no_grad()
    def plots(self, model, losses, history, extras, out_dir, test_data, prepare):
        from ..training import plots

        files = super().plots(model, losses, history, extras, out_dir, test_data, prepare)
        device = next(model.parameters()).device
        z = torch.randn(64, model.latent, generator=torch.Generator().manual_seed(0)).to(device)
        files.append(plots.image_grid(model.decode(z), out_dir, "vae_samples.png",
                                      "mnist_vae: decoded samples z ~ N(0, I)",
                                      value_range=(0, 1)))
        files.append(plots.image_grid(self.interpolations(model, test_data, prepare), out_dir,
                                      "vae_interpolation.png",
                                      "mnist_vae: latent interpolation between test digits",
                                      columns=10, value_range=(0, 1)))
        return files

    def interpolations(self, model, data, prepare, pairs=((0, 1), (2, 3), (4, 5), (6, 7)), steps=10):
        """Decoded points on the segment between the latent means of two test
        digits of different classes; one row per pair."""
        images, labels = data.images, data.labels
        firsts = [int((labels == k).nonzero()[0]) if (labels == k).any() else 0 for k in range(10)]
        rows = []
        for a, b in pairs:
            x, _ = prepare(images[[firsts[a], firsts[b]]], labels[[firsts[a], firsts[b]]])
            mu, _ = model.encode(x)
            t = torch.linspace(0, 1, steps, device=mu.device).view(-1, 1)
            rows.append(model.decode((1 - t) * mu[0] + t * mu[1]))
        return torch.cat(rows)
