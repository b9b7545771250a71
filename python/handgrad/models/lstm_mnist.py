"""MNIST read row by row by an LSTM.

Each image is a sequence of 28 steps of 28 pixels; an LSTM with 128 hidden
units reads it and its last hidden state goes to a linear 128 -> 10 layer.
Adam, lr 1e-3. Target: at least 97%.
"""

from torch import nn

from ..training.recipe import ClassifierRecipe


class LstmMnist(nn.Module):
    def __init__(self, hidden_size=128, num_layers=1, num_classes=10):
        super().__init__()
        self.lstm = nn.LSTM(28, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        rows = x.flatten(1, 2)  # (N, 1, 28, 28) -> (N, 28 steps, 28 pixels)
        _, (h_n, _) = self.lstm(rows)
        return self.head(h_n[-1])


class LstmMnistRecipe(ClassifierRecipe):
    name = "lstm_mnist"
    dataset = "mnist"
    description = "LSTM reading MNIST row by row (Adam)"
    epochs = 5
    batch_size = 128
    lr = 1e-3

    def build(self):
        return LstmMnist()
