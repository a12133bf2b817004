"""The [kernels.NAME.slurm] and [defaults.slurm] tables (issue 17): validated like every key,
merged key by key, turned into sbatch options; no cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from remote_kernel.backends import backend_for
from remote_kernel.backends.slurm import SlurmBackend, batch_script, sbatch_options
from remote_kernel.config import parse_config
from remote_kernel.errors import ConfigError

CONFIG = """\
[defaults.slurm]
partition = "debug"
time = "1:00:00"

[kernels.gpu]
host = "alice@login.example.org"
setup = ["module load cuda"]

[kernels.gpu.slurm]
time = "1-00:00:00"
gpus = "a100:2"
extra_args = ["--exclusive"]
queue_timeout = "15m"

[kernels.plain]
host = "alice@login.example.org"
"""


def test_a_kernels_slurm_keys_win_over_the_defaults_key_by_key_and_become_sbatch_options(tmp_path: Path) -> None:
    entries = parse_config(CONFIG, tmp_path / "remote-kernels.toml").entries()
    slurm = entries["gpu"].slurm
    assert slurm is not None
    assert (slurm.partition, slurm.time, slurm.gpus, slurm.queue_timeout) == ("debug", "1-00:00:00", "a100:2", 900.0)
    assert sbatch_options(slurm) == ["--partition=debug", "--time=1-00:00:00", "--gpus=a100:2", "--exclusive"]
    assert isinstance(backend_for(entries["gpu"]), SlurmBackend)
    # [defaults.slurm] makes every kernel a Slurm kernel
    assert entries["plain"].slurm is not None and entries["plain"].slurm.partition == "debug"


def test_an_entry_without_slurm_keeps_its_stored_form(tmp_path: Path) -> None:
    text = CONFIG.split("[kernels.plain]")[1].replace("[defaults.slurm]", "")
    entry = parse_config("[kernels.plain]" + text, tmp_path / "r.toml").entries()["plain"]
    assert entry.slurm is None and "slurm" not in entry.to_dict()
    assert backend_for(entry).kind == "ssh"


@pytest.mark.parametrize(("line", "key", "expected"), [
    ('tme = "1:00:00"', "kernels.gpu.slurm.tme", 'unknown key "tme" (did you mean "time"?)'),
    ('time = "two hours"', "kernels.gpu.slurm.time", "a Slurm time limit"),
    ("cpus = 0", "kernels.gpu.slurm.cpus", "an integer, 1 or more"),
    ('queue_timeout = "soon"', "kernels.gpu.slurm.queue_timeout", "a duration greater than 0"),
])
def test_a_bad_slurm_key_is_reported_with_its_file_line_and_what_is_expected(
        tmp_path: Path, line: str, key: str, expected: str) -> None:
    name = line.split(" =", maxsplit=1)[0]
    kept = [old for old in CONFIG.split("[kernels.gpu.slurm]")[1].splitlines() if old.startswith(name + " =")]
    text = CONFIG.replace(kept[0] + "\n", "") if kept else CONFIG  # one value per key
    text = text.replace('gpus = "a100:2"', line) if name != "gpus" else text
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "remote-kernels.toml")
    problem = caught.value.problems[0]
    assert problem.key == key
    assert problem.line == text.splitlines().index(line) + 1
    assert expected in problem.message


def test_the_batch_script_holds_the_setup_and_no_secret(tmp_path: Path) -> None:
    entry = parse_config(CONFIG, tmp_path / "remote-kernels.toml").entries()["gpu"]
    script = batch_script(entry, "k-0123abcd")
    assert "module load cuda" in script and "k-0123abcd" in script
    assert "key" not in script.split("RK_PAYLOAD")[0].lower().replace("remote-kernel", "")


def test_gc_removes_the_records_of_ended_jobs_once_they_refuse_no_resubmit(
        isolated_env: object, tmp_path: Path) -> None:
    """note_end's records (Jupyter runtime dir) stop Jupyter's auto-restart for NO_RESUBMIT_WINDOW;
    after that `gc` removes them (before: they were kept forever)."""
    import json
    import time

    from remote_kernel import inventory
    from remote_kernel.backends import slurm

    runtime = tmp_path / "runtime"
    (runtime / "remote-kernel").mkdir(parents=True)
    old = runtime / "remote-kernel" / f"{slurm.ENDED_PREFIX}old.json"
    recent = runtime / "remote-kernel" / f"{slurm.ENDED_PREFIX}recent.json"
    old.write_text(json.dumps({"job_id": "7", "state": "TIMEOUT", "at": time.time() - slurm.NO_RESUBMIT_WINDOW - 1}))
    recent.write_text(json.dumps({"job_id": "8", "state": "TIMEOUT", "at": time.time()}))
    dry = inventory.local_garbage(runtime, dry_run=True)
    assert [a["path"] for a in dry if a["action"] == "remove-ended-job-record"] == [str(old)]
    assert old.exists()
    inventory.local_garbage(runtime, dry_run=False)
    assert not old.exists() and recent.exists()
