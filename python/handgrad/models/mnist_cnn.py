"""A small CNN on MNIST whose first layer has 40 filters.

conv 1->40 k5, ReLU, max-pool 2 (28 -> 24 -> 12); conv 40->80 k5, ReLU,
max-pool 2 (12 -> 8 -> 4); linear 1280 -> 128 -> 10 with dropout 0.5.
Adam, lr 1e-3. Target: at least 98.5% after 5 epochs. Pictures: the 40
first-layer filters as a grid and the test confusion matrix.
"""

from torch import nn

from ..training.recipe import ClassifierRecipe


class MnistCNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 40, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(40, 80, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(80 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MnistCNNRecipe(ClassifierRecipe):
    name = "mnist_cnn"
    dataset = "mnist"
    description = "CNN with 40 first-layer filters on MNIST (Adam)"
    epochs = 5
    batch_size = 128
    lr = 1e-3

    def build(self):
        return MnistCNN()

    def plots(self, model, losses, history, extras, out_dir, test_data, prepare):
        from ..training import plots

        files = super().plots(model, losses, history, extras, out_dir, test_data, prepare)
        files.append(plots.filter_grid(model.features[0].weight, out_dir, "first_layer_filters.png",
                                       "The 40 first-layer filters"))
        return files
