"""A GAN on MNIST (``mnist_gan``).

Discriminator: a CNN (conv 1->32 k3 p1, LeakyReLU, max-pool 2, dropout 0.3;
conv 32->64 k3 p1, LeakyReLU, max-pool 2, dropout 0.3; linear 3136 -> 2)
classifying real (class 1) against fake (class 0) with cross-entropy.
Generator: z ~ N(0, I) (64-D) -> linear -> 64x7x7, batch norm, ReLU; nearest
upsampling x2, conv 64->32, batch norm, ReLU; nearest upsampling x2, conv
32->1, tanh, giving images in [-1, 1] like the data.

The batch norms and dropouts are there because without them the
discriminator won outright on the full MNIST within one epoch (D(G(z)) fell
to 3e-4 and the generator stopped improving); with them the two stay
balanced (D(x) ~ 0.6-0.8, D(G(z)) ~ 0.3-0.4).

Minimax training: the discriminator minimizes CE(D(x), real) + CE(D(G(z)),
fake); the generator uses the non-saturating loss CE(D(G(z)), real), i.e.
maximizes log D(G(z)), whose gradient does not vanish while D rejects its
samples. --d-steps k takes k discriminator steps per generator step. Adam,
lr 2e-4, betas (0.5, 0.999). Reported per epoch: both losses and the mean
D(x) and D(G(z)) (the discriminator's probability of "real").
"""

import torch
from torch import nn
from torch.nn import functional as F

from ..training.recipe import FLOAT32, Recipe

NOISE_DIM = 64
REAL, FAKE = 1, 0


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2), nn.Dropout(0.3),
            nn.Conv2d(32, 64, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2), nn.Dropout(0.3),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 2))

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    def __init__(self, noise_dim=NOISE_DIM):
        super().__init__()
        self.noise_dim = noise_dim
        self.project = nn.Sequential(nn.Linear(noise_dim, 64 * 7 * 7), nn.BatchNorm1d(64 * 7 * 7),
                                     nn.ReLU())
        self.net = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(64, 32, 3, padding=1),
            nn.BatchNorm2d(32), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(32, 1, 3, padding=1), nn.Tanh())

    def forward(self, z):
        return self.net(self.project(z).view(-1, 64, 7, 7))


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = Generator()
        self.discriminator = Discriminator()

    def sample(self, n, generator=None):
        """n images from noise drawn on the CPU (the same on every device)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.generator.noise_dim, generator=generator).to(device)
        return self.generator(z)


def _prob_real(logits):
    return logits.softmax(1)[:, REAL].mean()


class GANRecipe(Recipe):
    name = "mnist_gan"
    dataset = "mnist"
    description = "GAN with a CNN discriminator and an upsampling-conv generator on MNIST"
    epochs = 10
    batch_size = 128
    lr = 2e-4
    d_steps = 1

    def configured(self, config):
        import copy

        recipe = copy.copy(self)
        recipe.d_steps = config.d_steps
        return recipe

    def build(self):
        return GAN()

    def distribute(self, model, wrap):
        # The steps call the two networks separately: each is wrapped on its own.
        return nn.ModuleDict({"generator": wrap(model.generator),
                              "discriminator": wrap(model.discriminator)})

    def _fakes(self, model, n):
        """n generated images for this process's share of the batch. The noise of the
        whole batch is drawn (alike on every process) and sliced, so N processes use
        the noise that one process uses, and keep their random states equal."""
        rank, world = self.share.rank, self.share.world_size
        z = torch.randn(n * world, NOISE_DIM)[rank * n:(rank + 1) * n]
        return model.generator(z.to(next(model.parameters()).device))

    def optimizers(self, model, lr):
        betas = (0.5, 0.999)
        return {"generator": torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas),
                "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr,
                                                  betas=betas)}

    def prepare(self, images, labels, train, generator):
        return images.float().div_(127.5).sub_(1), labels

    @staticmethod
    def _targets(n, label, like):
        return torch.full((n,), label, dtype=torch.long, device=like.device)

    def train_batch(self, model, losses, optimizers, x, y, step=0, precision=FLOAT32):
        ce = losses["cross_entropy"]
        n = len(x)
        d = model.discriminator
        with precision.autocast():
            fake = self._fakes(model, n)
            real_logits = d(x)
            fake_logits = d(fake.detach())
            d_loss = (ce(real_logits, self._targets(n, REAL, x))
                      + ce(fake_logits, self._targets(n, FAKE, x)))
        precision.step(d_loss, optimizers["discriminator"])
        out = {"d_loss": d_loss.item(), "D_x": _prob_real(real_logits).item(),
               "D_G_z": _prob_real(fake_logits).item()}
        # A generator step after every d_steps discriminator steps of the epoch.
        if (step + 1) % self.d_steps == 0:
            with precision.autocast():
                g_loss = ce(d(self._fakes(model, n)), self._targets(n, REAL, x))
            precision.step(g_loss, optimizers["generator"])
            out["g_loss"] = g_loss.item()
        return out

    @torch.no_grad()
    def evaluate(self, model, losses, data, prepare):
        ce = losses["cross_entropy"]
        generator = torch.Generator().manual_seed(0)
        sums = {"d_loss": 0.0, "g_loss": 0.0, "D_x": 0.0, "D_G_z": 0.0}
        n_total = 0
        for images, labels in data.batches(self.eval_batch_size):
            x, _ = prepare(images, labels)
            n = len(x)
            real_logits = model.discriminator(x)
            fake_logits = model.discriminator(model.sample(n, generator))
            sums["d_loss"] += (ce(real_logits, self._targets(n, REAL, x))
                               + ce(fake_logits, self._targets(n, FAKE, x))).item() * n
            sums["g_loss"] += ce(fake_logits, self._targets(n, REAL, x)).item() * n
            sums["D_x"] += _prob_real(real_logits).item() * n
            sums["D_G_z"] += _prob_real(fake_logits).item() * n
            n_total += n
        return {"test_" + k: v / n_total for k, v in sums.items()}, {}

    def curve_keys(self, history):
        return ("train_d_loss", "train_g_loss")

    @torch.no_grad()
    def plots(self, model, losses, history, extras, out_dir, test_data, prepare):
        from ..training import plots

        epoch = history[-1]["epoch"] if history else 0
        samples = model.sample(64, torch.Generator().manual_seed(0))  # the same z every epoch
        name = "gan_samples_epoch_%02d.png" % epoch
        plots.image_grid(samples, out_dir, name, "mnist_gan: samples after epoch %d" % epoch,
                         value_range=(-1, 1))
        files = [name]
        files.append(plots.metric_curves(history, ("train_D_x", "train_D_G_z"), out_dir,
                                         "gan_d_outputs.png", "Mean D(x) and D(G(z))",
                                         ylabel="probability of 'real'"))
        files.append(plots.metric_curves(history, ("train_d_loss", "train_g_loss"), out_dir,
                                         "gan_losses.png", "Discriminator and generator losses"))
        return files
