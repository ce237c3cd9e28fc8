"""tools/oracle_study.py: layout of Tables 2-5 / Figure 4 for several models, class splits
always applied, Table 5's class selection by hand, deterministic in-domain subsets, bad input."""
import math
import os

import pytest
from script_utils import load_script
from detectron2.data import DatasetCatalog, MetadataCatalog

from openseg.data.datasets.common import deterministic_subset, register_lazy, register_subset
from openseg.modeling.oracles import PAPER_ROWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FCCLIP_DEMO = os.path.join(ROOT, "configs", "demo", "fcclip_tiny_convnext.yaml")
MAFTPLUS_DEMO = os.path.join(ROOT, "configs", "demo", "maftplus_pico_convnext.yaml")


def load_study():
    return load_script("tools/oracle_study.py")


def stats(name, tp, fn, fn_seg, fn_cls):
    return {"name": name, "TP": tp, "FN": fn, "FN_seg": fn_seg, "FN_cls": fn_cls}


def test_table5_keeps_low_recall_classes_with_the_largest_tp_drop():
    study = load_study()
    model = [stats("light", 0, 100, 95, 5), stats("wall", 50, 10, 5, 5),
             stats("painting", 3, 40, 30, 10), stats("pillow", 1, 30, 29, 1)]
    other = [stats(row["name"], 2, 99, 90, 9) for row in model]
    in_domain = [stats("light", 60, 40, 0, 0), stats("wall", 59, 1, 0, 0),
                 stats("painting", 40, 3, 0, 0), stats("pillow", 5, 26, 0, 0)]
    # recall: light 0, wall 0.83 (excluded), painting 0.07, pillow 0.03;
    # TP drop vs in-domain: light 60, painting 37, pillow 4
    rows = study.table5({"FC-CLIP": model, "MAFT+": other}, in_domain, top=2, recall_below=0.1)
    assert [row["class"] for row in rows] == ["light", "painting"]
    assert rows[0]["TP in-domain"] == 60
    assert (rows[1]["FC-CLIP FN_seg"], rows[1]["FC-CLIP FN_cls"], rows[1]["FC-CLIP TP"]) == (30, 10, 3)
    assert rows[1]["MAFT+ TP"] == 2
    # recall exactly 10 % is not below 10 %
    assert study.table5({"m": [stats("x", 1, 9, 9, 0)]}, None, 5, 0.1) == []


def test_tables_2_to_4_have_one_row_block_per_model():
    study = load_study()
    summaries = {}
    for _, switches in PAPER_ROWS.values():
        summaries[switches.name] = {"summary": {"PQ": len(switches.name), "PQ_seen": 1.0,
                                                "PQ_unseen": 2.0}, "per_class": []}
    tables = study.oracle_tables({"FC-CLIP": summaries, "MAFT+": summaries})
    assert [(r["model"], r["row"]) for r in tables[3]] == [
        ("FC-CLIP", 1), ("FC-CLIP", 2), ("FC-CLIP", 3), ("MAFT+", 1), ("MAFT+", 2), ("MAFT+", 3)]
    assert tables[3][2]["oracles"] == "mask_selection+drop_no_object"
    assert [(r["+ oracle seg."], r["+ oracle cls."]) for r in tables[4][:3]] == [
        ("-", "-"), ("✓", "-"), ("-", "✓")]
    assert tables[4][0]["PQ"] == tables[3][2]["PQ"]  # Table 4 row 1 repeats Table 3 row 3
    assert "| MAFT+" in study.markdown_table(tables[2])


def test_cli_takes_repeated_model_entries():
    study = load_study()
    args = study.parse_args(["--output", "o", "--model", "FC-CLIP", "a.yaml", "w.pth",
                             "--in-domain", "300", "c.yaml", "x.pth",
                             "--model", "MAFT+", "b.yaml", "--", "MODEL.DEVICE", "cpu"])
    assert args.model == [["FC-CLIP", "a.yaml", "w.pth"], ["MAFT+", "b.yaml"]]
    assert args.in_domain == [["300", "c.yaml", "x.pth"]] and args.opts == ["MODEL.DEVICE", "cpu"]
    with pytest.raises(SystemExit):
        study.parse_args(["--output", "o", "--model", "FC-CLIP"])
    with pytest.raises(ValueError, match="unknown"):
        study.vlm_keys(["ViT-B-16"])
    assert len(study.vlm_keys(["all", "clip-vit-b-16"])) == 12


def test_deterministic_subsets_are_nested_and_reproducible():
    records = [{"file_name": f"{i:03d}.png"} for i in range(50)]
    small = deterministic_subset(list(reversed(records)), 10)
    assert small == deterministic_subset(records, 10)
    assert {r["file_name"] for r in small} < {r["file_name"] for r in deterministic_subset(records, 30)}
    assert small != records[:10]
    with pytest.raises(ValueError, match="1 to 50"):
        deterministic_subset(records, 51)
    name = register_subset("openseg_demo_train", 16)
    assert len(DatasetCatalog.get(name)) == 16
    assert MetadataCatalog.get(name).stuff_classes == MetadataCatalog.get("openseg_demo_train").stuff_classes
    assert "openseg_ade20k_train_panoptic_subset300" in DatasetCatalog.list()


def without_splits(name, num_images):
    """A registered copy of the first demo-val images without class_splits (as ADE20K)."""
    metadata = {k: v for k, v in MetadataCatalog.get("openseg_demo_val").as_dict().items()
                if k not in ("name", "class_splits")}
    register_lazy(name, lambda: DatasetCatalog.get("openseg_demo_val")[:num_images], **metadata)
    return name


def training_set_without(name, missing):
    """Demo train with a vocabulary lacking the `missing` class names."""
    meta = MetadataCatalog.get("openseg_demo_train")
    keep = [i for i, c in enumerate(meta.stuff_classes) if c not in missing]
    register_lazy(name, lambda: [], stuff_classes=[meta.stuff_classes[i] for i in keep],
                  thing_classes=[meta.stuff_classes[i] for i in keep[:3]],
                  thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2},
                  stuff_dataset_id_to_contiguous_id={i + 1: i for i in range(len(keep))})
    return name


def test_study_on_two_models_has_no_nan_split_columns(tmp_path):
    """FC-CLIP and MAFT+ side by side (one row block each, issue 17) on a test set without
    built-in splits: the split against the training vocabulary is applied, so no split column
    is NaN."""
    study = load_study()
    dataset = without_splits("openseg_test_demo_val_no_splits", 1)  # "sand" is in it
    train = training_set_without("openseg_test_demo_train_no_cross_sand", {"cross", "sand"})
    result = study.main([
        "--output", str(tmp_path), "--model", "FC-CLIP", FCCLIP_DEMO, "--model", "MAFT+", MAFTPLUS_DEMO,
        "--", "DATASETS.TEST", f"('{dataset}',)", "DATASETS.TRAIN", f"('{train}',)",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    ])
    assert MetadataCatalog.get(dataset).class_splits["unseen"] == [3, 7]  # "cross", "sand"
    for table in ("table2", "table3", "table4"):
        half = len(result[table]) // 2
        assert [row["model"] for row in result[table]] == ["FC-CLIP"] * half + ["MAFT+"] * half
        for row in result[table]:
            assert not any(math.isnan(row[c]) for c in ("PQ", "PQ_seen", "PQ_unseen"))
    for name in ("study.md", "study.json", "oracles.png", "figure4.png"):
        assert (tmp_path / name).stat().st_size > 200
    assert "## Table 5" in (tmp_path / "study.md").read_text()


def test_figure4_plot(tmp_path):
    study = load_study()
    rows = [{"images": 100, "PQ ensemble": 20.0, "PQ no ensemble": 15.0},
            {"images": 300, "PQ ensemble": 30.0, "PQ no ensemble": 26.0}]
    study.figure4(rows, {"FC-CLIP": 26.8, "MAFT+": 26.9}, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_study_names_a_test_set_without_ground_truth(tmp_path):
    study = load_study()
    records = [{k: v for k, v in r.items() if k not in ("pan_seg_file_name", "segments_info")}
               for r in DatasetCatalog.get("openseg_demo_val")[:2]]
    metadata = {k: v for k, v in MetadataCatalog.get("openseg_demo_val").as_dict().items() if k != "name"}
    register_lazy("openseg_test_no_gt", lambda: records, **metadata)
    with pytest.raises(ValueError, match="openseg_test_no_gt.*no panoptic ground truth"):
        study.main(["--output", str(tmp_path), "--model", "A", FCCLIP_DEMO,
                    "--", "DATASETS.TEST", "('openseg_test_no_gt',)"])
    with pytest.raises(FileNotFoundError, match="siglip2-vit-b-16-256"):
        study.main(["--output", str(tmp_path), "--vlm", "siglip2-vit-b-16-256",
                    "--vlm-root", str(tmp_path), "--", "DATASETS.TEST", "('openseg_demo_val',)"])
