"""The models handgrad trains (``handgrad train MODEL``), each with its recipe.

Models are built from torch.nn layers; ``build(name, backend="handgrad")``
runs their convolutions, max-pooling, cross-entropy, LSTMs and attention on
handgrad's ops (via handgrad.patch), ``backend="native"`` leaves them native.
"""

from ..training.options import BACKENDS  # noqa: F401  (re-exported)
from . import autoencoders, cifar_cnn, gan, lenet5, lstm_mnist, mnist_cnn, vae, vit_mnist

RECIPES = {r.name: r for r in (
    lenet5.LeNet5Recipe(),
    cifar_cnn.CifarCNNRecipe(),
    mnist_cnn.MnistCNNRecipe(),
    lstm_mnist.LstmMnistRecipe(),
    vit_mnist.VitMnistRecipe(),
    autoencoders.MlpAutoencoderRecipe(),
    autoencoders.ConvAutoencoderRecipe(),
    autoencoders.SkipConvAutoencoderRecipe(),
    vae.VAERecipe(),
    gan.GANRecipe(),
)}


def recipe(name):
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError("unknown model %r; choose one of: %s"
                         % (name, ", ".join(sorted(RECIPES)))) from None


def apply_backend(module, backend):
    """Runs `module` on handgrad's ops (patched in place) or leaves it native."""
    if backend == "handgrad":
        from ..patch import patch

        return patch(module, strict=True)
    if backend == "native":
        return module
    raise ValueError("unknown backend %r; choose handgrad or native" % backend)


def build(name, backend="handgrad"):
    """The model `name` on the given backend."""
    return apply_backend(recipe(name).build(), backend)
