"""The VLV captioner (stage 2): caption embeddings z -> frozen T -> psi -> prefix of a causal LLM -> text.

Paper Sec. 3.2 (arXiv 2507.07104), as ``docs/method.md`` "Stage 2" states it:

    c = T(inputs_embeds=z)                               (B, Nq, d_T)   frozen CLIP text encoder
    e = psi(c) = Linear(d_T, d_LM) - GELU - Linear(d_LM, d_LM)   (B, Nq, d_LM)  the LLM's prefix
    LLM input = [e ; embed(caption) ; embed(EOS)]        (B, Nq + L, d_LM)
    L = next-token cross-entropy on the caption tokens and the EOS only

Unlike the official code we append EOS and keep its label, and mask padding by the attention mask, never
by token id (Qwen's pad is its eos), so the LLM learns to stop and ``generate`` stops on EOS by itself.

Trainable levels (paper Table 4, right): ``mlp`` (psi), ``mlp+llm`` (psi and the LLM) and ``mlp+llm+encoder``
(also the stage-1 encoder's trainable parts, the paper's best and the official stage 2). T is always frozen,
and so are the encoder's queries and phi (the official code freezes ``query_embed`` and ``language_proj``).
With ``lora_rank`` > 0 the LLM levels train peft LoRA adapters on the LLM's projections instead of all of
its weights (the base LLM stays frozen): the way to fit stage 2 of a multi-billion-parameter LLM in less memory.

Checkpoints (``save_pretrained``) hold captioner.json (config and the resolved LM config) and the trained
weights only. The config names where the frozen parts come from (T from a Stable Diffusion dir, the encoder
from its stage-1 run), so ``from_pretrained(dir)`` needs no other argument; a frozen random-init LM, whose
weights could not be rebuilt otherwise, is saved with its tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlv.checks import read_json
from vlv.config import CaptionerConfig
from vlv.encoder import VLVEncoder
from vlv.lm import IGNORE, build_lm, is_lm_dir, load_tokenizer, pad_id, right_pad
from vlv.modeling import (
    atomic_save_file,
    check_materialized,
    empty_model,
    in_run_dir,
    load_weights_file,
    round_weights,
    trainable_state,
    write_json,
)
from vlv.shipped import resolve_decoder, resolve_stage2
from vlv.text_encoder import encode_embeds, load_text_encoder

FROZEN_ENCODER_PARTS = ("queries", "phi")  # frozen in stage 2 at every level
CONFIG_FILE, TRAINABLE_FILE, FROZEN_LM_FILE = "captioner.json", "captioner.safetensors", "lm-frozen.safetensors"
TOKENIZER_DIR, STAGE2_FILE = "tokenizer", "stage2.json"


def encoder_stage2_prefixes(encoder: VLVEncoder) -> list[str]:
    """The encoder parameters that train at level mlp+llm+encoder: its stage-1 set minus queries and phi."""
    trainable = encoder.config.trainable
    names = [n for n, _ in encoder.named_children()] if trainable == "all" else trainable
    prefixes = [p for p in names if not any(p == x or p.startswith(x + ".") for x in FROZEN_ENCODER_PARTS)]
    if not prefixes:
        raise ValueError(f"the encoder trains only {trainable}: nothing is left to train in stage 2")
    return prefixes


# ------------------------------------------------------------------------------------ post-processing
def official_postprocess(caption: str) -> str:
    """The official ``Caption_inference.process_caption`` (github Tiezheng11/Vision-Language-Vision @ 04bbfbb).

    Its model never learned EOS, so a caption runs to the length cap: unless it ends with '.', cut after its last
    '.' (if any); split into sentences after '.', '!' or '?' and the whitespace that follows; keep each sentence's
    first occurrence (exact match); join with one space.
    """
    if not caption.endswith("."):
        last = caption.rfind(".")
        if last != -1:
            caption = caption[: last + 1]
    unique: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", caption):
        if sentence and sentence not in unique:
            unique.append(sentence)
    return " ".join(unique)


POSTPROCESSORS = {"official": official_postprocess}  # CaptionerConfig.postprocess -> the rule


def postprocess(captions: list[str], rule: str | None) -> list[str]:
    """Captions after the named clean-up rule (``CaptionerConfig.postprocess``); None leaves them as they are."""
    if rule is None:
        return list(captions)
    if rule not in POSTPROCESSORS:
        raise ValueError(f"unknown postprocess {rule!r}; choose from {', '.join(POSTPROCESSORS)} or None")
    return [POSTPROCESSORS[rule](c) for c in captions]


# ----------------------------------------------------------------------------------------- captioner
class Captioner(nn.Module):
    """z (B, Nq, d_T), or images through the stage-1 encoder -> captions from a causal LM prefixed by psi(T(z)).

    The modules passed in are frozen or unfrozen here, in place, to match ``config.trainable``.
    """

    def __init__(self, config: CaptionerConfig, text_encoder: CLIPTextModel, encoder: VLVEncoder | None = None,
                 lm: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        if text_encoder.config.hidden_size != config.text_dim:
            raise ValueError(f"text encoder width {text_encoder.config.hidden_size} != text_dim {config.text_dim}")
        if encoder is not None and encoder.config.text_dim != config.text_dim:
            raise ValueError(f"encoder emits d_T = {encoder.config.text_dim}, the captioner expects {config.text_dim}")
        if config.trainable == "mlp+llm+encoder" and encoder is None:
            raise ValueError("level mlp+llm+encoder trains the stage-1 encoder: pass it")
        self.config = config
        self.text_encoder = text_encoder  # T
        if config.text_encoder_dtype is not None:  # T as the official checkpoint imported holds it
            round_weights([*text_encoder.parameters(), *text_encoder.buffers()], config.text_encoder_dtype)
        self.encoder = encoder
        self.lm = lm if lm is not None else build_lm(config.lm)
        if config.lora:  # in place: the LLM stays a transformers model (generate, configs) with LoRA layers inside
            self.lm = inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                         target_modules=list(config.lora_targets)), self.lm)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.lm)
        self.eos_token_id, self.pad_token_id = self.tokenizer.eos_token_id, pad_id(self.tokenizer)
        vocab = self.lm.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens, the LM's embedding only {vocab}")
        d_lm = self.lm.get_input_embeddings().embedding_dim  # d_LM
        self.psi = nn.Sequential(nn.Linear(config.text_dim, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))
        self._freeze()

    def trainable_prefixes(self) -> list[str]:
        """Parameter-name prefixes that train at the configured level (with LoRA, the LLM's adapters only)."""
        prefixes = ["psi"]
        if self.config.trainable in ("mlp+llm", "mlp+llm+encoder") and not self.config.lora:
            prefixes.append("lm")
        if self.config.trainable == "mlp+llm+encoder":
            prefixes += [f"encoder.{p}" for p in encoder_stage2_prefixes(self.encoder)]
        return prefixes

    def _trains(self, name: str, prefixes: list[str]) -> bool:
        if self.config.lora and name.startswith("lm.") and ".lora_" in name:
            return True
        return any(name == x or name.startswith(x + ".") for x in prefixes)

    def _freeze(self) -> None:
        """Declarative freezing: a parameter trains iff its name starts with a trainable prefix (or is LoRA's)."""
        prefixes = self.trainable_prefixes()
        for n, p in self.named_parameters():
            p.requires_grad_(self._trains(n, prefixes))

    @property
    def encoder_trains(self) -> bool:
        return self.encoder is not None and any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> Captioner:
        """Frozen parts stay in eval mode, so their dropout never perturbs z, c or the LLM's states."""
        super().train(mode)
        self.text_encoder.eval()
        if self.encoder is not None and not self.encoder_trains:
            self.encoder.eval()
        if not any(p.requires_grad for p in self.lm.parameters()):
            self.lm.eval()
        return self

    # ---------------------------------------------------------------------------------- z -> prefix
    def encode_text_embeds(self, z: torch.Tensor) -> torch.Tensor:
        """c = T(inputs_embeds=z) (B, L, d_T); stage 2 holds T only, not the UNet and VAE."""
        return encode_embeds(self.text_encoder, z)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S), as the encoder's ``transform`` makes them -> z (B, Nq, d_T)."""
        if self.encoder is None:
            raise ValueError("this captioner holds no encoder: pass z instead of pixel_values")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains):
            return self.encoder(pixel_values)  # (B, Nq, d_T)

    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Nq, d_T) -> e = psi(T(z)) (B, Nq, d_LM); no graph through frozen T unless z needs gradients."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and z.requires_grad):
            c = self.encode_text_embeds(z)  # (B, Nq, d_T)
        return self.psi(c)  # (B, Nq, d_LM)

    def _z(self, z: torch.Tensor | None, pixel_values: torch.Tensor | None) -> torch.Tensor:
        if (z is None) == (pixel_values is None):
            raise ValueError("pass exactly one of z, pixel_values and text_embeds")
        return z if z is not None else self.embed_images(pixel_values)

    def _prefix_of(self, z: torch.Tensor | None, pixel_values: torch.Tensor | None,
                   text_embeds: torch.Tensor | None) -> torch.Tensor:
        """e (B, Nq, d_LM) from exactly one of z, images, or c = T(z) itself (``text_embeds``: cached, so E and T
        do not run)."""
        if text_embeds is None:
            return self.prefix(self._z(z, pixel_values))
        if z is not None or pixel_values is not None:
            raise ValueError("pass exactly one of z, pixel_values and text_embeds")
        if torch.is_grad_enabled() and self.encoder_trains:
            raise ValueError("text_embeds skip the encoder, which trains at this level: pass pixel_values")
        return self.psi(text_embeds)  # (B, Nq, d_LM)

    # ------------------------------------------------------------------------------------------ loss
    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> caption + EOS ids (B, L), right-padded, and their attention mask (B, L).

        Truncated to ``max_new_tokens`` (what generate may emit); a caption cut there keeps no EOS.
        """
        n = self.config.max_new_tokens
        rows = [(ids + [self.eos_token_id])[:n] for ids in self.tokenizer(list(captions),
                                                                          add_special_tokens=False).input_ids]
        ids, mask = right_pad(rows, self.pad_token_id)  # (B, L) each
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, z: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        """The stage-2 loss of captions (``tokenize`` output) given z, images, or c = T(z) (``text_embeds``
        (B, Nq, d_T), a frozen encoder's cached output); ``.loss`` and ``.logits``.

        ``num_items_in_batch``: the loss is the token sum over it (transformers' convention, e.g. all ranks'
        caption tokens) instead of this batch's token mean.

        Logits are kept from the last prefix position on, (B, 1 + L, V): the Nq - 1 earlier prefix positions
        have no label, and at full scale their logits (Nq x 151936 per sample) would dominate memory.
        """
        e = self._prefix_of(z, pixel_values, text_embeds)  # (B, Nq, d_LM)
        b, nq = e.shape[:2]
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, L, d_LM)
        embeds = torch.cat([e, tokens.to(e.dtype)], dim=1)  # (B, Nq + L, d_LM)
        mask = torch.cat([attention_mask.new_ones(b, nq), attention_mask], dim=1)  # (B, Nq + L)
        # Position Nq - 1 predicts the first caption token; padding is ignored by the mask, not by id.
        labels = torch.cat([input_ids.new_full((b, 1), IGNORE), input_ids.masked_fill(attention_mask == 0, IGNORE)],
                           dim=1)  # (B, 1 + L)
        # use_cache=False: a loss needs no KV cache (and with gradient checkpointing transformers warns about it)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, logits_to_keep=labels.shape[1],
                       use_cache=False,
                       **({"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}))

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(self, z: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                     num_beams: int | None = None, max_new_tokens: int | None = None,
                     text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) of the new tokens only, through EOS; stock ``generate(inputs_embeds=e)``.

        Finished rows are filled after their EOS with pad_token_id by greedy search, with EOS by transformers 5's
        beam search; ``skip_special_tokens`` drops both.

        With only ``inputs_embeds`` given, transformers 5 starts ``input_ids`` empty, so the returned sequences
        hold no prompt positions. Decoding is deterministic (``do_sample=False``), whatever the LM's own
        generation config says. Beam search keeps transformers' default stopping rule, not the official
        ``early_stopping=True``: that one stops once ``num_beams`` hypotheses have ended, and a model that does
        emit EOS then returns a beam that skipped a word (it ended one step sooner) over the better one
        still running.
        """
        e = self._prefix_of(z, pixel_values, text_embeds)  # (B, Nq, d_LM)
        mask = torch.ones(e.shape[:2], dtype=torch.long, device=e.device)  # (B, Nq)
        return self.lm.generate(inputs_embeds=e, attention_mask=mask, do_sample=False,
                                num_beams=num_beams or self.config.num_beams,
                                max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)  # (B, T)

    def generate(self, z: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 num_beams: int | None = None, max_new_tokens: int | None = None,
                 postprocess_rule: str | None = None) -> list[str]:
        """Captions of z (B, Nq, d_T) or of images (pixel_values); generation stops on EOS, then the text goes
        through ``postprocess_rule`` ('none': nothing is trimmed; 'official': ``official_postprocess``), by default
        ``config.postprocess``. Every option left None is the run's own."""
        ids = self.generate_ids(z, pixel_values, num_beams=num_beams, max_new_tokens=max_new_tokens)  # (B, T)
        rule = self.config.postprocess if postprocess_rule is None else postprocess_rule
        return postprocess(self.tokenizer.batch_decode(ids, skip_special_tokens=True), None if rule == "none" else rule)

    # ------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, out: str | Path) -> Path:
        """captioner.json + the trained weights; a frozen random-init LM and its tokenizer too (they cannot be
        rebuilt otherwise)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_file(trainable_state(self), out / TRAINABLE_FILE)
        frozen_lm = trainable_state(self.lm, trainable=False)
        (out / FROZEN_LM_FILE).unlink(missing_ok=True)
        if frozen_lm and not is_lm_dir(self.config.lm):
            atomic_save_file(frozen_lm, out / FROZEN_LM_FILE)
        if not is_lm_dir(self.config.lm):
            self.tokenizer.save_pretrained(out / TOKENIZER_DIR)
        write_json(out / CONFIG_FILE, {"config": asdict(self.config), "lm": self.lm.config.to_dict()})  # last
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, text_encoder: CLIPTextModel | None = None,
                        encoder: VLVEncoder | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> Captioner:
        """Rebuild from ``save_pretrained`` output (or a shipped name, ``shapes-stage2``) in ``dtype`` on
        ``device``; keys must match exactly.

        T and the encoder are loaded from the sources the config names unless passed in (modules passed in are
        used as they are: their device and dtype are the caller's to match). Every weight is read
        once, straight into ``dtype``: an LLM that trained in full is built empty and gets its weights from the
        captioner file alone (its source dir gives only the tokenizer); a frozen one comes from its dir.
        """
        path = resolve_stage2(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no VLV captioner at {path} (no {CONFIG_FILE})")
        meta = read_json(path / CONFIG_FILE, keys=("config",))
        config = CaptionerConfig(**meta["config"])
        if config.text_encoder is None and (path / STAGE2_FILE).is_file():  # run dirs written before the config
            settings = read_json(path / STAGE2_FILE, keys=("settings",))["settings"]  # named its sources
            config.text_encoder, config.encoder = settings["decoder"], settings["encoder"]
        if text_encoder is None:
            if config.text_encoder is None:
                raise ValueError(f"{path}: its config names no text encoder: pass text_encoder")
            text_encoder = load_text_encoder(resolve_decoder(in_run_dir(path, config.text_encoder)), dtype=dtype,
                                             device=device)
        if encoder is None and config.encoder is not None:  # relative: inside the run
            encoder = VLVEncoder.from_pretrained(in_run_dir(path, config.encoder), dtype=dtype, device=device)
        lm_in_checkpoint = config.trainable != "mlp" and not config.lora  # trainable_prefixes holds "lm"
        if lm_in_checkpoint or not is_lm_dir(config.lm):
            lm = build_lm(meta["lm"], dtype=dtype, empty=True)  # the architecture it was saved with
        else:
            lm = build_lm(config.lm, dtype=dtype, device=device)
        tokenizer = (AutoTokenizer.from_pretrained(path / TOKENIZER_DIR, local_files_only=True)
                     if (path / TOKENIZER_DIR).is_dir() else load_tokenizer(config.lm))
        model = empty_model(lambda: cls(config, text_encoder, encoder, lm=lm, tokenizer=tokenizer), dtype)
        load_weights_file(model, path / TRAINABLE_FILE, dtype=dtype, device=device)
        if any(not p.requires_grad for p in model.lm.parameters()) and not is_lm_dir(config.lm):
            if not (path / FROZEN_LM_FILE).is_file():
                raise FileNotFoundError(f"{path} has no {FROZEN_LM_FILE} for its frozen random-init LM")
            load_weights_file(model.lm, path / FROZEN_LM_FILE, trainable=False, dtype=dtype, device=device)
        check_materialized(model, str(path))
        return model.to(device)  # the buffers; the weights are there already
