"""LeNet-5 on CIFAR-10 (the classic PyTorch tutorial network).

conv 3->6 k5, ReLU, max-pool 2; conv 6->16 k5, ReLU, max-pool 2;
linear 400->120->84->10 with ReLU between. Inputs normalized with mean 0.5
and std 0.5 per channel; SGD, lr 0.001, momentum 0.9.
Reference: 60% test accuracy after 5 epochs at batch 4, 64% after 20 epochs
at batch 16.
"""

import torch
from torch import nn

from ..training.recipe import ClassifierRecipe


class LeNet5(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet5Recipe(ClassifierRecipe):
    name = "lenet5"
    dataset = "cifar10"
    description = "LeNet-5 on CIFAR-10 (SGD, momentum 0.9)"
    epochs = 5
    batch_size = 4
    lr = 0.001
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def build(self):
        return LeNet5()

    def optimizers(self, model, lr):
        return {"model": torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)}
