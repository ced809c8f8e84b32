"""The Prefect flow (no server), the DVC entry (`python -m tasks`) and the CLI on tiny data."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, params: dict) -> Path:
    body = {k: v for k, v in params.items() if k != "profile"}
    body["profile"] = "test"
    body["profiles"] = {"test": {}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.pipeline
def test_image_flow_runs_without_server(tiny_params, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.image import image_flow

    path = write_params(tmp_path, tiny_params)
    with prefect_test_harness():
        summary = image_flow(params_path=str(path), methods=["ngf"])
    rows = summary["attacks"]
    assert rows[0]["attack"] == "badnets" and rows[0]["backdoored_asr"] >= 90
    assert [r["method"] for r in summary["purification"]] == ["no defense", "ngf"]
    assert len(summary["smoothness"]) == 3 and all(r["lambda_max"] > 0 for r in summary["smoothness"])
    assert (Path(tiny_params["run_dir"]) / "image" / "report.html").is_file()
    saved = json.loads((Path(tiny_params["run_dir"]) / "image" / "summary.json").read_text())
    assert saved == summary
    out = capsys.readouterr().out  # the verdict reaches the terminal, not only Prefect's log
    assert f"verdict: {summary['verdict'][0]}" in out and summary["verdict"][1] in out and "report: " in out


def _run(args, cwd, env_extra=None):
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"profile": "smoke", "profiles": {"smoke": {}}, "run_dir": str(tmp_path),
                                   "image": {"dataset": "gtsrb", "data_path": str(tmp_path / "nowhere")}}))
    out = _run(["-m", "pipeline.cli", "prepare", "--params", str(bad)], ROOT)
    assert out.returncode == 2 and out.stderr.strip() == f"error: dataset path not found: {tmp_path / 'nowhere'}"
    out = _run(["-m", "pipeline.cli", "attack", "nosuch", "--params", str(bad)], ROOT)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unknown attack 'nosuch'" in out.stderr
    for flag in ("--attacks=badnets,nosuch", "--methods=ngf,nosuch"):  # the flow checks names before any work
        out = _run(["-m", "flows.image", "--params", str(bad), flag], ROOT)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unknown" in out.stderr and "'nosuch'" in out.stderr
    assert not (tmp_path / "image").exists()
    out = _run(["-m", "flows.image", "--params", str(bad), "--methods=ngf"], ROOT)  # fails inside Prefect's run
    assert out.returncode == 2 and "Traceback" not in out.stderr
    ours = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert ours == [f"error: dataset path not found: {tmp_path / 'nowhere'}"]
    out = _run(["-m", "pipeline.cli", "prepare", "--params", str(tmp_path / "none.yaml")], ROOT)
    assert out.returncode == 2 and "parameters file not found" in out.stderr


def test_cli_help_for_each_subcommand():
    for sub in ("prepare", "attack", "evaluate", "list"):
        out = _run(["-m", "pipeline.cli", sub, "--help"], ROOT)
        assert out.returncode == 0 and "Usage" in out.stdout, out.stderr


def test_dvc_entry_runs_stages_and_checks_names(tiny_params, tmp_path, capsys):
    from tasks.__main__ import main

    path = str(write_params(tmp_path, tiny_params))
    for argv in (["prepare"], ["attack", "--attack", "benign"], ["attack", "--attack", "badnets"],
                 ["evaluate", "--attack", "badnets"], ["purify", "--attack", "badnets", "--method", "ngf"]):
        assert main([*argv, "--params", path]) == 0, argv
    metrics = Path(tiny_params["run_dir"]) / "image" / "metrics"
    assert json.loads((metrics / "badnets.json").read_text())["backdoored"]["asr"] >= 0.9
    assert (metrics / "purify" / "badnets-ngf.json").is_file()
    capsys.readouterr()
    for argv, msg in ((["attack", "--attack", "nosuch"], "unknown attack 'nosuch'"),
                      (["purify", "--attack", "badnets"], "needs --method"),
                      (["purify", "--attack", "badnets", "--method", "nosuch"], "unknown purification method")):
        assert main([*argv, "--params", path]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err


def test_prefect_deployments_name_flows_parameters_and_matrix_that_exist():
    import importlib
    import inspect

    from pipeline.params import load_params
    from pipeline.stages import check_names

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        # `prefect deploy --all` stops at the first deployment without a pool (video-smoke once had none)
        assert (deployment.get("work_pool") or {}).get("name"), f"{deployment['name']} has no work pool"
        given = deployment.get("parameters") or {}
        assert set(given) <= set(inspect.signature(flow.fn).parameters), deployment["name"]
        params = load_params(ROOT / "params.yaml", given.get("profile"))
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        modality = given.get("modality") or getattr(module, "MODALITY", None)
        for name in [modality] if modality else module.modality_order(given.get("modalities")):
            check_names(name, params, given.get("attacks") or [], given.get("methods") or [])


def test_the_dvc_matrix_is_the_demo():
    """`make demo` runs params.yaml's lists and then `dvc commit`: both must describe the same matrix."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    make = (ROOT / "Makefile").read_text()
    demo = make[make.index("\ndemo:"):].split("\n\n", 1)[0]
    assert "--attacks" not in demo and "--methods" not in demo and "dvc commit" in demo
    assert params["image"]["attacks"] == ["badnets"]
    assert params["purify"]["methods"] == ["recommended", "ft", "ft-sam", "sft", "fsft", "ngf"]
    assert all("attacks" not in (p.get("image") or {}) and "methods" not in (p.get("purify") or {})
               for p in params["profiles"].values())  # DVC reads the top-level lists, unmerged


def test_every_stage_pins_the_thread_count_its_demo_uses():
    """The thread count changes the weights and is no DVC dependency: each stage's command pins it, one
    count per modality, and `make demo` / `make demo-multilabel` (which `dvc commit` their flow's
    outputs as the stages') run at the same count."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    counts: dict[str, set[str]] = {}
    for name, stage in stages.items():
        cmd = (stage.get("do") or stage)["cmd"]
        pinned = re.match(r"OMP_NUM_THREADS=(\d+) python -m tasks ", cmd)
        assert pinned, (name, cmd)
        counts.setdefault(name.split("-")[0], set()).add(pinned.group(1))
    assert all(len(c) == 1 for c in counts.values()), counts
    make = (ROOT / "Makefile").read_text()
    for target, modality in (("demo", "image"), ("demo-multilabel", "multilabel")):
        body = make[make.index(f"\n{target}:"):].split("\n\n", 1)[0]
        assert f"OMP_NUM_THREADS={next(iter(counts[modality]))} " in body, target


def test_list_describes_every_model_attack_and_method_within_200_columns():
    from pipeline.cli import _listing
    from pipeline.params import load_params
    from smoothpurify.runner import method_names

    lines = _listing(load_params(ROOT / "params.yaml"))
    assert max(len(line) for line in lines) <= 200
    entries = [line for line in lines if line.startswith("    ")]
    described = {line.split()[0]: line.split(None, 1)[1] if len(line.split()) > 1 else "" for line in entries}
    assert all(described.values()), [n for n, d in described.items() if not d]
    assert set(method_names()) <= set(described)
    assert {"wrn16_1", "badnets", "badnets-50", "cnn_mldecoder", "appearing"} <= set(described)
    assert described["badnets-50"] == "variant of badnets: poison_rate 0.5"


def test_each_purify_stage_depends_on_its_modality_s_code():
    """A modality's own preset settings (``method_defaults``), augmentation and overlay live in its
    ``modality.py``: a change there must make DVC re-run that modality's purifications."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    purify = [name for name in stages if name.endswith("-purify")]
    assert {name.removesuffix("-purify") for name in purify} == {"image", "multilabel", "pointcloud", "video",
                                                                  "translation"}
    for name in purify:
        assert f"modalities/{name.removesuffix('-purify')}/modality.py" in stages[name]["deps"], name
