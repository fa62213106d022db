"""Pre-training a causal LM on caption text, as a training task: the shapes world's stand-in for a pretrained LLM.

No pretrained LLM speaks the shapes world, so vlv makes one: a tiny ``Qwen2ForCausalLM`` pre-trained as a plain
causal LM on the captions' text, ``[bos] caption [eos]``, and written with ``save_pretrained``. Stage 2 then
reads that dir exactly as it would read a hub checkpoint dir.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlv.checks import check_checkpoints, require_dirs
from vlv.data.records import read_captions
from vlv.data.sampling import step_indices
from vlv.lm import IGNORE, build_lm, check_lm_source, encode_documents, load_tokenizer, pad_id
from vlv.modeling import write_json
from vlv.progress import quiet_library
from vlv.training.config import LMSettings, TrainConfig
from vlv.training.draws import Draws
from vlv.training.loop import Loss, train, write_once
from vlv.training.resume import check_request

LM_FILE = "lm.json"


class LMTask:
    """Trainable: the whole LM. Loss: next-token cross-entropy on ``[bos] caption [eos]`` (padding ignored)."""

    name = "lm"
    unit = "tokens"  # what a loss's count counts: the trackers' throughput

    def __init__(self, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, captions: list[str],
                 val_captions: list[str] | None = None, seed: int = 0, eval_samples: int = 64,
                 judge: Callable[[list[str]], dict[str, float]] | None = None):
        if len(tokenizer) > lm.config.get_text_config().vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the LM's vocabulary only "
                             f"{lm.config.get_text_config().vocab_size}")
        self.lm, self.tokenizer, self.captions, self.val_captions = lm, tokenizer, captions, val_captions
        self.seed, self.eval_samples, self.judge = seed, eval_samples, judge

    def trainable(self) -> torch.nn.Module:
        return self.lm

    def export(self, out: Path) -> None:
        """An LM dir of the weights so far (``--export-every``), as the finished run writes it."""
        _save_lm(self.lm, self.tokenizer, out)

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        idx = step_indices(len(self.captions), self.seed, step, rank, world_size, batch_size)
        docs = encode_documents(self.tokenizer, [self.captions[i] for i in idx])
        return {k: v.to(device) for k, v in docs.items()}  # (B, L) each

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> Loss:
        """Next-token cross-entropy, a mean over the predicted tokens: the loop weighs every token of the global
        batch the same on any world size."""
        return Loss(model(**batch).loss, (batch["labels"][:, 1:] != IGNORE).sum())

    def evaluate(self, model) -> dict[str, float]:
        """Held-out token loss, and the judge's verdict on sampled texts when one is given."""
        if not self.val_captions:
            return {}
        device = next(model.parameters()).device
        total = count = 0.0
        for start in range(0, len(self.val_captions), 64):
            docs = {k: v.to(device) for k, v in encode_documents(self.tokenizer,
                                                                self.val_captions[start : start + 64]).items()}
            n = float((docs["labels"][:, 1:] != IGNORE).sum())  # tokens predicted
            total, count = total + model(**docs).loss.item() * n, count + n
        if self.judge is None:
            return {"val_loss": total / count}
        tok = self.tokenizer
        start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        prompt = torch.full((self.eval_samples, 1), start_id, dtype=torch.long, device=device)  # (S, 1)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=64,
                                 eos_token_id=tok.eos_token_id, pad_token_id=pad_id(tok))  # (S, 1 + T)
        samples = tok.batch_decode(out[:, 1:], skip_special_tokens=True)
        return {"val_loss": total / count, **self.judge(samples)}


@dataclass
class LMPlan:
    """An LM pre-training run whose inputs are all checked: what :func:`run_lm` trains."""

    settings: LMSettings
    train: TrainConfig
    out: Path
    captions: list[str]
    val_captions: list[str] | None
    tokenizer: PreTrainedTokenizerBase | None = None
    judge: Callable[[list[str]], dict[str, float]] | None = None
    recipe: dict | None = None


def prepare_lm(settings: LMSettings, cfg: TrainConfig, out: str | Path,
               tokenizer: PreTrainedTokenizerBase | None = None,
               judge: Callable[[list[str]], dict[str, float]] | None = None, recipe: dict | None = None) -> LMPlan:
    """Check every input of an LM run and read its captions, before the LM is built (nothing is created)."""
    out = Path(out)
    require_dirs(settings.data, settings.val)
    check_lm_source(settings.lm)
    captions = read_captions(settings.data)
    val = read_captions(settings.val, limit=settings.eval_n) if settings.val else None
    check_checkpoints(out)
    check_request(out, LM_FILE, {"settings": asdict(settings), "train": asdict(cfg)}, cfg)
    return LMPlan(settings, cfg, out, captions, val, tokenizer, judge, recipe)


def train_lm(settings: LMSettings, cfg: TrainConfig, out: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
             judge: Callable[[list[str]], dict[str, float]] | None = None,
             recipe: dict | None = None) -> PreTrainedModel | None:
    """Check (:func:`prepare_lm`), then pre-train (or resume) a causal LM on caption text; returns it, or None if
    stopped early (a re-run resumes).

    ``out`` ends up a standard checkpoint dir: ``AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)`` load it, and stage 2 takes it as its LM source.
    """
    return run_lm(prepare_lm(settings, cfg, out, tokenizer, judge, recipe))


def run_lm(plan: LMPlan) -> PreTrainedModel | None:
    """Pre-train (or resume) a prepared LM run; returns the LM, or None if stopped early."""
    settings, cfg, out = plan.settings, plan.train, plan.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # same random init on resume
    lm, tokenizer = build_lm(settings.lm), plan.tokenizer or load_tokenizer(settings.lm)
    write_json(out / LM_FILE, {"settings": asdict(settings), "train": asdict(cfg),
                               **({"recipe": plan.recipe} if plan.recipe else {})})
    task = LMTask(lm, tokenizer, plan.captions, plan.val_captions, seed=cfg.seed, judge=plan.judge)
    if not train(task, cfg, out).done:
        return None
    write_once(lm, lambda: _save_lm(lm, tokenizer, out))
    return lm


def _save_lm(lm: PreTrainedModel, tokenizer, out: Path) -> None:
    with quiet_library():
        lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
