"""Stand-ins for the networks a user brings: a TorchScript "Inception" with the real file's call signature, and a
tiny CLIP dir in transformers' layout, both built here in seconds and saved to a temp dir."""

import string
import warnings

import pytest
import torch


class StandInInception(torch.nn.Module):
    """``net(x, return_features=True)`` on float images in [0, 255], N x 3 x H x W -> N x dim, resizing inside as
    the real network does (to 8 x 8 here, not 299)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, dim)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x / 255.0, size=(8, 8), mode="bilinear", align_corners=False)
        features = torch.tanh(self.proj(x.flatten(1)))
        return features if return_features else features[:, :10]


def make_standin(path, dim: int = 64):
    torch.manual_seed(0)
    with warnings.catch_warnings():  # TorchScript is deprecated, and still the format of the file users have
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(StandInInception(dim).eval()).save(str(path))
    return path


@pytest.fixture(scope="session")
def standin_inception(tmp_path_factory):
    return make_standin(tmp_path_factory.mktemp("inception") / "inception-standin.pt")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random CLIP (2 layers, 32 px images, a character vocabulary) saved as a local CLIP dir."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ".,'-!?"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
