"""Run under torchrun by tests/cli/test_outputs.py: caption, embed and reconstruct one folder, each process its
share; records how many images this process captioned."""

import json
import sys
from pathlib import Path

import vlv.inference
from vlv.data.outputs import process_state
from vlv.inference import caption_files, embed_files, reconstruct_files

scenes, out = Path(sys.argv[1]), Path(sys.argv[2])
state = process_state()
captioned = []
real = vlv.inference.caption_images


def counting(captioner, images, **kwargs):
    captioned.append(len(images))
    return real(captioner, images, **kwargs)


vlv.inference.caption_images = counting
caption_files([scenes], out / "c.jsonl", batch_size=2)
embed_files([scenes], out / "z.st", "shapes-stage1", batch_size=2)
reconstruct_files([scenes], out / "rec", "shapes-stage1", "shapes-teacher", batch_size=2, steps=1)
(out / f"rank{state.process_index}.json").write_text(json.dumps({"world": state.num_processes,
                                                                  "captioned": sum(captioned)}))
