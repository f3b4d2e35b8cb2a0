"""Running nnU-Net's own commands (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``, ...) in
subprocesses, the way a user runs them: the environment they need and one runner that logs
their output and raises with its tail when they fail. Used by the demo, tests and benchmarks.
"""
from __future__ import annotations

import os
import subprocess
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from .paths import EXT_TRAINER_VAR, find_dataset_folder, trainer_search_path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class CommandError(RuntimeError):
    """A command that exited with an error; the message names the command and ends with the
    tail of its output."""


def nnunet_env(root: str, extra: Optional[Dict[str, str]] = None, raw: Optional[str] = None) -> Dict[str, str]:
    """This process's environment with nnU-Net's three folders under ``root`` (``raw``: another
    raw folder), created, our trainers registered and ``torch.compile`` off; ``extra`` on top."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": raw or os.path.join(root, "nnUNet_raw"),
        "nnUNet_preprocessed": os.path.join(root, "nnUNet_preprocessed"),
        "nnUNet_results": os.path.join(root, "nnUNet_results"),
        EXT_TRAINER_VAR: trainer_search_path(os.environ.get(EXT_TRAINER_VAR, "")),
        "nnUNet_compile": "false",
    })
    for k in NNUNET_FOLDERS:
        os.makedirs(env[k], exist_ok=True)
    if extra:
        env.update(extra)
    return env


def run_command(cmd: Sequence[str], env: Dict[str, str], log: Optional[str] = None,
                on_line: Optional[Callable[[str], None]] = None, tail_lines: int = 40) -> str:
    """Run a command and return its output (stdout and stderr together).

    Args:
        log: file the command line and its output are appended to, as they come.
        on_line: called with every output line (progress display).
    Raises:
        CommandError: non-zero exit, with the command, its exit code, the log file and the last
            ``tail_lines`` lines of output.
    """
    cmd = [str(c) for c in cmd]
    lines: List[str] = []
    logf = open(log, "a") if log is not None else None
    try:
        if logf is not None:
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if logf is not None:
                logf.write(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    finally:
        if logf is not None:
            logf.close()
    if rc != 0:
        where = f" (log: {log})" if log is not None else ""
        raise CommandError(f"command failed with exit code {rc}: {' '.join(cmd)}{where}\n--- last lines ---\n"
                           f"{''.join(lines[-tail_lines:])}")
    return "".join(lines)


def echo_lines(show: Callable[[str], None], markers: Sequence[str]) -> Callable[[str], None]:
    """An ``on_line`` callback showing the lines that contain one of ``markers``."""
    def on_line(line: str) -> None:
        if any(m in line for m in markers):
            show("    " + line.strip()[:160])
    return on_line


def plan_and_preprocess(dataset_id: int, env: Dict[str, str], configurations: Iterable[str] = ("3d_fullres",),
                        log: Optional[str] = None, on_line: Optional[Callable[[str], None]] = None,
                        fingerprint_processes: Optional[int] = 1) -> None:
    """nnU-Net's own planning and preprocessing, one process per configuration (CPU friendly);
    ``fingerprint_processes`` None leaves nnU-Net's default."""
    configs = list(configurations)
    env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # the planner rejects 0
    npfp = [] if fingerprint_processes is None else ["-npfp", str(fingerprint_processes)]
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configs, "-np",
                 *(["1"] * len(configs)), *npfp, "--verify_dataset_integrity"], env, log, on_line)


def model_folder(results: str, dataset_id: int, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's model folder ``<results>/DatasetXXX_NAME/<trainer>__<plans>__<configuration>``."""
    return os.path.join(results, find_dataset_folder(results, dataset_id), f"{trainer}__{plans}__{configuration}")


def train(dataset_id: int, configuration: str, fold, trainer: str, plans: str, env: Dict[str, str],
          log: Optional[str] = None, extra_args: Sequence[str] = (),
          on_line: Optional[Callable[[str], None]] = None) -> str:
    """``nnUNetv2_train`` on the CPU with augmentation in process (no worker start-up on few
    cores; not for planning: nnU-Net's planner calls ``torch.set_num_threads`` with this value).
    Returns the model folder."""
    env = dict(env)
    env.setdefault("nnUNet_n_proc_DA", "0")
    run_command(["nnUNetv2_train", str(dataset_id), configuration, str(fold), "-tr", trainer, "-p", plans,
                 "-device", "cpu", *extra_args], env, log, on_line)
    return model_folder(env["nnUNet_results"], dataset_id, trainer, plans, configuration)
