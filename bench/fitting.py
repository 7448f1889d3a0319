"""Section 6 of the report: quotes the newest table of ``python -m bench.fit_report``."""

from __future__ import annotations

import os
import re

from .common import RESULTS


def markdown(out_dir: str) -> list[str]:
    """Section 6: the newest table of ``python -m bench.fit_report`` (fitted versus unfitted feature maps
    on held-out queries and keys). That script takes minutes per data set, so this report does not run it;
    it quotes the table as the script wrote it, naming the file and its own header (device, date)."""
    results = RESULTS
    files = (
        sorted(f for f in os.listdir(results) if re.fullmatch(r"fit-\d{4}-\d{2}-\d{2}\.md", f))
        if os.path.isdir(results)
        else []
    )
    L = ["", "## 6. Fitting the feature map to softmax attention", ""]
    if not files:
        return L + ["No table yet: `python -m bench.fit_report` writes `bench/results/fit-<date>.md`.", ""]
    with open(os.path.join(results, files[-1])) as f:
        lines = f.read().splitlines()
    header = next((ln for ln in lines if ln.startswith("device:")), "")
    table = [ln for ln in lines if ln.startswith("|")]
    rel = os.path.relpath(os.path.join(results, files[-1]), out_dir)
    return (
        L
        + [
            f"Quoted from [`{files[-1]}`]({rel}), measured by `python -m bench.fit_report` in its own run "
            f"(not in this one; {header or 'see the file for its device and date'}). Errors are "
            "||o - o_softmax|| / ||v|| on held-out queries and keys; the file explains the data sets and "
            "what limits the fit.",
            "",
        ]
        + table
        + [""]
    )
