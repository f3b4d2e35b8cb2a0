"""``nnUNetv2_guide_env``: print the shell line that makes nnunet_guide's trainers visible to nnU-Net.

Usage: ``eval "$(nnUNetv2_guide_env)"``. An existing ``nnUNet_extTrainer`` value is kept.
"""
import argparse
import os
import shlex

from ..paths import EXT_TRAINER_VAR, ext_trainer_folder, trainer_search_path  # noqa: F401 (ext_trainer_folder: former home)

env_value = trainer_search_path  # former name


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print the shell line(s) that register nnunet_guide's trainers with "
                                            "nnU-Net. Use: eval \"$(nnUNetv2_guide_env)\"")
    p.add_argument("--shell", choices=("sh", "fish", "powershell"), default="sh")
    args = p.parse_args(argv)
    value = trainer_search_path(os.environ.get(EXT_TRAINER_VAR, ""))
    if args.shell == "fish":
        print(f"set -gx {EXT_TRAINER_VAR} {shlex.quote(value)}")
    elif args.shell == "powershell":
        print(f"$env:{EXT_TRAINER_VAR} = \"{value}\"")
    else:
        print(f"export {EXT_TRAINER_VAR}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
