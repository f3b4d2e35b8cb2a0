"""``nnUNetv2_guide_env``: print the shell line that makes nnunet_guide's trainers visible to nnU-Net.

Usage: ``eval "$(nnUNetv2_guide_env)"``. An existing ``nnUNet_extTrainer`` value is kept.
"""
import argparse
import os
import shlex

import nnunet_guide


def ext_trainer_folder() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(nnunet_guide.__file__)), "_ext_trainers")


def env_value(current: str = "") -> str:
    folder = ext_trainer_folder()
    parts = [p for p in current.split(os.pathsep) if p and p != folder]
    return os.pathsep.join([folder] + parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print the shell line(s) that register nnunet_guide's trainers with "
                                            "nnU-Net. Use: eval \"$(nnUNetv2_guide_env)\"")
    p.add_argument("--shell", choices=("sh", "fish", "powershell"), default="sh")
    args = p.parse_args(argv)
    value = env_value(os.environ.get("nnUNet_extTrainer", ""))
    if args.shell == "fish":
        print(f"set -gx nnUNet_extTrainer {shlex.quote(value)}")
    elif args.shell == "powershell":
        print(f"$env:nnUNet_extTrainer = \"{value}\"")
    else:
        print(f"export nnUNet_extTrainer={shlex.quote(value)}")


if __name__ == "__main__":
    main()
