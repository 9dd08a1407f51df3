"""``python -m benchmarks varlen`` and ``hf-masks`` at tiny sizes, asserted on the JSON they write."""
import json

import pytest

from benchmarks.__main__ import main


def test_varlen_counts_less_than_padded_and_exactly_its_tiles(tmp_path, capsys):
    """Forward only, lengths 16, 16, 144 (the sm_90 fp16 forward tile is 128 x 64, so the padded kernel runs two
    query blocks for each short row where varlen runs one): varlen's counted FLOPs are below the padded kernel's,
    both equal the FLOPs of the tiles their query blocks visit, and those lie above the ideal sum L(L+1)/2 by
    less than one tile row and column per query block (tile quantisation)."""
    assert main(["varlen", "--lengths", "16", "16", "144", "--heads", "1", "--head-dim", "32", "--modes", "fwd",
                 "--time-budget", "0", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "varlen.json").read_text())
    recs = {r["provider"]: r for r in doc["records"]}
    assert set(recs) == {"baseline", "padded", "varlen"} and all(r["status"] == "ok" for r in recs.values())
    assert doc["device"]["name"] in capsys.readouterr().out
    varlen, padded = recs["varlen"]["counted"]["flops"], recs["padded"]["counted"]["flops"]
    assert varlen < padded
    assert varlen == recs["varlen"]["tile_model_flops"] and padded == recs["padded"]["tile_model_flops"]
    ideal, d = recs["varlen"]["ideal_flops"], 32
    block_m, block_n = 128, 64
    slack = sum(4 * d * block_m * (n + block_n) for n in recs["varlen"]["lengths"])  # < one tile per query block
    assert ideal < varlen < ideal + slack
    assert recs["varlen"]["counted"]["tiles"].endswith(f"fwd {block_m}x{block_n}")
    assert (tmp_path / "varlen.csv").exists() and (tmp_path / "varlen_attention_fwd.png").exists()


def test_hf_masks_transformers_mask_grows_quadratically_ours_linearly(tmp_path):
    """A one-layer tiny Llama at S = 16 and 64: transformers' mask construction allocates a (B, 1, S, S) tensor
    (bytes x16 for S x4) and hands it to every layer; ours allocates nothing S x S, hands a (B, S) padding mask,
    and the bytes outside attention differ by exactly the mask construction."""
    pytest.importorskip("transformers")
    assert main(["hf-masks", "--seq-lens", "16", "64", "--layers", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "hf_masks.json").read_text())
    recs = {(r["path"], r["seq_len"]): r for r in doc["records"]}
    for n in (16, 64):
        sdpa, kernel = recs["sdpa", n], recs["kernel", n]
        assert sdpa["mask_build"]["largest_tensor_shape"] == [2, 1, n, n]
        assert kernel["mask_build"]["largest_tensor_bytes"] < n * n
        assert kernel["mask_handed_per_layer"] == [{"type": "KernelMask", "shape": [2, n], "bytes": 2 * n}]
        assert sdpa["mask_handed_per_layer"][0]["shape"] == [2, 1, n, n]
        assert (sdpa["outside_attention_bytes"] - kernel["outside_attention_bytes"]
                == sdpa["mask_build"]["bytes"] - kernel["mask_build"]["bytes"] > 0)
    slopes = {fit["path"]: fit["slopes"] for fit in doc["fits"]}
    assert slopes["sdpa"]["largest_mask_tensor_bytes"] == pytest.approx(2.0)
    assert slopes["kernel"]["mask_build_bytes"] < 1.2 < 1.6 < slopes["sdpa"]["mask_build_bytes"]
