"""The ``qinco`` command line: help, ``baselines``, ``demo``, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.io import vectors
from pipeline.cli import main
from pipeline.stages.datasets import clustered_vectors


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def test_python_m_pipeline_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for name in ("demo", "baselines"):
        assert name in out.stdout


def test_no_command_exits_non_zero(capsys):
    assert main([]) == 2


@pytest.fixture
def tiny_files(tmp_path):
    uris = {}
    for stream, (name, n) in enumerate([("learn", 1200), ("base", 800), ("query", 30)]):
        uris[name] = str(tmp_path / f"{name}.fvecs")
        vectors.write_vectors(uris[name], clustered_vectors(n, 8, seed=3, stream=stream))
    return uris


def test_baselines_command_writes_json(tiny_files, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    rc = main(["baselines", "--learn", tiny_files["learn"], "--base", tiny_files["base"],
               "--queries", tiny_files["query"], "--bytes", "2", "--methods", "PQ", "RQ",
               "--max-base", "500", "--k", "20", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["factory"] for r in report["rows"]] == ["PQ2x8", "RQ2x8"]
    assert all(r["n_base"] == 500 and r["n_query"] == 30 and "R@10" in r for r in report["rows"])
    assert report["arguments"]["bytes"] == [2] and report["arguments"]["max_base"] == 500
    assert report["code_version"]["package"] == "qinco-pipeline"
    assert report["machine"]["cpu_count"] >= 1
    assert "RQ2x8" in capsys.readouterr().out


def test_baselines_missing_file_is_one_line_error(tiny_files, tmp_path, capsys):
    missing = str(tmp_path / "nope.fvecs")
    out = tmp_path / "r.json"
    rc = main(["baselines", "--learn", missing, "--base", tiny_files["base"],
               "--queries", tiny_files["query"], "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and missing in err and err.startswith("qinco baselines: error:")
    assert not out.exists()


def test_baselines_needs_inputs(tmp_path, capsys):
    assert main(["baselines", "--out", str(tmp_path / "r.json")]) == 2
    assert "--learn" in capsys.readouterr().err


def test_demo_quick_end_to_end(tmp_path, capsys):
    """Without the real data the demo writes and uses a synthetic dataset."""
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--data-dir", str(tmp_path / "no-data"), "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert [st["stage"] for st in report["stages"]] == ["dataset", "ground_truth", "baselines", "train",
                                                        "encode", "search", "evaluate", "history"]
    assert report["encode"]["vectors"] == report["dataset"]["n_base"] == 2000
    assert report["search"]["queries"] == report["dataset"]["n_query"]
    assert report["recall"]["qinco"]["R@100"] > 0.5  # the index answers with real neighbours
    assert (out / "index" / "CURRENT").exists() and (out / "model").is_dir()
    assert report["dataset"]["name"] == "synthetic"
    assert (out / "synthetic" / "groundtruth.ivecs").exists()
    assert report["ground_truth_check"]["rows_identical"] == 1.0
    assert [r["factory"] for r in report["baselines"]] == ["PQ8x8", "RQ8x8"]
    printed = capsys.readouterr().out
    assert "[baselines] done in" in printed and "RQ8x8" in printed


def test_encode_of_a_file_of_unknown_format_is_one_line_error(tiny_files, tmp_path, capsys):
    from conftest import build_tiny_model

    build_tiny_model(str(tmp_path / "model"), vectors.read_vectors(tiny_files["learn"]), nlist=4)
    data = tmp_path / "base.dat"
    data.write_bytes(open(tiny_files["base"], "rb").read())
    out = tmp_path / "codes.parquet"
    rc = main(["encode", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("qinco encode: error:")
    assert str(data) in err and "--fmt" in err and not out.exists()
    assert main(["encode", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out),
                 "--fmt", "fvecs"]) == 0 and out.exists()


def test_outputs_the_command_cannot_write_are_refused(tiny_files, tmp_path, capsys):
    """An --out ending in a file extension the command does not write is a one-line error naming
    what it does write, before any work: `encode --out codes.npy` would otherwise build an index
    folder named codes.npy, which `decode --codes codes.npy` then cannot read."""
    from conftest import build_tiny_model

    model = str(tmp_path / "model")
    build_tiny_model(model, vectors.read_vectors(tiny_files["learn"]), nlist=4)
    cases = [
        (["encode", "--model", model, "--data", tiny_files["base"], "--out", str(tmp_path / "codes.npy")],
         "codes.npy", [".parquet", "an index"]),
        (["train", "--data", tiny_files["learn"], "--out", str(tmp_path / "m.safetensors"), "--epochs", "1"],
         "m.safetensors", ["a model directory"]),
        (["decode", "--model", model, "--codes", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "x.npz")],
         "x.npz", ["fvecs", "npy"]),
    ]
    for argv, name, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"qinco {argv[0]}: error:") and name in err, err
        assert all(w in err for w in words), err
        assert not (tmp_path / name).exists()
    # an index named like a version folder is not a file extension; parquet codes are written
    out = tmp_path / "codes.parquet"
    assert main(["encode", "--model", model, "--data", tiny_files["base"], "--out", str(out)]) == 0
    assert main(["decode", "--model", model, "--codes", str(out), "--out", str(tmp_path / "x.fvecs")]) == 0
    assert vectors.read_vectors(str(tmp_path / "x.fvecs")).shape == (800, 8)


def test_time_budget_without_epochs_trains_until_the_budget(tiny_files, tmp_path, capsys):
    """`qinco train --time-budget S` without --epochs is not capped at the default 10 epochs: it
    trains until the budget (or early stopping) ends it; an explicit --epochs still caps it."""
    out = tmp_path / "m"
    common = ["train", "--data", tiny_files["learn"], "--M", "2", "--K", "16", "--val", "200",
              "--batch-size", "256", "--patience", "1000"]
    assert main(common + ["--out", str(out), "--time-budget", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train_config"]["epochs"] is None
    assert report["epochs_done"] > 10, report["epochs_done"]
    assert report["history"][-1]["time_used_s"] >= 8  # the budget ended it
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "m3"), "--time-budget", "8", "--epochs", "3"]) == 0
    assert json.loads((tmp_path / "m3" / "report.json").read_text())["epochs_done"] == 3


# Numeric options for which 0 is a documented setting (off, none, all, in-process, ...).
ZERO_ALLOWED = {"--sample-size", "--input-noise", "--L", "--epochs", "--ivf", "--workers@train", "--threads-per-worker",
                "--gpus-per-worker", "--lut-weight", "--rerank", "--prefix-steps", "--seed", "--port"}


def _numeric_options():
    """(command, its parser, option) for every option of every sub-command that takes a number."""
    import argparse

    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for act in p._actions:
            if act.option_strings and act.type not in (None, str) and not act.choices:
                yield name, p, act


def _required_args(p) -> list[str]:
    acts = [a for a in p._actions if a.required] + [g._group_actions[0] for g in p._mutually_exclusive_groups
                                                    if g.required]
    value = {id(a): "1" if a.type not in (None, str) else "x" for a in acts}
    return [x for a in acts for x in ((a.option_strings[0], value[id(a)]) if a.option_strings else ("x",))]


def test_every_numeric_option_refuses_zero_negative_and_huge_values_in_one_line(capsys):
    """0 (where it means nothing), -1, a huge value, NaN and a word stop the command in the
    parser: exit status 2 and one line naming the option, never a traceback, a silent empty
    result or a run that asks for terabytes."""
    from pipeline.cli import Number

    walked = set()
    for cmd, p, act in _numeric_options():
        opt = act.option_strings[0]
        walked.add(f"{cmd} {opt}")
        assert isinstance(act.type, Number), f"qinco {cmd} {opt} is not range-checked"
        zero_ok = opt in ZERO_ALLOWED or f"{opt}@{cmd}" in ZERO_ALLOWED
        bad = ["-1", "10000000000000", "nan", "inf", "many"] + ([] if zero_ok else ["0"])
        for value in bad:
            with pytest.raises(SystemExit) as e:
                p.parse_args(_required_args(p) + [opt, value])
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and len(err.splitlines()) == 1, (cmd, opt, value, err)
            assert err.startswith(f"qinco {cmd}: error: argument {opt}") and value in err, err
        good = ["1"] + (["0"] if zero_ok else [])
        for value in good:
            if act.type.lo <= float(value) <= act.type.hi and not (act.type.lo_open and float(value) == act.type.lo):
                ns = p.parse_args(_required_args(p) + [opt, value])
                got = getattr(ns, act.dest)
                assert (got[0] if isinstance(got, list) else got) == act.type.kind(value)
    # the options the defects were found with are among those walked
    for name in ("search --query-batch", "search --k", "search --shortlist", "search --max-queries",
                 "search --cpus-per-worker", "encode --batch-size", "train --workers", "reencode --keep"):
        assert name in walked
