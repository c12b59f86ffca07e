"""How ``slmforge train`` starts its processes: in place, under ``torchrun`` (``--nproc N``) or under
``accelerate launch`` (``--launcher accelerate``, configs written from the section's ``distributed`` key)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from slmforge.cli._options import err, load_project, out

_STAGES = {"pretrain": "train", "sft": "sft", "encoder": "encoder"}


def _args_without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given options (``--flag VALUE``, ``--flag=VALUE`` or a bare switch)."""
    valued = {"--nproc", "--launcher"}
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = name in valued and "=" not in a
            continue
        kept.append(a)
    return kept


def launch(what: str, nproc: int, launcher: str, print_config: bool, config: Path | None, set_: list[str] | None,
           out_dir: Path | None) -> None:
    """Start the processes the options ask for and do not return, or return in the process that trains.

    Raises:
        typer.BadParameter: An unknown launcher, or --print-config without --launcher accelerate.
    """
    if launcher not in ("torchrun", "accelerate"):
        raise typer.BadParameter(f"choose torchrun or accelerate (got {launcher!r})", param_hint="--launcher")
    if print_config and launcher != "accelerate":
        raise typer.BadParameter("--print-config prints the accelerate config: add --launcher accelerate")
    if "WORLD_SIZE" in os.environ:  # already one of the launched processes
        return
    args = _args_without(sys.argv[1:], ("--nproc", "--launcher", "--print-config"))
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        if nproc > 1:
            torchrun = str(bin_dir / "torchrun")
            os.execv(torchrun, [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "slmforge", *args])
        return
    from slmforge.artifacts import output_dir
    from slmforge.train import work_dir_for
    from slmforge.train.launch import accelerate_command, launch_files

    cfg = load_project(config, set_)
    section = {"pretrain": cfg.train, "sft": cfg.sft, "encoder": cfg.encoder}[what]
    folder = work_dir_for(out_dir or output_dir(cfg, _STAGES[what])) / "launch"
    given = any(a == "--nproc" or a.startswith("--nproc=") for a in sys.argv)  # else distributed.num_processes
    yaml_file = launch_files(section, folder, nproc if given else None)
    if print_config:
        for f in sorted(folder.iterdir()):
            out.print(f"# {f}")
            print(f.read_text(), end="")
        raise typer.Exit()
    cmd = accelerate_command(bin_dir, yaml_file, args)
    err.print(f"launching: {' '.join(cmd)}")
    os.execv(cmd[0], cmd)
