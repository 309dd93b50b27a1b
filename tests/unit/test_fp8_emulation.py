"""The FP8 emulation of benchmarks.fp8_emulation rounds as e4m3 with the scales it names."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import fp8_emulation as emu


def test_values_already_in_range_round_as_torchs_e4m3() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 256) * 100
    x[0, 0] = 448.0  # amax is e4m3's largest value: the scale is 1
    got = emu.round_e4m3(x, torch.tensor(448.0))
    assert torch.equal(got, x.to(torch.float8_e4m3fn).float())


def test_a_block_scale_keeps_an_outliers_neighbours_precise() -> None:
    torch.manual_seed(0)
    row = torch.randn(1, 256) * 1e-3
    row[0, 0] = 1000.0  # one outlier channel in the first 128
    by_row = emu.round_activations(row, "row")[0, 128:]
    by_block = emu.round_activations(row, "block128")[0, 128:]
    # a per-row scale sizes the second block by the outlier: its small values underflow
    assert (by_row == 0).float().mean() > 0.5
    assert (by_row - row[0, 128:]).abs().max() > 10 * (by_block - row[0, 128:]).abs().max()
    block_error = (by_block - row[0, 128:]).abs().max()
    assert block_error <= 2**-4 * row[0, 128:].abs().max()


def test_weight_tiles_have_scales_of_their_own() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    w[:128, :128] *= 1e6  # one loud tile, past e4m3's range from the others
    tile = emu.round_weight(w, "block128")
    assert tile.shape == w.shape
    quiet = (tile - w)[128:, 128:].abs().max()
    assert quiet <= 2**-4 * w[128:, 128:].abs().max()
    # one scale for the tensor flushes the quiet tiles to zero
    assert (emu.round_weight(w, "tensor") - w)[128:, 128:].abs().max() > 10 * quiet
    with pytest.raises(ValueError, match="multiples of 128"):
        emu.round_weight(torch.randn(100, 128), "block128")


def test_variant_names_parse_or_fail_early() -> None:
    assert emu.parse_variant("row") == ("row", 0, 0)
    assert emu.parse_variant("block128-bf16-ends4") == ("block128", 4, 4)
    assert emu.parse_variant("row-bf16-first2") == ("row", 2, 0)
    assert emu.parse_variant("tensor-bf16-last3") == ("tensor", 0, 3)
    with pytest.raises(SystemExit, match="unknown granularity"):
        emu.parse_variant("block64")
    with pytest.raises(SystemExit, match="firstN"):
        emu.parse_variant("row-bf16-middle2")


def test_a_cpu_run_reports_every_variant_against_fp32(capsys: pytest.CaptureFixture[str]) -> None:
    # the tiny config is 64 channels wide: no block variant
    emu.main(
        [
            "--config",
            "tiny",
            "--pairs",
            "16",
            "--variants",
            "row,tensor,row-bf16-ends1,row-bf16-last1",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scored = {line["variant"]: line for line in lines if line.get("vs") == "card_fp32"}
    assert set(scored) == {"card_bfloat16", "row", "tensor", "row-bf16-ends1", "row-bf16-last1"}
    assert scored["row"]["mean_abs_score_diff"] > 0  # rounding both layers changes scores
    # with one layer at each end left unrounded, the tiny model's 2 layers are untouched
    assert scored["row-bf16-ends1"]["max_abs_score_diff"] == 0
    assert scored["row-bf16-last1"]["mean_abs_score_diff"] > 0  # the first layer is rounded
