"""The training harness (bench/tasks/model.py, bench/tasks/trainer.py; its CLI is bench/report/train.py):
baselines' semantics, a tiny seeded run lowers the loss, the CLI writes its table."""

import os

import pytest
import torch

import spectraformer_fused as sf
from bench.report import train as section
from bench.tasks import MQARConfig, model, trainer


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _tiny_mqar(steps=40):
    ts = trainer.TaskSettings(
        "mqar",
        MQARConfig(vocab_size=17, num_pairs=4, seq_len=16, train_size=2000, val_size=64, test_size=64),
        steps=steps,
        batch_size=32,
        lr=3e-3,
        evals=2,
    )
    return trainer.TaskData(ts, torch.device("cpu"))


@pytest.mark.parametrize("pair", ["softmax", "posrf:orf"])
def test_tiny_run_lowers_the_loss(pair):
    torch.set_num_threads(1)
    data = _tiny_mqar()
    run = trainer.train_one(pair, data, seed=0, backend="reference", measure=False)
    first, last = run["losses"][:8], run["losses"][-8:]
    assert sum(last) / len(last) < 0.85 * sum(first) / len(first), (first, last)
    assert len(run["curve"]) == 2 and 0.0 <= run["test_acc"] <= 1.0


def test_uniform_attention_is_the_mean_of_visible_values():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    att = model.UniformAttention(8, causal=False)
    v = att.v(x)
    o = att(x, key_padding_mask=mask)
    want = torch.stack([v[0].mean(0), v[1, [0, 1, 3]].mean(0)])[:, None].expand(2, 5, 8)
    torch.testing.assert_close(o, att.out_proj(want))
    causal = model.UniformAttention(8, causal=True)
    causal.load_state_dict(att.state_dict())
    prefix = torch.stack([v[:, : t + 1].mean(1) for t in range(5)], 1)
    torch.testing.assert_close(causal(x), att.out_proj(prefix))


def test_softmax_attention_ignores_padded_keys():
    torch.manual_seed(0)
    att = model.SoftmaxAttention(8, 2, causal=False)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    changed = x.clone()
    changed[:, 3:] = torch.randn(1, 3, 8)
    torch.testing.assert_close(att(x, mask)[:, :3], att(changed, mask)[:, :3])
    causal = model.SoftmaxAttention(8, 2, causal=True)
    later = x.clone()
    later[:, 4:] = 0
    torch.testing.assert_close(causal(x, torch.ones(1, 6, dtype=torch.bool))[:, :4], causal(later)[:, :4])


def test_redraw_changes_fixed_weights_only():
    data = _tiny_mqar()
    for pair, changes in (("posrf:orf", True), ("posrf:fastfood_learnable", False)):
        net = trainer.build_model(pair, data, 0, "reference")
        before = [fm.projection().detach().clone() for fm in net.feature_maps()]
        n = net.redraw(1)
        after = [fm.projection().detach() for fm in net.feature_maps()]
        assert n == (2 if changes else 0)
        assert all((not torch.equal(a, b)) == changes for a, b in zip(before, after))


def test_pairs_are_validated():
    assert model.resolve_pairs("quick", True) == list(model.QUICK_PAIRS)
    assert len(model.resolve_pairs("all", False)) == 2 + len(sf.COMPONENTS) * len(sf.WEIGHTS)
    assert model.resolve_pairs("softmax, oprf:mm", False) == ["softmax", "oprf:mm"]
    with pytest.raises(ValueError, match="posrf:nope"):
        model.resolve_pairs("posrf:nope", False)
    with pytest.raises(ValueError, match="task"):
        section.task_settings("copy", True)


def test_lr_schedule_warms_up_then_decays():
    f = [trainer.lr_factor(s, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:])) and f[-1] < 0.01


def test_cli_writes_table_and_plots(tmp_path):
    assert (
        section.main(
            [
                "--task",
                "mqar",
                "--quick",
                "--pairs",
                "softmax,posrf:orf",
                "--steps",
                "4",
                "--seeds",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    md = (tmp_path / "train_mqar.md").read_text()
    assert "| softmax |" in md and "| posrf x orf |" in md and "ms / step" in md and "device:" in md
    assert os.path.exists(tmp_path / "train_mqar.csv") and os.path.exists(tmp_path / "train_mqar.json")
    assert os.path.exists(tmp_path / "train_mqar_acc_vs_time.png")
    with pytest.raises(SystemExit):
        section.main(["--task", "nope"])
