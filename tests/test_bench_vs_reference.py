"""Pure helpers of benchmarks/bench_vs_reference.py (the benchmark itself needs the released
code and runs by hand; these are the parts whose mistakes would silently skew its ratios)."""

import pytest
from script_utils import load_script

bench = load_script("benchmarks/bench_vs_reference.py")


def test_ratio_is_median_of_pairs_not_ratio_of_medians():
    # pairs 1/4, 4/2, 9/3 -> 0.25, 2, 3: median 2 (the ratio of medians would be 4/3)
    assert bench.paired_median_ratio([1.0, 4.0, 9.0], [4.0, 2.0, 3.0]) == 2.0
    with pytest.raises(ValueError):
        bench.paired_median_ratio([1.0, 2.0], [1.0])


def test_peak_counts_only_the_window_above_its_starting_level():
    events = [(4, 200), (1, 100), (6, 30), (3, -120), (2, 50), (5, -200)]  # any order
    # level 150 before t=3; inside [3, 5]: 30, 230, 30 -> 80 above; t=6 is after the window
    assert bench.peak_within(events, start=3, end=5) == 80
    assert bench.peak_within(events, start=1, end=2) == 150  # window opens at level 0
    assert bench.peak_within([(1, 100), (2, -40), (3, -50)], start=2, end=3) == 0


def test_check_lists_only_ratios_above_limit():
    ratios = {"train@384px/1t": 1.0, "inference@384px/1t": 1.01, "train_memory@384px/1t": 0.5}
    assert bench.ratios_over_limit(ratios, 1.0) == ["inference@384px/1t=1.010"]


def test_arguments():
    args = bench.parse_args(
        ["--reference-root", "x", "--device", "cpu", "--threads", "2,1", "--quick"]
    )
    assert (args.sizes, args.threads, args.batch, args.amp) == ([256], [2], 1, False)
    for bad in (["--sizes", "300"], ["--amp"], ["--tasks", "semantic"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--reference-root", "x", "--device", "cpu", *bad])
