"""The `fxcompress` command line: user errors end with one line, exit code 2 and nothing written;
the console script and `python -m fxcompress` are the same entry point; a `torchrun
--nproc_per_node 2` run (gloo, CPU) ends with the same metric on both ranks."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fxcompress.samples import write_digits_imagefolder
from fxcompress.samples.cli import main

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "model": "digits_cnn",
    "input_info": {"sample_size": [1, 1, 8, 8]},
    "batch_size": 128,
    "epochs": 1,
    "optimizer": {"type": "adam", "base_lr": 0.003},
    "compression": {"algorithm": "quantization",
                    "initializer": {"range": {"num_init_samples": 128},
                                    "batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}},
}


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory):
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"))


def _write(path: Path, config) -> Path:
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _fails_cleanly(capsys, tmp_path, args, expected: str):
    """Exit code 2, one line on stderr naming the problem, nothing on stdout, no log dir."""
    log_dir = tmp_path / "logs"
    code = main([*args, "--log-dir", str(log_dir)] if args[0] == "train" else args)
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxcompress: error: "), err
    assert expected in lines[0], lines[0]
    assert out == ""
    assert not log_dir.exists()
    return lines[0]


def test_a_missing_data_directory(capsys, tmp_path):
    config = _write(tmp_path / "c.json", GOOD)
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(tmp_path / "nowhere")],
                   f"--data {tmp_path / 'nowhere'}: no such directory")


def test_no_data_directory_for_a_dataset_that_needs_one(capsys, tmp_path):
    config = _write(tmp_path / "c.json", GOOD)
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config)], "--data: a data directory is needed")


def test_an_unknown_model_name_lists_known_ones(capsys, tmp_path, digits_tree):
    config = _write(tmp_path / "c.json", {**GOOD, "model": "resnet_tiniest"})
    line = _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(digits_tree)],
                          "config key 'model': unknown model 'resnet_tiniest'")
    assert "resnet_tiny" in line


@pytest.mark.parametrize("key, value, expected", [
    ("batch_size", "64", "config key 'batch_size': expected a positive integer, got '64'"),
    ("epochs", True, "config key 'epochs': expected a non-negative integer, got True"),
    ("optimizer", {"base_lr": "fast"}, "config key 'optimizer.base_lr': expected a positive number, got 'fast'"),
    ("optimizer", {"schedule_type": "poly"}, "config key 'optimizer.schedule_type': expected one of multistep"),
    ("input_info", {"sample_size": [3, 8, 8]}, "config key 'input_info.sample_size': expected [1, C, H, W]"),
])
def test_a_config_key_of_the_wrong_type_or_value(capsys, tmp_path, digits_tree, key, value, expected):
    config = _write(tmp_path / "c.json", {**GOOD, key: value})
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(digits_tree)], expected)


def test_a_bad_compression_section_names_its_field(capsys, tmp_path, digits_tree):
    config = _write(tmp_path / "c.json", {**GOOD, "compression": {"algorithm": "quantisation"}})
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(digits_tree)],
                   "compression.algorithm: unknown algorithm 'quantisation'; did you mean 'quantization'?")


def test_a_config_that_is_not_json(capsys, tmp_path, digits_tree):
    config = _write(tmp_path / "c.json", '{"model": "digits_cnn",\n  "epochs": 1 2}')
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(digits_tree)],
                   "not valid JSON at line 2")


def test_a_dataset_layout_that_does_not_match(capsys, tmp_path):
    config = _write(tmp_path / "c.json", GOOD)
    data = tmp_path / "flat"
    (data / "0").mkdir(parents=True)  # class folders without the train/ and val/ splits
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(data)],
                   f"no class folders in {data / 'train'}; expected the ImageFolder layout")


def test_train_and_val_with_different_classes(capsys, tmp_path, digits_tree):
    config = _write(tmp_path / "c.json", GOOD)
    data = tmp_path / "uneven"
    for split, classes in (("train", "ab"), ("val", "a")):
        for name in classes:
            (data / split / name).mkdir(parents=True)
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(data)],
                   "train and val have different class folders (2 vs 1)")


def test_command_line_mistakes(capsys, tmp_path, digits_tree):
    config = _write(tmp_path / "c.json", GOOD)
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--epochs", "two"],
                   "argument --epochs: invalid int value: 'two'")
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(tmp_path / "missing.json")],
                   f"--config {tmp_path / 'missing.json'}: no such file")
    _fails_cleanly(capsys, tmp_path, ["export", "--config", str(config)],
                   "the following arguments are required: --to-onnx")
    _fails_cleanly(capsys, tmp_path, ["train", "--config", str(config), "--data", str(digits_tree),
                                      "--resume", str(config)], f"--resume {config}: not a PyTorch checkpoint")


def test_an_existing_run_is_never_overwritten(capsys, tmp_path, digits_tree):
    config = _write(tmp_path / "c.json", GOOD)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "last.pth").write_bytes(b"previous run")
    assert main(["train", "--config", str(config), "--data", str(digits_tree), "--log-dir", str(log_dir)]) == 2
    assert "already holds a run (last.pth)" in capsys.readouterr().err
    assert sorted(p.name for p in log_dir.iterdir()) == ["last.pth"]


def test_the_console_script_and_python_dash_m_are_the_same_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fxcompress": "fxcompress.samples.cli:main"}
    run = subprocess.run([sys.executable, "-m", "fxcompress", "train", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0 and "--resume" in run.stdout and "--to-onnx" in run.stdout

def test_an_unknown_sub_command(capsys):
    assert main(["tune"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxcompress: error: argument command: invalid choice: 'tune'")


def test_torchrun_two_processes_train_with_ddp_and_agree_on_the_metric(tmp_path, digits_tree):
    config = _write(tmp_path / "c.json", GOOD)
    log_dir = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fxcompress", "train", "--config", str(config),
                          "--data", str(digits_tree), "--log-dir", str(log_dir), "--cpu-only"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((log_dir / "result.json").read_text())
    assert len(result["metric_per_rank"]) == 2
    assert result["metric_per_rank"][0] == result["metric_per_rank"][1] == result["metric"]
    assert result["metric"] > 0.5  # one epoch on each rank's half of the data, batch 128
    assert run.stdout.count("final top1") == 1  # rank 0 only reports
    assert sorted(p.name for p in log_dir.iterdir()) == ["best.pth", "history.png", "last.pth", "log.csv",
                                                         "result.json", "statistics.txt"]
