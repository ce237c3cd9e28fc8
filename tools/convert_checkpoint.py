#!/usr/bin/env python
"""Convert checkpoints between a released layout and openseg's parameter names, offline.

    # a Mask2Former model-zoo file (layout detected) -> openseg names
    python tools/convert_checkpoint.py model_final_94dc52.pkl m2f_r50_coco_panoptic.pth
    # an openseg checkpoint -> Mask2Former's layout (loads in the release's train_net.py)
    python tools/convert_checkpoint.py model_final.pth model_final_m2f.pkl --to mask2former
    # FC-CLIP's released fcclip_cocopan.pth <-> openseg names
    python tools/convert_checkpoint.py fcclip_cocopan.pth fcclip_cocopan_openseg.pth
    python tools/convert_checkpoint.py model_final.pth fcclip_release.pth --to fcclip
    # MAFT+'s released maftp_l.pth <-> openseg names
    python tools/convert_checkpoint.py maftp_l.pth maftp_l_openseg.pth

The input's layout is detected as for MODEL.WEIGHTS (`openseg.checkpoint`; `--from` forces
one). The output is a model-zoo style pickle (numpy arrays under "model") when it ends in
`.pkl`, else a torch file ``{"model": state_dict}``. MODEL.WEIGHTS reads released files
directly, so converting is only needed to inspect weights, to publish openseg-trained weights
in a release's layout, or to skip the conversion at every start.
"""
import argparse
import pickle
import sys
from typing import Dict, List, Optional

import torch

from openseg.checkpoint import (
    CHECKPOINT_FORMATS,
    convert_from_openseg,
    convert_to_openseg,
    read_checkpoint_file,
)
from openseg.config import import_projects

import_projects()  # methods register their released layouts (e.g. "fcclip")


def write_checkpoint(state: Dict[str, torch.Tensor], path: str, author: str) -> None:
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.cpu().numpy() for k, v in state.items()},
                         "__author__": author}, f)
    else:
        torch.save({"model": state, "__author__": author}, path)


def convert(source: str, target: str, to: str = "openseg", from_format: Optional[str] = None) -> str:
    """Convert `source` into `target` in the layout `to`; returns the layout read."""
    checkpoint = read_checkpoint_file(source)
    state, read_as = convert_to_openseg(checkpoint["model"], source, from_format)
    if to != "openseg":
        state = convert_from_openseg(state, to)
    write_checkpoint(state, target, f"openseg convert_checkpoint.py ({read_as.name} -> {to})")
    print(f"{source}: read as {read_as.name!r}, {len(checkpoint['model'])} tensors -> "
          f"{target}: {to!r}, {len(state)} tensors")
    return read_as.name


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="checkpoint file (.pkl, .pth, ...)")
    parser.add_argument("output", help="output file; .pkl = model-zoo pickle, else torch.save")
    parser.add_argument("--to", default="openseg",
                        help="output layout: openseg, or one offering the reverse conversion "
                             f"({sorted(n for n, f in CHECKPOINT_FORMATS.items() if f.from_openseg)})")
    parser.add_argument("--from", dest="from_format", default=None,
                        help=f"input layout instead of detecting it ({sorted(CHECKPOINT_FORMATS)})")
    args = parser.parse_args(argv)
    convert(args.input, args.output, args.to, args.from_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
