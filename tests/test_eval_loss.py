"""Loss by position bucket and domain: per-token loss against the model's own loss, buckets, the Table 5 layout,
the plot, the CLI on two models differing only in rope_theta, and CP=2 (gloo ring) equal to CP=1."""
import json

import pytest
import torch

from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.eval import loss_by_length as lbl
from megatron_lc.model import ModelConfig, Transformer, save_hf
from tests.dist_utils import run_distributed


def _config(rope_theta=1e4, max_pos=256):
    return ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, rope_theta=rope_theta, max_position_embeddings=max_pos,
                       extra={"eos_token_id": 257})


def _windows(n=3, seq_len=64, seed=0):
    return torch.randint(0, 256, (n, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def test_per_token_loss_matches_the_model_loss_and_plain_cross_entropy():
    model = Transformer(_config(), seed=1).eval()
    w = _windows()
    x, y = w[:, :-1], w[:, 1:].clone()
    y[0, :5] = -100
    losses = lbl.per_token_loss(model, x, y, chunk_tokens=7)  # chunks that do not divide B x S
    assert losses.shape == y.shape and losses.dtype == torch.float32
    assert torch.all(losses[0, :5] == 0)
    s, _c = model(x, labels=y, reduction="sum")
    torch.testing.assert_close(losses.sum(), s, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    torch.testing.assert_close(losses, ref, atol=1e-5, rtol=1e-5)


def test_buckets_add_up_to_the_mean_loss():
    model = Transformer(_config(), seed=1)
    w = _windows(seq_len=100)
    result = lbl.loss_by_position(model, w, bucket_size=32, batch_size=2)
    assert lbl.bucket_edges(100, 32) == [0, 32, 64, 96, 100]
    assert result.counts.tolist() == [3 * 32, 3 * 32, 3 * 32, 3 * 4]
    with torch.no_grad():
        mean = float(model(w[:, :-1], labels=w[:, 1:]))
    assert result.average() == pytest.approx(mean, rel=1e-5)
    per = lbl.per_token_loss(model, w[:, :-1], w[:, 1:])
    assert result.mean()[1] == pytest.approx(float(per[:, 32:64].mean()), rel=1e-5)


def test_table_has_the_fu_layout_and_differences():
    edges = [0, 4096, 8192]
    a = {"book": lbl.BucketLoss(torch.tensor([20.0, 10.0], dtype=torch.float64), torch.tensor([10, 10])),
         "code": lbl.BucketLoss(torch.tensor([9.0, 8.0], dtype=torch.float64), torch.tensor([10, 10]))}
    b = {"book": lbl.BucketLoss(torch.tensor([21.0, 9.5], dtype=torch.float64), torch.tensor([10, 10])),
         "code": lbl.BucketLoss(torch.tensor([9.0, 8.0], dtype=torch.float64), torch.tensor([10, 10]))}
    table = lbl.format_table({"base": a, "theta": b}, edges)
    lines = table.splitlines()
    assert lines[0].split()[-3:] == ["0-4K", "4K-8K", "avg"]
    assert "  book" in lines[2] and lines[2].split()[1:] == ["2.000", "1.000", "1.500"]
    assert lines[7] == "theta v.s. base"
    assert lines[8].split()[1:] == ["+.100", "-.050", "+.025"]


def test_windows_too_short_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"domain 'book' has 100 tokens; 2 windows of 64 need 129"):
        lbl.windows_from_tokens(list(range(100)), 64, 2, "book")


def test_cli_two_rope_thetas_table_and_plot(tmp_path, capsys):
    from PIL import Image

    paths = []
    for name, theta in (("theta1e4", 1e4), ("theta1e6", 1e6)):
        save_hf(Transformer(_config(theta), seed=3), str(tmp_path / name))
        paths += ["--model", str(tmp_path / name)]
    text = " ".join(f"Line {i} of a text about nothing much." for i in range(200))
    (tmp_path / "prose.txt").write_text(text)
    (tmp_path / "code.txt").write_text("\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(300)))
    out = tmp_path / "out"
    status = main(["eval", "loss", *paths, "--data", f"prose={tmp_path / 'prose.txt'}",
                   "--data", f"code={tmp_path / 'code.txt'}", "--seq-len", "256", "--bucket-size", "64",
                   "--samples", "2", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "theta1e6 v.s. theta1e4" in printed and "0-64" in printed and "192-256" in printed
    results = json.loads((out / "loss_by_length.json").read_text())
    assert set(results["models"]) == {"theta1e4", "theta1e6"}
    means = [results["models"][m]["prose"]["mean"] for m in ("theta1e4", "theta1e6")]
    assert means[0] != means[1]  # a real forward: the RoPE base changes the numbers
    assert all(3.0 < v < 8.0 for v in means[0])  # ~ln(260) = 5.56 for an untrained model
    with Image.open(out / "loss_by_length.png") as image:
        image.load()


def test_cli_bad_data_flag(tmp_path, capsys):
    save_hf(Transformer(_config(), seed=0), str(tmp_path / "m"))
    with pytest.raises(SystemExit):
        main(["eval", "loss", "--model", str(tmp_path / "m"), "--data", "nofile"])
    assert "use DOMAIN=PATH" in capsys.readouterr().err


def _cp_worker(rank, world, windows, bucket_size, mode):
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.parallel.context_parallel import ContextParallel

    model = Transformer(_config(max_pos=1024), seed=2)
    cp = ContextParallel(init_device_mesh("cpu", (world,)), mode=mode)
    cp.apply(model)
    result = lbl.loss_by_position(model, windows, bucket_size, cp=cp, batch_size=2)
    return result.sums, result.counts


@pytest.mark.parametrize("mode", ["ring"])
def test_cp2_equals_cp1(mode):
    """CP=2 (gloo, zigzag ring attention, each rank bucketing by its shard's position ids) gives CP=1's per-bucket
    losses within fp32 atol=rtol=1e-5, and the same target counts."""
    windows = _windows(n=3, seq_len=256, seed=4)
    ref = lbl.loss_by_position(Transformer(_config(max_pos=1024), seed=2), windows, 48, batch_size=2)
    results = run_distributed(_cp_worker, 2, windows, 48, mode)
    for sums, counts in results:
        assert counts.tolist() == ref.counts.tolist()
        torch.testing.assert_close(sums / counts, ref.sums / ref.counts, atol=1e-5, rtol=1e-5)
