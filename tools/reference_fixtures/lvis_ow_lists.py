"""The class lists the SegPrompt release builds LVIS-OW from (`mask2former/data/lvis_info/`).

`lvis_categories_tr_part50.py` names the 64 most frequent LVIS classes added to COCO's (LVIS_CLASS)
and the LVIS ids of COCO's classes (COCO_ID_SET, 'hot dog' left out); `lvis_categories_r.py`
lists the rare classes whose training images move to the test set (LVIS_CATEGORIES_R). The
release's tools/resplit_lvis.py moves every LVIS-train image holding an annotation of one of
them, so these lists fix the image split. Written as LVIS category ids to `lists.json`, which
tests compare with openseg's shipped `openseg/data/lvis_ow_classes.json`.
"""

import importlib
import json
import sys
from pathlib import Path


def generate(reference_root: Path, out_dir: Path) -> None:
    data_dir = reference_root / "aim-uofa__SegPrompt" / "mask2former" / "data"
    sys.path.insert(0, str(data_dir))
    part50 = importlib.import_module("lvis_info.lvis_categories_tr_part50")
    rare = importlib.import_module("lvis_info.lvis_categories_r")
    lists = {
        "frequent_64": sorted(part50.NAME2ID[name] for name in part50.LVIS_CLASS),
        "coco": sorted(part50.COCO_ID_SET),
        "known": sorted(part50.IN_VOC_ID_SET),
        "unseen": sorted(rare.ID_R_SET),
    }
    with open(out_dir / "lists.json", "w") as f:
        json.dump(lists, f)
