"""A small vision transformer on MNIST.

4x4 patches (49 of them) embedded by a stride-4 convolution, a class token
and learned position embeddings, then pre-norm encoder blocks (LayerNorm ->
multi-head attention -> residual; LayerNorm -> MLP -> residual) and a linear
head on the class token. AdamW, lr 1e-3. Target: at least 97%.
"""

import torch
from torch import nn

from ..training.recipe import ClassifierRecipe


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VitMnist(nn.Module):
    def __init__(self, patch=4, dim=64, depth=4, heads=4, mlp_dim=128, dropout=0.1,
                 image_size=28, num_classes=10):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim, dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        patches = self.embed(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        cls = self.cls_token.expand(len(x), -1, -1)
        h = self.blocks(torch.cat([cls, patches], dim=1) + self.pos)
        return self.head(self.norm(h[:, 0]))


class VitMnistRecipe(ClassifierRecipe):
    name = "vit_mnist"
    dataset = "mnist"
    description = "Small vision transformer (4x4 patches, 4 blocks) on MNIST (AdamW)"
    epochs = 10
    batch_size = 128
    lr = 1e-3

    def build(self):
        return VitMnist()

    def optimizers(self, model, lr):
        return {"model": torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)}
