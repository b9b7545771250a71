"""Autoencoders on MNIST that embed digits in two dimensions.

* ``mnist_ae``: an MLP autoencoder, 784 -> 512 -> 128 -> 32 -> 2 and back,
  ReLU between layers but none entering or leaving the 2-D embedding.
* ``mnist_cae``: a convolutional autoencoder. Encoder: conv 1->4 k3 p1, ReLU,
  max-pool 2; conv 4->8 k3 p1, ReLU, max-pool 2; linear 392->20, ReLU,
  linear 20->2. Decoder: linear 2->20, ReLU, linear 20->392, ReLU, reshape to
  8x7x7; nearest upsampling x2, conv 8->4 k3 p1, ReLU; nearest upsampling x2,
  conv 4->1 k3 p1, sigmoid.
* ``mnist_cae_skip``: the same with skip connections: each max-pool's output
  is added to the input of the upsampling layer working at its resolution
  (8x7x7 before the first upsampling, 4x14x14 before the second).

``--noise S`` trains the denoising variant: Gaussian noise N(0, S^2) is added
to the input in training and evaluation, and the target stays the clean image.
All use Adam (lr 1e-3) and the mean squared error per pixel.
"""

import copy

import torch
from torch import nn
from torch.nn import functional as F

from ..training.recipe import FLOAT32, Recipe

EVAL_NOISE_SEED = 1234  # the same corrupted test set at every epoch


class MlpAutoencoder(nn.Module):
    def __init__(self, sizes=(784, 512, 128, 32, 2)):
        super().__init__()
        enc, dec = [], []
        for a, b in zip(sizes[:-1], sizes[1:]):
            enc += [nn.Linear(a, b), nn.ReLU()]
        rev = sizes[::-1]
        for a, b in zip(rev[:-1], rev[1:]):
            dec += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(nn.Flatten(), *enc[:-1])  # no ReLU into the embedding
        self.decoder = nn.Sequential(*dec[:-1], nn.Sigmoid())  # none out of it either

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z).view(-1, 1, 28, 28)

    def forward(self, x):
        return self.decode(self.encode(x))


class ConvAutoencoder(nn.Module):
    def __init__(self, skip=False):
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.to_code = nn.Sequential(nn.Flatten(), nn.Linear(392, 20), nn.ReLU(), nn.Linear(20, 2))
        self.from_code = nn.Sequential(nn.Linear(2, 20), nn.ReLU(), nn.Linear(20, 392), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.deconv1 = nn.Conv2d(8, 4, 3, padding=1)
        self.deconv2 = nn.Conv2d(4, 1, 3, padding=1)

    def _encode(self, x):
        p1 = self.pool(F.relu(self.conv1(x)))  # 4 x 14 x 14
        p2 = self.pool(F.relu(self.conv2(p1)))  # 8 x 7 x 7
        return self.to_code(p2), (p1, p2)

    def encode(self, x):
        return self._encode(x)[0]

    def decode(self, z, skips=None):
        h = self.from_code(z).view(-1, 8, 7, 7)
        if skips is not None:
            h = h + skips[1]
        h = F.relu(self.deconv1(self.up(h)))  # 4 x 14 x 14
        if skips is not None:
            h = h + skips[0]
        return torch.sigmoid(self.deconv2(self.up(h)))

    def forward(self, x):
        z, skips = self._encode(x)
        return self.decode(z, skips if self.skip else None)


class ReconstructionRecipe(Recipe):
    """Shared by the autoencoders: [0, 1] images in, the same images out."""

    dataset = "mnist"
    epochs = 10
    batch_size = 128
    lr = 1e-3
    noise = 0.0
    embeds_in_2d = True  # model.encode gives 2-D codes to plot

    def configured(self, config):
        recipe = copy.copy(self)
        recipe.noise = config.noise
        return recipe

    def losses(self):
        return {}

    def prepare(self, images, labels, train, generator):
        return images.float().div_(255), labels

    def corrupt(self, x, generator=None):
        if not self.noise:
            return x
        # Drawn on the CPU whatever the device: a run is the same on a GPU.
        return x + self.noise * torch.randn(x.shape, generator=generator).to(x.device)

    def loss(self, model, x_in, x):
        """(the loss and its parts as scalar tensors, "loss" first; the reconstruction)"""
        recon = model(x_in)
        return {"loss": F.mse_loss(recon, x)}, recon

    def train_batch(self, model, losses, optimizers, x, y, step=0, precision=FLOAT32):
        with precision.autocast():
            parts, _ = self.loss(model, self.corrupt(x), x)
        precision.step(parts["loss"], optimizers["model"])
        return {k: v.item() for k, v in parts.items()}

    @torch.no_grad()
    def evaluate(self, model, losses, data, prepare):
        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        sums, n = {}, 0
        for images, labels in data.batches(self.eval_batch_size):
            x, _ = prepare(images, labels)
            x_in = self.corrupt(x, generator)
            parts, recon = self.loss(model, x_in, x)
            parts["mse_vs_clean"] = F.mse_loss(recon, x)
            if self.noise:
                parts["mse_vs_noisy_input"] = F.mse_loss(recon, x_in)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(x)
            n += len(x)
        return {"test_" + k: v / n for k, v in sums.items()}, {}

    def _sample(self, data, prepare, count=16):
        images, labels = next(data.batches(count))
        x, _ = prepare(images, labels)
        return x, self.corrupt(x, torch.Generator().manual_seed(EVAL_NOISE_SEED))

    @torch.no_grad()
    def plots(self, model, losses, history, extras, out_dir, test_data, prepare):
        from ..training import plots

        x, x_in = self._sample(test_data, prepare)
        _, recon = self.loss(model, x_in, x)
        rows = [x, x_in, recon] if self.noise else [x, recon]
        labels = ["original", "noisy input (std %g)" % self.noise, "reconstruction"] \
            if self.noise else ["original", "reconstruction"]
        files = [plots.image_grid(torch.cat(rows), out_dir, "reconstructions.png",
                                  "%s: test reconstructions" % self.name, columns=16,
                                  row_labels=labels, value_range=(0, 1))]
        if self.embeds_in_2d:
            files.append(self.embedding_plot(model, test_data, prepare, out_dir))
        return files

    @torch.no_grad()
    def embedding_plot(self, model, data, prepare, out_dir):
        from ..training import plots

        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        codes, labels = [], []
        for images, y in data.batches(self.eval_batch_size):
            x, _ = prepare(images, y)
            codes.append(model.encode(self.corrupt(x, generator)))
            labels.append(y)
        title = "%s%s: 2-D embedding of the test set" % (
            self.name, " (denoising, noise %g)" % self.noise if self.noise else "")
        return plots.embedding_scatter(torch.cat(codes), torch.cat(labels), out_dir,
                                       "embedding.png", title)


class MlpAutoencoderRecipe(ReconstructionRecipe):
    name = "mnist_ae"
    description = "MLP autoencoder with a 2-D embedding on MNIST (Adam)"

    def build(self):
        return MlpAutoencoder()


class ConvAutoencoderRecipe(ReconstructionRecipe):
    name = "mnist_cae"
    description = "Convolutional autoencoder with a 2-D embedding on MNIST (Adam)"
    skip = False

    def build(self):
        return ConvAutoencoder(skip=self.skip)


class SkipConvAutoencoderRecipe(ConvAutoencoderRecipe):
    name = "mnist_cae_skip"
    description = "Convolutional autoencoder with pool-to-upsample skip connections (Adam)"
    skip = True
