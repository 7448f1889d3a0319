"""The report's sizes and budgets: quick mode for a 2-core CPU, ``--full`` for a GPU (section 2's own sizes
are ``bench.report.kernel_estimation.make_settings``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..tasks.mqar import MQARConfig


@dataclass
class Settings:
    full: bool
    device: torch.device
    seeds: int
    acc_shape: tuple  # B, T, H, D for the accuracy section
    ms: tuple
    scales: tuple  # std of q and k: flat and peaked attention
    speed_T: tuple
    speed_shape: tuple  # B, H, D, m
    speed_dtype: torch.dtype
    weight_shape: tuple  # H, m, D for building W
    train_shape: tuple  # B, T, E, H, m
    run_budget_s: float  # timing budget per measured configuration
    slow_s: float  # an implementation predicted slower than this at the next T is skipped
    speed_budget_s: float  # wall-clock budget of the whole speed section
    kernels: tuple = ("softmax", "gaussian")


def make_settings(full: bool, device: torch.device) -> Settings:
    cuda = device.type == "cuda"
    if not full:
        speed_T = (1024, 4096, 16384) if cuda else (256, 1024, 4096)
        return Settings(
            False,
            device,
            3,
            (2, 128, 2, 32),
            (16, 32, 64, 128, 256),
            (0.5, 1.0, 1.5),
            speed_T,
            (1, 8, 64, 128),
            torch.bfloat16 if cuda else torch.float32,
            (8, 128, 64),
            (2, 256, 256, 4, 128),
            0.5,
            4.0,
            90.0 if cuda else 200.0,
        )
    speed_T = (1024, 2048, 4096, 8192, 16384, 32768, 65536) if cuda else (256, 512, 1024, 2048, 4096, 8192)
    return Settings(
        True,
        device,
        5,
        (2, 256, 2, 32),
        (16, 32, 64, 128, 256, 512),
        (0.5, 1.0, 1.5),
        speed_T,
        (1, 8, 64, 128),
        torch.bfloat16 if cuda else torch.float32,
        (8, 128, 64),
        (4, 512, 256, 4, 128),
        1.0 if not cuda else 0.5,
        20.0 if not cuda else 2.0,
        120.0 if cuda else 900.0,
    )


@dataclass
class WindowSettings:
    """Sizes of the hybrid-window section (``bench/report/window.py``)."""

    full: bool
    device: torch.device
    # (a) approximation error against exact attention, over the window size
    acc_shape: tuple  # B, T, H, D
    acc_m: int
    windows: tuple  # 0 = random features only
    scales: tuple  # std of q and k
    seeds: int
    pairs: tuple  # component:weights
    kernels: tuple
    # (b) MQAR with the pairs spread over T = seq_len >= 8 W
    mqar_window: int
    mqar: MQARConfig
    mqar_steps: int
    mqar_batch: int
    mqar_lr: float
    mqar_seeds: int
    mqar_pairs: tuple  # random-feature pairs, each trained without and with the window
    # the model: a token shift (short convolution of width 2) and no position embeddings, so that softmax
    # learns the task in the few steps a CPU affords (bench/tasks/model.ModelConfig)
    mqar_token_shift: bool
    mqar_positions: bool
    # (c) CPU (or GPU) speed and memory of the forward pass and of forward + backward
    speed_T: tuple
    speed_window: int
    speed_shape: tuple  # B, H, D, m
    speed_pairs: tuple
    speed_budget_s: float  # timing budget per measured row


def window_settings(full: bool, device: torch.device) -> WindowSettings:
    """Quick: a few minutes on a 2-core CPU; ``--full``: more seeds, pairs and lengths."""
    cuda = device.type == "cuda"
    W = 16
    quick = WindowSettings(
        full=False,
        device=device,
        acc_shape=(2, 256, 2, 32),
        acc_m=64,
        windows=(0, 4, 16, 64),
        scales=(0.5, 1.0, 1.5),
        seeds=3,
        pairs=("posrf:orf", "hyprf:sorf", "oprf:fastfood_learnable", "saderf:mm", "trigrf:orf"),
        kernels=("softmax",),
        mqar_window=W,
        mqar=MQARConfig(
            vocab_size=17, num_pairs=4, seq_len=8 * W, train_size=8000, val_size=256, test_size=512, layout="spread"
        ),
        mqar_steps=150,
        mqar_batch=32,
        mqar_lr=3e-3,
        mqar_seeds=2,
        mqar_pairs=("posrf:orf", "hyprf:sorf"),
        mqar_token_shift=True,
        mqar_positions=False,
        speed_T=(16384, 65536) if cuda else (1024, 4096),
        speed_window=64,
        speed_shape=(1, 8, 64, 128),
        speed_pairs=("posrf:orf",),
        speed_budget_s=0.5,
    )
    if not full:
        return quick
    return replace(
        quick,
        full=True,
        acc_shape=(2, 512, 2, 32),
        acc_m=128,
        seeds=5,
        kernels=("softmax", "gaussian"),
        mqar=MQARConfig(vocab_size=8192, num_pairs=64, seq_len=max(256, 8 * W), layout="spread"),
        mqar_steps=8000,
        mqar_batch=64,
        mqar_lr=1e-3,
        mqar_seeds=3,
        mqar_pairs=("posrf:orf", "hyprf:sorf", "oprf:fastfood_learnable"),
        speed_T=(16384, 65536) if cuda else (1024, 4096, 8192),
        speed_pairs=("posrf:orf", "oprf:fastfood_learnable"),
        speed_budget_s=0.5 if cuda else 1.0,
    )
