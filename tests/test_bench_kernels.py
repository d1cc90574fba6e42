"""`megatron-lc bench kernels --smoke`: every op and implementation runs forward and backward, and the table,
JSON and plot are written (CI's smoke run; real numbers come from a GPU into docs/benchmarks.md)."""
import json

from megatron_lc.cli import main
from megatron_lc.ops import dispatch


def test_bench_kernels_smoke(tmp_path, capsys):
    assert main(["bench", "kernels", "--smoke", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "kernels.json"))["rows"]
    assert {r["op"] for r in rows} == set(dispatch.OPS)
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all("pct_copy_bw" in r for r in rows if r["op"] in ("rmsnorm", "swiglu", "rope"))
    assert all("fwd_bwd_TFLOPs" in r for r in rows if r["op"] in ("linear_cross_entropy", "attention"))
    assert "| op | shape | impl |" in (tmp_path / "kernels.md").read_text()
    printed = capsys.readouterr().out
    if any(sum(r["op"] == op for r in rows) > 1 for op in dispatch.OPS):  # something to compare: a chart
        assert (tmp_path / "kernels.png").stat().st_size > 0
    else:  # one bar per panel (CPU without the Triton interpreter): no chart, and the output says so
        assert not (tmp_path / "kernels.png").exists() and "no kernels.png: every op has one bar" in printed
    assert f"[bench kernels] wrote under {tmp_path}: kernels.json, kernels.md" in printed
