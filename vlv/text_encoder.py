"""T: the frozen text encoder of the text-to-image model, applied to caption embeddings z instead of token ids.

Paper Sec. 3.1-3.2: c = T(inputs_embeds=z), learned positions 0..Nq-1 added, causal CLIP encoder, final
LayerNorm: (B, Nq, d_T). Stage 1 conditions the frozen UNet on c (``vlv.decoder``); stage 2 feeds c to psi
(``vlv.captioner``). Stage 2 needs T alone, so it is loaded without the UNet and VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextModel
from transformers.masking_utils import create_causal_mask

from vlv.progress import quiet_library


def clip_from_embeds(text_encoder: CLIPTextModel, z: torch.Tensor) -> torch.Tensor:
    """c = T(inputs_embeds=z), z (B, L, d_T) -> (B, L, d_T); L <= the text encoder's positions.

    transformers 5's ``CLIPTextModel.forward`` takes only input_ids, so this repeats its body with the
    model's own submodules and mask: equal to ``text_encoder(ids).last_hidden_state`` when
    ``z = token_embedding(ids)``.
    """
    te = text_encoder
    hidden = te.embeddings(inputs_embeds=z)  # (B, L, d_T): z + position_embedding(0..L-1)
    mask = create_causal_mask(config=te.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    hidden = te.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state  # (B, L, d_T)
    return te.final_layer_norm(hidden)  # (B, L, d_T)


def load_text_encoder(sd_dir: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> CLIPTextModel:
    """T alone from a Stable-Diffusion-layout dir, frozen, loaded straight into ``dtype`` on ``device``."""
    path = Path(sd_dir) / "text_encoder"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{sd_dir} has no text_encoder/ (a Stable Diffusion dir holds one)")
    with quiet_library():
        te = CLIPTextModel.from_pretrained(path, dtype=dtype, device_map=device, local_files_only=True)
    return te.requires_grad_(False).eval()
