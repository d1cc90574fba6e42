"""megatron_lc.model.flops (the FLOP count) and megatron_lc.train.metrics (peak table, MFU, throughput, memory,
JSONL/TensorBoard logs, progress)."""
import io
import json

import pytest
import torch
from torch import nn

from megatron_lc.model import Transformer, flops
from megatron_lc.model.config import ModelConfig, preset_config
from megatron_lc.train import metrics as M


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


# ---- FLOPs -------------------------------------------------------------------------------------------------------
def test_flops_tiny_config_term_by_term():
    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=True)  # head_dim None -> 8 // 4 = 2
    S = 5
    q = 2 * 8 * 8      # hidden 8 -> 4 heads x 2
    k = 2 * 8 * 4      # hidden 8 -> 2 kv heads x 2
    v = 2 * 8 * 4
    o = 2 * 8 * 8
    mlp = 3 * 2 * 8 * 12
    scores = 2 * 4 * 2 * 3  # 4 heads x head_dim 2 x (S + 1) / 2 = 3 keys on average
    values = 2 * 4 * 2 * 3
    lm_head = 2 * 8 * 10    # tied, still a matmul
    forward = 2 * (q + k + v + o + mlp + scores + values) + lm_head
    assert forward == 2 * (128 + 64 + 64 + 128 + 576 + 48 + 48) + 160 == 2272
    assert flops.train_flops_per_token(cfg, S) == 3 * forward
    full = 2 * (q + k + v + o + mlp + 2 * 2 * 4 * 2 * S) + lm_head  # every query sees all 5 keys
    assert flops.train_flops_per_token(cfg, S, causal=False) == 3 * full


def test_flops_qwen2_7b_is_6x_linear_weights_plus_attention():
    cfg = preset_config("qwen2-7b")
    with torch.device("meta"):
        model = Transformer(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # lm_head incl.
    # Per layer: q and o 3584 x 3584, k and v 3584 x 512, MLP 3 x 3584 x 18944; lm_head 3584 x 152064.
    assert linear == 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944) + 3584 * 152064 == 7_070_285_824
    parts = flops.forward_flops_breakdown(cfg, 4096)
    dense = 3 * (parts["qkvo"] + parts["mlp"] + parts["lm_head"])
    assert dense == pytest.approx(6 * linear, rel=1e-12)
    # 6 x the config's non-embedding parameter count plus the lm_head: the same up to biases and norms (0.005%).
    with_head = cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.hidden_size
    assert dense == pytest.approx(6 * with_head, rel=0.01) and dense < 6 * with_head
    # Attention grows linearly with seq_len: 3 x L x 4 x heads x head_dim x (S + 1) / 2.
    attn = {s: flops.train_flops_per_token(cfg, s) - dense for s in (4096, 32768, 131072)}
    slope = 3 * 28 * 4 * 28 * 128 / 2
    for s, value in attn.items():
        assert value == pytest.approx(slope * (s + 1), rel=1e-12)
    assert flops.train_flops_per_token(cfg, 32768) == pytest.approx(6.2152e10, rel=1e-4)  # the number in docs/mfu.md


def test_flops_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        flops.train_flops_per_token(preset_config("tiny"), 0)


# ---- peak FLOP/s and MFU ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
    ("NVIDIA H100 80GB HBM3", torch.float16, 989.4e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989.4e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA H100 NVL", torch.bfloat16, None),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),
    ("NVIDIA H100 80GB HBM3", torch.float64, None),
])
def test_peak_table(monkeypatch, name, dtype, peak):
    monkeypatch.delenv(M.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert M.peak_flops_per_second(torch.device("cuda"), dtype) == peak


@pytest.mark.parametrize("tf32,peak", [(True, 494.7e12), (False, 66.9e12)])
def test_peak_fp32_follows_tf32(monkeypatch, tf32, peak):
    monkeypatch.delenv(M.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(M, "_tf32_matmuls", lambda: tf32)
    assert M.peak_flops_per_second(torch.device("cuda", 0), torch.float32) == peak


def test_peak_cpu_none_and_env_override(monkeypatch):
    monkeypatch.delenv(M.PEAK_FLOPS_ENV, raising=False)
    assert M.peak_flops_per_second(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setenv(M.PEAK_FLOPS_ENV, "1.5e12")
    assert M.peak_flops_per_second(torch.device("cpu"), torch.float32) == 1.5e12
    for bad in ("fast", "-1", "nan", "0"):
        monkeypatch.setenv(M.PEAK_FLOPS_ENV, bad)
        with pytest.raises(ValueError, match=f"{M.PEAK_FLOPS_ENV}='{bad}'"):
            M.peak_flops_per_second(torch.device("cpu"), torch.float32)


def test_mfu():
    # 8 GPUs x 989.4e12 FLOP/s; 50k tok/s x 6.2e10 FLOP/token = 3.1e15 FLOP/s -> 39.17%.
    assert M.mfu(50_000, 6.2e10, 989.4e12, 8) == pytest.approx(3.1e15 / 7.9152e15)
    assert M.mfu(0, 6.2e10, 989.4e12, 1) == 0
    with pytest.raises(ValueError, match="world_size"):
        M.mfu(1.0, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="peak"):
        M.mfu(1.0, 1.0, None, 1)


# ---- MetricsLogger ---------------------------------------------------------------------------------------------------
def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(log_dir)).Reload()


def _series(events, tag):
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def test_logger_jsonl_and_tensorboard(tmp_path):
    with M.MetricsLogger(tmp_path, rank=0) as log:
        for step in (1, 2, 3):
            log.log(step, {"train/loss": 4.0 - step, "train/lr": 1e-4 * step})
            assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step  # flushed each call
        log.log(3, {"val/loss": 2.5, "train/tokens_seen": 3 * 2**40})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "train/loss": 3.0, "train/lr": 1e-4}
    assert lines[3] == {"step": 3, "val/loss": 2.5, "train/tokens_seen": 3 * 2**40}
    events = _events(tmp_path)
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "val/loss", "train/tokens_seen"}
    assert _series(events, "train/loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert _series(events, "train/lr") == [(1, 1e-4), (2, 2e-4), (3, 3e-4)]
    assert _series(events, "val/loss") == [(3, 2.5)]


def test_logger_other_ranks_write_nothing(tmp_path):
    log = M.MetricsLogger(tmp_path / "logs", rank=1)
    log.log(1, {"train/loss": 1.0})
    log.close()
    assert not (tmp_path / "logs").exists()


def test_logger_rejects_bad_metrics_and_writes_nan_as_null(tmp_path):
    with M.MetricsLogger(tmp_path, rank=0, tensorboard=False) as log:
        with pytest.raises(TypeError, match="'train/loss'.*item"):
            log.log(1, {"train/loss": torch.tensor(1.0)})
        with pytest.raises(ValueError, match="'step'"):
            log.log(1, {"step": 1})
        log.log(1, {"train/loss": float("nan")})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": null}\n'
    assert not list(tmp_path.glob("events.*"))


def test_logger_resume_appends_and_cuts_only_a_torn_line(tmp_path):
    with M.MetricsLogger(tmp_path, rank=0) as log:
        for step in range(1, 6):
            log.log(step, {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a crash mid-write
    # Resumed from the step-3 checkpoint: steps 4.. are trained again with new values, after the old lines.
    with M.MetricsLogger(tmp_path, rank=0, resume_step=3) as log:
        for step in (4, 5):
            log.log(step, {"train/loss": 10.0 * step})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                             (4, 40.0), (5, 50.0)]
    # TensorBoard shows the resumed values after step 3 (purge_step hides the old ones; no file is rewritten)
    assert _series(_events(tmp_path), "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_logger_keeps_a_corrupt_middle_line(tmp_path):
    """Lines it did not write are never rewritten: a bad line in the middle stays (only a torn last one is cut)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n{"st')
    with M.MetricsLogger(tmp_path, rank=0, tensorboard=False, resume_step=1) as log:
        log.log(2, {"train/loss": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == ('{"step": 1}\nnot json\n{"step": 2}\n'
                                                        '{"step": 2, "train/loss": 1.0}\n')


# ---- Progress --------------------------------------------------------------------------------------------------------
def test_progress_format_and_eta():
    clock, out = FakeClock(100.0), io.StringIO()
    progress = M.Progress(1000, rank=0, stream=out, clock=clock)
    clock.t += 10 * 60  # resumed at step 100: a slow first step (compilation, warm-up)
    progress.update(101, {})
    clock.t += 19 * 5
    progress.update(120, {"train/loss": 2.31468, "train/lr": 3e-4, "train/tokens_per_second": 18_234.0,
                          "train/mfu": 0.4123, "train/peak_memory_gib": 61.25, "train/grad_norm": 1.0})
    first, second = out.getvalue().splitlines()
    assert first.startswith("step 101/1000 | ETA ")
    # 20 steps in 695 s: 34.75 s/step x 880 steps left = 30580 s = 8 h 29 m 40 s.
    assert second == ("step 120/1000 | loss 2.315 | lr 3.0e-04 | 18.2k tok/s | MFU 41.2% | mem 61.2 GiB | "
                      "ETA 8h29m")
    assert "\r" not in out.getvalue()


def test_progress_only_rank0():
    out = io.StringIO()
    M.Progress(10, rank=1, stream=out).update(10, {"train/loss": 1.0}, force=True)
    assert out.getvalue() == ""


def test_progress_throttles_but_prints_last_step():
    clock, out = FakeClock(), io.StringIO()
    progress = M.Progress(48, rank=0, stream=out, every_seconds=10, clock=clock)
    for step in range(1, 49):
        clock.t += 1.5
        progress.update(step, {"train/loss": 1.0})
    steps = [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]
    # Step k ends at 1.5k s: printed at step 1, then once >= 10 s passed (8, 15, ..., 43), and the last step 48
    # although only 7.5 s passed since 43.
    assert steps == [1, 8, 15, 22, 29, 36, 43, 48]
    assert "ETA" not in out.getvalue().splitlines()[-1]


def test_progress_rewrites_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    progress = M.Progress(2, rank=0, stream=out, every_seconds=0, clock=FakeClock())
    progress.update(1, {"train/loss": 12.5})
    progress.update(2, {})
    first = "step 1/2 | loss 12.500 | ETA 0s"  # the fake clock stands still
    assert out.getvalue() == "\r" + first + "\r" + "step 2/2".ljust(len(first)) + "\n"


def test_progress_time_limit_caps_the_eta_and_message_ends_an_open_status_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, out = FakeClock(), Tty()
    progress = M.Progress(100, rank=0, stream=out, every_seconds=0, time_limit_s=60, clock=clock)
    clock.t += 10
    progress.update(1, {})  # 10 s per step x 99 steps, but the run stops 50 s from now
    progress.message("val loss 1.0")
    assert out.getvalue() == "\rstep 1/100 | ETA 50s\nval loss 1.0\n"
