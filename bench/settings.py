"""The report's sizes and budgets: quick mode for a 2-core CPU, ``--full`` for a GPU (section 2's own sizes
are ``bench.kernel_estimation.make_settings``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
