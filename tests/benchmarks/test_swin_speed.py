"""perf/gpu/swin_speed.py's summary, read from a real GPU run's files (perf/results/h200-precisions: the
timm-attention FP16 engine and its kernel mix on an H200); the steps themselves need a GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

from perf.gpu.swin_speed import TARGETS, markdown, steps, summarize

RESULTS = Path(__file__).resolve().parents[2] / "perf" / "results" / "h200-precisions"


def test_the_summary_reads_a_runs_files_and_says_what_is_missing(tmp_path):
    shutil.copy(RESULTS / "precisions.json", tmp_path / "engines.json")
    shutil.copy(RESULTS / "mix-fp16.json", tmp_path / "mix-fp16-timm.json")
    summary = summarize(tmp_path)
    assert summary["gpu"] == "NVIDIA H200" and summary["targets"] == TARGETS
    timm = summary["engines"]["fp16 timm"]
    assert round(next(t for t in timm["timings"] if t["batch_size"] == 128)["throughput_img_per_s"]) == 12266
    # No fused engine in that run: every target is unmeasured, not met or missed.
    assert set(summary["figures"].values()) == {None} and set(summary["met"].values()) == {None}
    text = markdown(summary)
    assert "| fp16 timm | measured | 0.6025 | 10,721 | 12,266 |" in text
    assert "| fp16 timm | 18.87 |" in text and "| fused_fp16_img_per_s | - | >= 18000 | - |" in text


def test_the_steps_are_the_engines_the_mix_and_the_variants(tmp_path):
    planned = steps(tmp_path, "python3")
    assert list(planned) == ["engines", "mix", "variants", "tuned"]
    assert planned["tuned"][0][-1].split(",") == ["fused+autotune", "fused+fp8+autotune"]
    assert "fused+fp8" in planned["variants"][0][-1].split(",")
    assert [c[1].rsplit("/", 1)[1] for c in planned["mix"]] == ["kernel_mix.py"] * 4
    assert "fp16,fp8-static" in planned["engines"][0] and "both" in planned["engines"][0]


def test_a_target_missed_is_said_so(tmp_path):
    """The H200's FP16 engine read as if it were the fused one: every figure it gives is measured and missed."""
    import json

    engines = json.loads((RESULTS / "precisions.json").read_text())
    fp16 = next(c for c in engines["candidates"] if c["precision"] == "fp16")
    engines["candidates"] = [dict(fp16, attention="fused")]
    (tmp_path / "engines.json").write_text(json.dumps(engines))
    shutil.copy(RESULTS / "mix-fp16.json", tmp_path / "mix-fp16-fused.json")
    summary = summarize(tmp_path)
    assert summary["figures"]["fused_fp16_memory_bound_share"] == 0.593
    assert summary["met"] == {"fused_fp16_img_per_s": False, "fused_fp16_memory_bound_share": False,
                              "fused_fp16_b1_ms": False, "fused_8bit_speedup": None}
    assert "| fused_fp16_img_per_s | 12,266 | >= 18000 | **no** |" in markdown(summary)


def test_the_variants_table_takes_the_tuned_steps_rows_after_the_variants(tmp_path):
    """fused_swin.py's rows (its output format: a parity row, then a row per batch, or an error) from both steps."""
    import json

    def rows(name, speed):
        return [{"engine": name, "max_abs": 0.01, "min_cosine": 0.9999, "top1_agreement": 1.0},
                {"engine": name, "batch": 128, "ms": 128_000 / speed, "img_per_s": speed}]

    (tmp_path / "variants.json").write_text(json.dumps({"rows": rows("fused", 15_000.0)}))
    (tmp_path / "tuned.json").write_text(json.dumps({"rows": rows("fused+autotune", 16_000.0) + [
        {"engine": "fused+fp8+autotune", "error": "InductorError: no template"}]}))
    text = markdown(summarize(tmp_path))
    table = text[text.index("| variant |"):].splitlines()
    assert table[2:] == ["| fused | 15,000 | 0.01 | 0.9999 |  |", "| fused+autotune | 16,000 | 0.01 | 0.9999 |  |",
                         "| fused+fp8+autotune | - | - | - | InductorError: no template |"]


def test_the_kernel_mix_tells_the_attention_kernel_from_inductors_kernels_that_feed_it():
    """Inductor names a kernel after the ops it fuses, the fused attention op among them where the kernel feeds it
    (the CPU's code for a fused Swin: `cpp_fused_index_permute_select_unsqueeze_view_window_attention_2`); only the
    project's own Triton kernel is the attention's time."""
    from perf.gpu.kernel_mix import kind

    assert kind("_window_attention") == "window attention (one Triton kernel)"
    assert kind("triton_poi_fused_index_permute_view_window_attention_2") == "fused elementwise/reduction (Triton)"
    assert kind("triton_red_fused_abs_amax_clamp_mul_1") == "activation quantization (Triton)"
    assert kind("nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "matmul"
