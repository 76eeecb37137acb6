"""`embedfleet model recommend`: the ranking rule (fastest variant that meets every floor), and
the command measuring the real bundle's variants on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worker.engine.openvino_backend import openvino_available
from worker.engine.recommend import VariantReport, recommend, runnable_variants

EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))


def report(
    variant: str, queries: float, docs: float, *, min_cosine: float = 0.995, drift: float = 0.0
) -> VariantReport:
    return VariantReport(
        variant=variant,
        device="cpu",
        queries_per_s=queries,
        docs_per_s=docs,
        min_cosine=min_cosine,
        mean_cosine=0.999,
        batch_drift=drift,
        fingerprint=variant * 8,
    )


def test_the_fastest_variant_that_meets_the_floors_wins() -> None:
    fp32, int8 = report("fp32", 100, 20), report("int8", 150, 18)
    assert recommend([fp32, int8]) is int8
    assert recommend([fp32, int8], "docs") is fp32
    too_coarse = report("int4", 400, 80, min_cosine=0.95)
    drifting = report("bf16", 300, 60, drift=5e-4)  # its vector depends on the batch it ran in
    assert not too_coarse.meets_floors and not drifting.meets_floors
    assert recommend([fp32, too_coarse, drifting]) is fp32
    assert recommend([too_coarse]) is None


def test_fp16_is_offered_only_on_cuda() -> None:
    cpu_only = runnable_variants(["fp32", "int8", "fp16"], cuda=False, openvino=False)
    assert cpu_only == [("fp32", "cpu"), ("int8", "cpu")]
    assert ("fp16", "cuda") in runnable_variants(["fp32", "int8", "fp16"], cuda=True)


def test_the_command_measures_the_bundle_and_recommends(model_dir: Path, shared_dir: Path) -> None:
    env = dict(os.environ, EMBEDFLEET_SHARED=str(shared_dir))
    done = subprocess.run(
        [EMBEDFLEET, "model", "recommend", "--model", str(model_dir), "--queries", "40", "--docs", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    rows = {
        line.split()[0]: line for line in done.stdout.splitlines() if line.split()[:1] in (["fp32"], ["int8"])
    }
    assert set(rows) == {"fp32", "int8"}
    if openvino_available():  # measured beside the others, against the same floors
        openvino_rows = [line for line in done.stdout.splitlines() if line.startswith("openvino ")]
        assert len(openvino_rows) == 1 and openvino_rows[0].rstrip().endswith("ok"), done.stdout
    assert all(row.rstrip().endswith("ok") for row in rows.values()), done.stdout
    recommended = [line for line in done.stdout.splitlines() if line.startswith("recommended for queries:")]
    assert len(recommended) == 1 and "EMBEDFLEET_VARIANT=" in recommended[0], done.stdout
    assert "measuring int8 on cpu" in done.stderr  # progress on stderr
    assert "int8 u8 x " in done.stdout  # the INT8 kernel that ran, whichever weights this CPU takes
