"""Can the shapes encoder's parts learn the scene at all? Supervised probes of the tiny Florence-2 (diagnostic).

    python benchmarks/probes/encoder.py flat --train runs/ship/data/train --val runs/ship/data/val
    python benchmarks/probes/encoder.py bart --lr 1e-3 --init-std 0.3 --train DIR --val DIR

Stage 1 and stage 2 both failed, at first, to learn anything from the shapes images with the ``shapes`` encoder
(see the stage-1 issue note). This probe trains the encoder's parts with the most direct supervision there is:
per quadrant, a 37-way label (empty, or shape x colour x size), cross-entropy, AdamW, batch 32, linear warmup
over 100 steps, and prints held-out quadrant and scene accuracy every 100 steps.

- ``flat``: DaViT + projector, a linear head on all visual tokens (what the vision features hold);
- ``pool``: the same head on their mean (position survives only through the features);
- ``encoder``: DaViT + projector + the BART encoder, the linear head on all its output tokens;
- ``bart``: the whole encoder path to the queries (BART encoder over [visual tokens; prompt], BART decoder
  over the Nq queries with cross-attention), the head on the mean of the first 4 query outputs.
``--init-std`` overrides the ``init_std`` of vlv/configs/florence2-shapes.json (BART's); the start prints how
much the query outputs h differ between two random images, relative to their norm.

The encoder is the one a shapes-stage1 run starts from (its named config and the recipe's init settings); the
states the heads read are taken from ``VLVEncoder.forward`` itself on its way (forward hooks), not recomputed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlv.config import read_config
from vlv.data.datasets import InMemory
from vlv.data.records import read_records
from vlv.encoder import VLVEncoder
from vlv.shapes import world as shapes
from vlv.training.config import Stage1Settings
from vlv.training.recipes import load_recipe, section
from vlv.training.stage1 import encoder_config

NCLS = 1 + len(shapes.SHAPES) * len(shapes.COLORS) * len(shapes.SIZES)


def labels(folder: Path) -> torch.Tensor:
    """(N, 4): per quadrant in reading order, 0 = empty, else 1 + (shape, colour, size) index."""
    positions, colors, sizes = list(shapes.POSITIONS), list(shapes.COLORS), list(shapes.SIZES)
    out = []
    for r in read_records(folder):
        lab = [0, 0, 0, 0]
        for o in r.scene["objects"]:
            cls = (list(shapes.SHAPES).index(o["shape"]) * len(colors) + colors.index(o["color"])) * len(sizes)
            lab[positions.index(o["position"])] = 1 + cls + sizes.index(o["size"])
        out.append(lab)
    return torch.tensor(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["flat", "pool", "encoder", "bart"])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-std", type=float, default=None, help="BART init_std (default: the Florence config's)")
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args(argv)

    settings = section(load_recipe("shapes", "stage1"), "settings", Stage1Settings, decoder="", data="")
    config = encoder_config(settings, text_dim=128)
    florence = read_config(config.florence2)
    if args.init_std is not None:
        florence["text_config"]["init_std"] = args.init_std
    torch.manual_seed(0)
    enc = VLVEncoder(replace(config, florence2=florence))
    model, lm = enc.florence.model, enc.florence.model.language_model

    def states(x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder's forward on images x: the BART encoder's output states (B, 1+HW+P, D) and the query
        outputs h (B, Nq, D), phi's input, read on the way."""
        seen: dict[str, torch.Tensor] = {}
        hooks = [lm.encoder.register_forward_hook(lambda m, a, o: seen.__setitem__("encoder", o.last_hidden_state)),
                 enc.phi.register_forward_hook(lambda m, a, o: seen.__setitem__("queries", a[0]))]
        try:
            enc(enc.transform.pixels(x))
        finally:
            for h in hooks:
                h.remove()
        return seen

    def encoder_states(x: torch.Tensor) -> torch.Tensor:
        return states(x)["encoder"]

    def query_outputs(x: torch.Tensor) -> torch.Tensor:
        return states(x)["queries"]

    with torch.no_grad():
        h = query_outputs(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    print(f"{args.mode}: BART init_std {lm.config.init_std}; query outputs of two images differ by "
          f"{((h[0] - h[1]).norm() / h.norm()).item():.4f} of their norm", flush=True)

    d = model.config.text_config.d_model
    with torch.no_grad():
        probe = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
        n_tokens = (encoder_states(probe) if args.mode == "encoder" else
                    enc.image_features(enc.transform.pixels(probe))).shape[1]
    head = torch.nn.Linear(d * n_tokens if args.mode in ("flat", "encoder") else d, 4 * NCLS)
    params = [*model.vision_tower.parameters(), *model.multi_modal_projector.parameters(), *head.parameters()]
    if args.mode in ("bart", "encoder"):
        params = [*enc.parameters(), *head.parameters()]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if args.mode == "bart":
            return head(query_outputs(x)[:, :4].mean(1))
        if args.mode == "encoder":
            return head(encoder_states(x).flatten(1))
        v = enc.image_features(enc.transform.pixels(x))  # (B, 1+HW, D)
        return head(v.flatten(1) if args.mode == "flat" else v.mean(1))

    data, val = InMemory.of(args.train, 64, progress=False), InMemory.of(args.val, 64, limit=256)
    y, yv = labels(args.train), labels(args.val)[: len(val)]
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = np.random.default_rng(step).integers(len(data), size=32)
        loss = F.cross_entropy(forward(data.images[idx]).view(-1, NCLS), y[idx].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 100 == 0:
            with torch.no_grad():
                pred = forward(val.images).view(-1, 4, NCLS).argmax(-1)
            print(f"{args.mode} step {step} loss {loss.item():.3f} quadrant acc {(pred == yv).float().mean():.3f} "
                  f"scene acc {(pred == yv).all(1).float().mean():.3f} {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
