"""``python -m benchmarks model``: the end-to-end benchmark's records, on CPU at interpreter-sized shapes."""
import json

from benchmarks import model


def test_quick_workloads_cover_training_prefill_and_decoding():
    kinds = {w.kind for w in model.workloads("cpu", quick=True)}
    caches = {w.cache for w in model.workloads("cpu", quick=True) if w.kind == "decode"}
    assert kinds == {"train", "prefill", "decode"} and caches == {"dynamic", "static"}
    gpu = model.workloads("cuda", quick=False)
    assert {w.shape.batch for w in gpu if w.kind == "decode"} == {1, 16}
    assert {w.shape.length for w in gpu if w.kind == "decode"} >= {1024, 16384}


def test_model_writes_a_record_per_provider_and_mode(tmp_path):
    assert model.main(["--quick", "--out", str(tmp_path), "--only", "gpt2-small", "prefill",
                       "decode b1 ctx16 dynamic"]) == 0
    recs = json.loads((tmp_path / "model.json").read_text())["records"]
    assert {r["workload"] for r in recs} == {"gpt2-small train", "llama prefill (padded)",
                                             "llama decode b1 ctx16 dynamic"}
    for r in recs:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["counted_bytes"] > 0
        assert r["mode"] in ("eager", "compile") and "peak_bytes" in r and r["device"]
        assert "interpreter" in r["timing"]  # a CPU figure says what it is
    ours = {r["workload"] for r in recs if "triton" in r["provider"]}
    torch_side = {r["workload"] for r in recs if any(w in r["provider"] for w in ("sdpa", "torch", "eager"))}
    assert ours == torch_side == {r["workload"] for r in recs}
    assert (tmp_path / "model.csv").exists()
    assert len(list(tmp_path.glob("model_*.png"))) == 3
